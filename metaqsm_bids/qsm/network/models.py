"""The shipped networks' names (torch-free, so the inversion registry can name them without loading torch)."""
#: Shipped networks (metaqsm_bids/data/models): Meta-QSM, one model for every voxel size and B0
#: direction, and its Mesa-QSM control, trained for 0.76x0.76x3 mm only.
METAQSM_MODEL = "metaqsm-v3"
MESAQSM_MODEL = "mesaqsm-v3"
