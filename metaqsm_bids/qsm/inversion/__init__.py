"""Stage 4, dipole inversion: local field -> susceptibility. One module per method (:mod:`.tkd`,
:mod:`.l2`, :mod:`.ilsqr`, :mod:`.medi`), their input check in :mod:`.common`, the closed-form
data-consistency step that can follow a network (:mod:`.consistency`), and the methods by
name in :mod:`.registry`, which imports them and the networks of :mod:`metaqsm_bids.qsm.network`
(no method imports the registry)."""
