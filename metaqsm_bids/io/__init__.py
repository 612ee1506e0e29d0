"""BIDS input collection and validation; derivatives naming and writing."""
