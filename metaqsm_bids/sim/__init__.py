"""Simulated data: an analytic head phantom, its multi-echo GRE signal, and a BIDS writer for both."""
