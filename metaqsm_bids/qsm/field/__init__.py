"""Stage 1, the total field: phase scaling (:mod:`.phase`), Laplacian unwrapping (:mod:`.unwrap`),
the multi-echo fit (:mod:`.echofit`)."""
