"""Thin nipype interfaces: load NIfTI, call a pure function in :mod:`metaqsm_bids.qsm`, save."""
