"""Pipeline steps as plain functions over arrays: what one node of the CLI's graph computes, composed from
the numerical modules of :mod:`metaqsm_bids.qsm`, so that the interfaces (which load, call and save) and
the benchmarks run the same code."""
