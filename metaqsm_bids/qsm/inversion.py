"""Dipole inversion: local field (ppm) -> susceptibility (ppm).

Every method has the signature ``f(local_field_ppm, mask, voxel_size_mm, b0_dir, **params)``
and returns only the susceptibility map (float32, ppm, zero outside ``mask``, mean 0
inside it: QSM is relative because the dipole kernel vanishes at k = 0). Methods are
registered by name in :data:`INVERSIONS` and called through :func:`invert`; the caller
records the method and parameters it used.
"""
import inspect

import numpy as np
import scipy.fft as sfft

from .dipole import dipole_kernel
from .grid import PaddedBox
from .ilsqr import ilsqr
from .l2 import l2
from .medi import medi


def check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir):
    """Validate an inversion's inputs.

    Returns the field as float32 set to 0 outside the mask (it is only known
    inside), the mask as bool, the voxel sizes (mm) and the unit B0 vector.
    """
    field = np.asarray(local_field_ppm)
    mask = np.asarray(mask)
    if field.ndim != 3:
        raise ValueError(f"local field must be a 3D array, got shape {field.shape}")
    if mask.shape != field.shape:
        raise ValueError(f"mask shape {mask.shape} does not match local field shape {field.shape}")
    mask = mask != 0
    if not mask.any():
        raise ValueError("mask is empty: no voxel to invert")
    if not np.all(np.isfinite(field[mask])):
        raise ValueError("local field has NaN or infinite values inside the mask")
    voxel = np.asarray(voxel_size_mm, dtype=float)
    if voxel.shape != (3,) or not np.all(voxel > 0):
        raise ValueError(f"voxel_size_mm must be 3 positive lengths, got {voxel_size_mm!r}")
    b0 = np.asarray(b0_dir, dtype=float)
    if b0.shape != (3,) or not np.all(np.isfinite(b0)) or not np.linalg.norm(b0) > 0:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}")
    field = np.where(mask, field.astype(np.float32, copy=False), np.float32(0))
    return field, mask, tuple(voxel), b0 / np.linalg.norm(b0)


def tkd(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), threshold=0.2, pad_voxels=None):
    """Truncated k-space division (Shmueli 2009; Wharton 2010).

    ``chi = IFFT(FFT(field) / D)`` with ``1/D`` replaced by ``sign(D)/threshold`` where
    ``|D| <= threshold`` (D in [-2/3, 1/3]); the unknown D(0) term is dropped and the
    mean of the result inside the mask is set to 0. The estimate is biased low:
    on a sphere phantom the means scale by about ``1 - threshold`` (0.81 at 0.2).

    The FFT runs on the mask's bounding box zero-padded by ``pad_voxels`` per side
    (default: a quarter of the box on each axis), so the periodic wrap does not
    fold the inverse kernel's long-range tails from one edge of the mask onto the
    other. On the test phantoms the wrap then changes the result by 8-10% of
    TKD's own RMS error (25-28% unpadded; 2-5% with half the box, which costs
    2.4x the FFT volume).
    """
    field, mask, voxel, b0 = check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    if not 0 < threshold <= 2.0 / 3.0:
        raise ValueError(f"TKD threshold must be in (0, 2/3], got {threshold!r}")
    box = PaddedBox(mask, pad_voxels)
    kernel = dipole_kernel(box.shape, voxel, b0, half=True)
    small = np.abs(kernel) <= threshold
    inverse = np.where(small, np.sign(kernel) / np.float32(threshold), 1.0 / np.where(small, 1.0, kernel))
    spectrum = sfft.rfftn(box.embed(field))
    spectrum *= inverse.astype(np.float32)
    chi = box.extract(sfft.irfftn(spectrum, s=box.shape).astype(np.float32, copy=False))
    chi[mask] -= chi[mask].mean(dtype=np.float64)
    chi[~mask] = 0.0
    return chi


#: Shipped networks (metaqsm_bids/data/models): Meta-QSM, one model for every voxel size and B0
#: direction, and its Mesa-QSM control, trained for 0.76x0.76x3 mm only.
METAQSM_MODEL = "metaqsm-v3"
MESAQSM_MODEL = "mesaqsm-v3"


def metaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), model=METAQSM_MODEL, device="auto",
            orientations="flips", info=None):
    """Meta-QSM: the shipped weight-predicting U-Net (one model for every voxel size and B0 direction).

    ``model`` names weights in the package data; ``device`` is ``auto``, ``cpu`` or ``cuda``;
    ``orientations`` (``canonical``, ``flips``, ``all``) the storage orientations the prediction
    averages over (:func:`metaqsm_bids.qsm.deepqsm.orientation_transforms`: ``flips``, the default,
    makes the map independent of flipped or reordered storage at 8 passes' cost).
    Like the other methods the result is demeaned inside the mask. ``info`` receives the
    model name, its sha256 and the device used. torch and the model load only when called.
    """
    from .deepqsm import load_model, model_info, orientation_transforms, predict_chi
    from .device import resolve_device

    device = resolve_device(device)
    net = load_model(model, device=device)
    chi = predict_chi(net, local_field_ppm, mask, voxel_size_mm, b0_dir, device=device, orientations=orientations)
    inside = np.asarray(mask, bool)
    chi[inside] -= chi[inside].mean(dtype=np.float64)
    if info is not None:
        # load_model checked the file against this recorded sha256
        info.update({"Model": model, "ModelSHA256": model_info(model)["sha256"], "Device": device,
                     "OrientationPasses": len(orientation_transforms(b0_dir, orientations))})
    return chi


def mesaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), model=MESAQSM_MODEL, device="auto",
            orientations="flips", info=None):
    """Mesa-QSM, the control: the same U-Net with plain convolutions, trained at one voxel size
    (warns at any other); see :func:`metaqsm`."""
    return metaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir, model=model, device=device,
                   orientations=orientations, info=info)


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
