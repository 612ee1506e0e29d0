"""Stage 3, background field removal: total field -> local field. One module per method (:mod:`.pdf`,
:mod:`.resharp`, :mod:`.vsharp`, :mod:`.lbv`), each with its function and its
:class:`~metaqsm_bids.qsm.spec.MethodSpec` (``SPEC``); what they share in :mod:`.common`; the methods by name in
:mod:`.registry`, which imports them (no method imports the registry)."""
