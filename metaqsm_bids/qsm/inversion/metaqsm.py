"""Dipole inversion by the shipped networks: Meta-QSM (one model for every voxel size and B0 direction) and its
Mesa-QSM control (plain convolutions, trained at one voxel size), optionally followed by the closed-form k-space
data-consistency step (:mod:`.consistency`) and the TV refinement on the field's high-pass (:func:`.tv.tv_refine`).
torch and the models load only when a network is called."""
from dataclasses import dataclass

import numpy as np

from ..network.models import (DEFAULT_ORIENTATIONS, INPUTS, MESAQSM_MODEL, METAQSM_MODEL, ORIENTATIONS,
                              PAPER, TKD_THRESHOLD, shipped_config)
from ..spec import MethodSpec, parameter
from . import tkd, tv
from .tv import DEFAULT_TV_REFINEMENT, TVParameters
from .consistency import DEFAULT_EDGE_MM, DEFAULT_LAMBDA, data_consistency


@dataclass(frozen=True)
class NetworkParameters:
    """The settings of both networks a user may change."""

    orientations: str = parameter(
        DEFAULT_ORIENTATIONS, "storage orientations the network's prediction is averaged over: 'canonical' is one "
        "pass; 'pair' (2 passes) adds the pass with the axis along B0 reversed; 'flips' (8) gives the same map for "
        "flipped or reordered storage of the volume; 'all' (16) also for swapped in-plane axes",
        words="averaged over storage orientations", option="--network-orientations", choices=ORIENTATIONS)
    data_consistency_lambda: float = parameter(
        DEFAULT_LAMBDA, "weight of the closed-form k-space data-consistency step that follows the network "
        "(dimensionless; the field decides where the dipole kernel's square exceeds it; see "
        "metaqsm_bids.qsm.inversion.consistency)", words="then pulled onto the field by a k-space data-consistency "
        "step, lambda", option="--network-data-consistency", check="positive_or_off", metavar="LAMBDA")
    data_consistency_edge_mm: float = parameter(
        DEFAULT_EDGE_MM, "weigh the field down within this distance of the mask's edge in the data-consistency step, "
        "where background removal leaves most of its error (off: the closed form, the field weighted 1 everywhere; "
        "see metaqsm_bids.qsm.inversion.consistency)", unit="mm", words="with the field weighted down within the "
        "mask's outer", option="--network-data-consistency-edge-mm", check="positive_or_off", metavar="MM")
    tv_refinement: int = parameter(
        DEFAULT_TV_REFINEMENT, "iterations of the magnitude-weighted TV-ADMM that refine the network's map last, "
        "fitting the field's high-pass (blind to harmonic background residuals; see "
        "metaqsm_bids.qsm.inversion.tv.tv_refine)", words="then refined by magnitude-weighted TV-ADMM on the "
        "field's high-pass, iterations", option="--network-tv-refinement", check="count_or_off", metavar="N")


def metaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), model=METAQSM_MODEL, device="auto",
            orientations=NetworkParameters.orientations,
            data_consistency_lambda=NetworkParameters.data_consistency_lambda,
            data_consistency_edge_mm=NetworkParameters.data_consistency_edge_mm,
            tv_refinement=NetworkParameters.tv_refinement, magnitude=None, info=None):
    """Meta-QSM: the shipped weight-predicting U-Net (one model for every voxel size and B0 direction); ppm in,
    ppm out.

    ``model`` names weights in the package data; ``device`` is ``auto``, ``cpu`` or ``cuda``;
    ``orientations`` (``canonical``, ``pair``, ``flips``, ``all``) the storage orientations the prediction
    averages over (:func:`metaqsm_bids.qsm.network.deepqsm.orientation_transforms`; the default ``pair``
    is 2 passes; ``flips`` makes the map independent of flipped or reordered storage at 8 passes' cost).
    ``data_consistency_lambda`` (dimensionless, > 0; default :data:`.consistency.DEFAULT_LAMBDA`; None: off)
    follows the network with the k-space data-consistency step :func:`.consistency.data_consistency` (on the FFT box
    of :func:`~metaqsm_bids.qsm.network.deepqsm.fft_padding`), which fits the field wherever the dipole kernel's
    square exceeds about this value; ``data_consistency_edge_mm`` (mm; default :data:`.consistency.DEFAULT_EDGE_MM`;
    None: the closed form) weighs the field down within that distance of the mask's edge in it.
    ``tv_refinement`` (iterations, >= 1; None: off) refines the map last by :func:`.tv.tv_refine` (on the same box),
    which needs ``magnitude``.
    ``magnitude`` (the RSS magnitude, same shape) is an input of ``*+magnitude`` models
    (required by them; the others ignore it). Like the other methods the result is demeaned inside the mask.
    ``info`` receives the model name, its sha256 and the device used.
    """
    # torch loads here
    from ..network.deepqsm import fft_padding, load_model, model_info, orientation_transforms, predict_chi
    from ..network.device import resolve_device

    device = resolve_device(device)
    net = load_model(model, device=device)
    takes_magnitude = "magnitude" in INPUTS[net.config["input"]]
    if (takes_magnitude or tv_refinement) and magnitude is None:
        raise ValueError(f"model {model} takes the magnitude image as an input: pass `magnitude`" if takes_magnitude
                         else "the TV refinement weighs the field by the magnitude image: pass `magnitude`")
    chi = predict_chi(net, local_field_ppm, mask, voxel_size_mm, b0_dir, device=device, orientations=orientations,
                      magnitude=magnitude if takes_magnitude else None)
    inside = np.asarray(mask, bool)
    if data_consistency_lambda is not None:
        chi = data_consistency(chi, local_field_ppm, mask, voxel_size_mm, b0_dir, data_consistency_lambda,
                               pad_voxels=fft_padding(inside), edge_mm=data_consistency_edge_mm)
    if tv_refinement:
        chi = tv.tv_refine(chi, local_field_ppm, inside, voxel_size_mm, b0_dir, magnitude, tv_refinement,
                           pad_voxels=fft_padding(inside))
    chi[inside] -= chi[inside].mean(dtype=np.float64)
    if info is not None:
        # load_model checked the file against this recorded sha256
        info.update({"Model": model, "ModelSHA256": model_info(model)["sha256"], "Device": device,
                     "OrientationPasses": len(orientation_transforms(b0_dir, orientations)),
                     "DataConsistencyLambda": data_consistency_lambda})
    return chi


def mesaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), model=MESAQSM_MODEL, device="auto",
            orientations=NetworkParameters.orientations,
            data_consistency_lambda=NetworkParameters.data_consistency_lambda,
            data_consistency_edge_mm=NetworkParameters.data_consistency_edge_mm,
            tv_refinement=NetworkParameters.tv_refinement, magnitude=None, info=None):
    """Mesa-QSM, the control: the same U-Net with plain convolutions, trained at one voxel size
    (warns at any other); see :func:`metaqsm`."""
    return metaqsm(local_field_ppm, mask, voxel_size_mm, b0_dir, model=model, device=device,
                   orientations=orientations, data_consistency_lambda=data_consistency_lambda,
                   data_consistency_edge_mm=data_consistency_edge_mm, tv_refinement=tv_refinement, magnitude=magnitude,
                   info=info)


def _refines(model):
    """What a shipped network's output is added to, in words, and the citations of that method and the paper."""
    config = shipped_config(model)
    if "tv" in INPUTS[config["input"]]:
        weighting = (", data term weighted by the magnitude, MEDI's edge mask" if config["tv_weighting"] == "magnitude"
                     else "")
        return (f"TV-ADMM's map (alpha {TVParameters.alpha:g}, rho {config['tv_rho_per_alpha']:g} alpha, "
                f"{config['tv_iterations']} iterations{weighting})",
                {"metaqsm": PAPER, **tv.SPEC.citations})
    return f"TKD, threshold {TKD_THRESHOLD:g}", {"metaqsm": PAPER, **tkd.SPEC.citations}


_METAQSM_REFINES, _METAQSM_CITATIONS = _refines(METAQSM_MODEL)
_MESAQSM_REFINES, _MESAQSM_CITATIONS = _refines(MESAQSM_MODEL)
METAQSM_SPEC = MethodSpec(
    name="metaqsm", function=metaqsm, display_name="Meta-QSM",
    description=f"the Meta-QSM network (weight-predicting U-Net refining {_METAQSM_REFINES})",
    citations=_METAQSM_CITATIONS, parameters=NetworkParameters, inputs=("magnitude", "device"))
MESAQSM_SPEC = MethodSpec(
    name="mesaqsm", function=mesaqsm, display_name="Mesa-QSM",
    description=f"the Mesa-QSM network (the Meta-QSM U-Net with plain convolutions, one resolution, refining "
                f"{_MESAQSM_REFINES})",
    citations=_MESAQSM_CITATIONS, parameters=NetworkParameters, inputs=("magnitude", "device"))
