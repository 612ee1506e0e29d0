"""Stage 2, the brain mask from the magnitude (:mod:`.brain`)."""
