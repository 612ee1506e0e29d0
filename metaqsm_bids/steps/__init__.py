"""Pipeline steps as plain functions over arrays: what one node of the CLI's graph computes, composed from
the numerical modules of :mod:`metaqsm_bids.qsm` (arrays and settings in, arrays and provenance out), so that the
interfaces (which load, call and save), the benchmarks and the in-process pipeline
(:func:`metaqsm_bids.steps.pipeline.reconstruct`) run the same code."""
