"""Training Meta-QSM/Mesa-QSM: synthetic data (:mod:`.synth`) and the training loop (:mod:`.train`)."""
