"""Dipole inversion: local field (ppm) -> susceptibility (ppm).

Every method has the signature ``f(local_field_ppm, mask, voxel_size_mm, b0_dir, **params)``
and returns only the susceptibility map (float32, ppm, zero outside ``mask``, mean 0
inside it: QSM is relative because the dipole kernel vanishes at k = 0). Methods are
registered by name in :data:`INVERSIONS` and called through :func:`invert`; the caller
records the method and parameters it used.
"""
import inspect

import numpy as np

from ..network.models import DEFAULT_ORIENTATIONS, MESAQSM_MODEL, METAQSM_MODEL
from .consistency import DEFAULT_LAMBDA, data_consistency
from .ilsqr import ilsqr
from .l2 import l2
from .medi import medi
from .tkd import tkd


def metaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), model=METAQSM_MODEL, device="auto",
            orientations=DEFAULT_ORIENTATIONS, data_consistency_lambda=DEFAULT_LAMBDA, magnitude=None, info=None):
    """Meta-QSM: the shipped weight-predicting U-Net (one model for every voxel size and B0 direction).

    ``model`` names weights in the package data; ``device`` is ``auto``, ``cpu`` or ``cuda``;
    ``orientations`` (``canonical``, ``pair``, ``flips``, ``all``) the storage orientations the prediction
    averages over (:func:`metaqsm_bids.qsm.network.deepqsm.orientation_transforms`; the default ``pair``
    is 2 passes; ``flips`` makes the map independent of flipped or reordered storage at 8 passes' cost).
    ``data_consistency_lambda`` (dimensionless, > 0; default :data:`.consistency.DEFAULT_LAMBDA`; None: off)
    follows the network with the closed-form k-space data-consistency step :func:`.consistency.data_consistency`,
    which fits the field wherever the dipole kernel's square exceeds about this value.
    ``magnitude`` (the RSS magnitude, same shape) is an input of ``field+tkd+magnitude`` models
    (required by them; the others ignore it). Like the other methods the result is demeaned inside the mask. ``info`` receives the
    model name, its sha256 and the device used. torch and the model load only when called.
    """
    from ..network.deepqsm import load_model, model_info, orientation_transforms, predict_chi  # here: torch loads only when called
    from ..network.device import resolve_device
    from ..network.networks import INPUTS

    device = resolve_device(device)
    net = load_model(model, device=device)
    takes_magnitude = "magnitude" in INPUTS[net.config["input"]]
    if takes_magnitude and magnitude is None:
        raise ValueError(f"model {model} takes the magnitude image as an input: pass `magnitude`")
    chi = predict_chi(net, local_field_ppm, mask, voxel_size_mm, b0_dir, device=device, orientations=orientations,
                      magnitude=magnitude if takes_magnitude else None)
    if data_consistency_lambda is not None:
        chi = data_consistency(chi, local_field_ppm, mask, voxel_size_mm, b0_dir, data_consistency_lambda)
    inside = np.asarray(mask, bool)
    chi[inside] -= chi[inside].mean(dtype=np.float64)
    if info is not None:
        # load_model checked the file against this recorded sha256
        info.update({"Model": model, "ModelSHA256": model_info(model)["sha256"], "Device": device,
                     "OrientationPasses": len(orientation_transforms(b0_dir, orientations)),
                     "DataConsistencyLambda": data_consistency_lambda})
    return chi


def mesaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), model=MESAQSM_MODEL, device="auto",
            orientations=DEFAULT_ORIENTATIONS, data_consistency_lambda=DEFAULT_LAMBDA, magnitude=None, info=None):
    """Mesa-QSM, the control: the same U-Net with plain convolutions, trained at one voxel size
    (warns at any other); see :func:`metaqsm`."""
    return metaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir, model=model, device=device,
                   orientations=orientations, data_consistency_lambda=data_consistency_lambda, magnitude=magnitude,
                   info=info)


#: Dipole inversion methods by name.
INVERSIONS = {"tkd": tkd, "l2": l2, "ilsqr": ilsqr, "medi": medi, "metaqsm": metaqsm, "mesaqsm": mesaqsm}
#: The methods that run a network (they take a ``device``).
NETWORK_INVERSIONS = ("metaqsm", "mesaqsm")


def invert(method, local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), info=None, **params):
    """Susceptibility (ppm) from the local field (ppm) by the registered ``method``.

    ``info`` (a dict) receives the iterative methods' diagnostics (iterations, residuals);
    closed-form methods leave it empty.
    """
    try:
        function = INVERSIONS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dipole inversion {method!r}; choose one of: {', '.join(sorted(INVERSIONS))}"
        ) from None
    if info is not None and "info" in inspect.signature(function).parameters:
        params["info"] = info
    return function(local_field_ppm, mask, voxel_size_mm, b0_dir, **params)
