"""The shipped networks' names, input variants, inference settings and paper (torch-free, so the inversion specs
and the CLI can name them without loading torch)."""
import json
from pathlib import Path

#: Where the shipped models live: ``<name>.pt`` (config and weights) beside ``<name>.json`` (metadata).
MODELS_DIR = Path(__file__).resolve().parents[2] / "data" / "models"
#: The paper that describes the networks (its title and corresponding author: what its text gives).
PAPER = ("Meta-QSM: An Image-Resolution-Arbitrary Network for QSM Reconstruction. "
         "Corresponding author: Kevin M. Koch (kmkoch@mcw.edu).")
#: Shipped networks (metaqsm_bids/data/models): Meta-QSM, one model for every voxel size and B0
#: direction, and its Mesa-QSM control, trained for 0.76x0.76x3 mm only.
METAQSM_MODEL = "metaqsm-v11"
MESAQSM_MODEL = "mesaqsm-v3"

#: ``orientations`` of :func:`~metaqsm_bids.qsm.network.deepqsm.predict_chi`: the storage orientations a
#: prediction averages over (:func:`~metaqsm_bids.qsm.network.deepqsm.orientation_transforms`).
ORIENTATIONS = ("canonical", "pair", "flips", "all")
#: What the pipeline runs (BENCHMARKS.md, "Orientation passes"): metaqsm-v3 from the true local field,
#: NRMSE % one pass / pair / 8 flips: 63.6 / 60.3 / 60.0 at 0.76x0.76x3, 50.5 / 48.9 / 48.6 at 0.5x0.5x2.
DEFAULT_ORIENTATIONS = "pair"
#: TKD threshold of the ``field+tkd`` input channel (the TKD baseline's), fixed by the training.
TKD_THRESHOLD = 0.2
#: Network input variants (a model config's ``input``) -> their channels, in order.
INPUTS = {"field": ("field",), "field+tkd": ("field", "tkd"), "field+tkd+magnitude": ("field", "tkd", "magnitude"),
          "field+tv+magnitude": ("field", "tv", "magnitude")}
#: Closed-form estimate channels (channel 1) the U-Net's output is added to: TKD, or TV-ADMM's map.
ESTIMATES = ("tkd", "tv")
#: The ``tv`` input channel's settings, model config keys: ADMM iterations, penalty over alpha, and data weighting
#: (``tv_admm``'s ``weighting``: "magnitude", its data term weighted by the magnitude and MEDI's edge mask on its TV
#: term). They change what the channel holds, not the weights' shapes (a training run
#: from a parent may change them). Their values here are those of a config that does not say: what metaqsm-v6 was
#: trained with (TV-ADMM's defaults then).
TV_INPUT_DEFAULTS = {"tv_iterations": 5, "tv_rho_per_alpha": 100.0, "tv_weighting": "none"}


def shipped_config(name):
    """A shipped model's network config (``config`` in its ``.json``, :data:`TV_INPUT_DEFAULTS` where it does not
    say), read without torch."""
    return {**TV_INPUT_DEFAULTS, **json.loads((MODELS_DIR / f"{name}.json").read_text())["config"]}
