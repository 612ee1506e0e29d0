"""BIDS input collection and derivatives writing."""
