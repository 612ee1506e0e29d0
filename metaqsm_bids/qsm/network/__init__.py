"""The networks (:mod:`.networks`: WP-Conv, the U-Net), the shipped models' names (:mod:`.models`),
inference (:mod:`.deepqsm`, which takes TKD from :mod:`metaqsm_bids.qsm.inversion.tkd` as an input
channel) and the torch device (:mod:`.device`)."""
