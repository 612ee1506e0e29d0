"""Stage 4, dipole inversion: local field -> susceptibility. One module per method (:mod:`.tkd`, :mod:`.l2`,
:mod:`.ilsqr`, :mod:`.medi`, and the networks in :mod:`.metaqsm`), each with its function and its
:class:`~metaqsm_bids.qsm.spec.MethodSpec`; their input check in :mod:`.common`; the closed-form
data-consistency step that can follow a network (:mod:`.consistency`); the methods by name in :mod:`.registry`,
which imports them (no method imports the registry)."""
