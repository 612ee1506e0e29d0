"""Deep-learning dipole inversion with the shipped Meta-QSM (or Mesa-QSM) networks.

Models live in package data as ``metaqsm_bids/data/models/<name>.pt`` (config and
weights, see :func:`metaqsm_bids.qsm.network.networks.save_network`) next to
``<name>.json`` (the config again, the ``.pt``'s sha256, the training recipe, the
exact training command, steps, wall time, hardware and validation scores).

The network sees the local field normalised per volume: demeaned inside the mask
(``D(0) = 0``, so the mean field carries no susceptibility information) and divided
by its RMS there -- plus, for ``input='field+tkd'`` models, the TKD inverse of that
normalised field as a second channel (``field+tv+magnitude``: TV-ADMM's map of the field in ppm,
divided by that RMS), and for ``*+magnitude`` models the magnitude image divided by its mean in
the mask as a third. The problem is linear, so the output is multiplied back by that RMS; a TKD-input
network therefore does not depend on the field's overall scale (field strength, units, contrast). A TV-input
one does, through TV-ADMM's weight, which is per ppm of field: its input must be the local field in ppm.
"""
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core.grid import PaddedBox
from ..inversion.common import check_inputs
from ..inversion.tkd import tkd
from ..inversion.tv import TVParameters, tv_admm
from .models import (DEFAULT_ORIENTATIONS, INPUTS, METAQSM_MODEL, MODELS_DIR, ORIENTATIONS, TKD_THRESHOLD,
                     TV_INPUT_DEFAULTS)
from .networks import VOXEL_CENTRE_MM, VOXEL_HALF_RANGE_MM, encode_condition, load_network

#: Voxels of context kept around the mask's bounding box (the network only runs there).
CONTEXT_VOXELS = 8
#: Padded box voxels above which inference runs in overlapping patches, to bound its memory: at the limit about
#: 2.5 GiB (metaqsm-v5, `pair`, on the 0.5x0.5x2 head's 304x384x96 box: 1.2 GiB above its inputs, 105 B per voxel).
#: Patches cost time: each carries the receptive radius (~65 voxels) of context, so that box in patches of at most
#: 256x256x96 (the limit before) took 2.1x the time of one box (0.75x0.75x1.5's 208x264x120: 1.5x), at no less
#: memory (BENCHMARKS.md, "Meta-QSM in one box").
MAX_PATCH_VOXELS = 24 * 2 ** 20
#: Meta-QSM's own FFT boxes (its TV-ADMM channel's, its data-consistency step's): the mask's bounding box padded by
#: this fraction of its length per side, half TV-ADMM's and TKD's quarter. The weighted channel's ADMM was most of
#: Meta-QSM's time; on these boxes metaqsm-v10 (trained on the quarter's channel) scored within 0.07 NRMSE points from
#: the true local field and 0.55 from the pipeline's at the stage benchmark's four protocols, where a sixteenth's
#: channel lost 0.6-0.7 at 0.5x0.5x2 (BENCHMARKS.md, "The TV channel on a tighter box").
FFT_PAD_FRACTION = 0.125


def normalise_field(local_field_ppm, mask):
    """Demeaned, RMS-normalised field inside ``mask`` (zero outside) and the RMS (ppm) it was divided by."""
    field = np.asarray(local_field_ppm, dtype=np.float32)
    inside = field[mask]
    centred = inside - inside.mean(dtype=np.float64)
    scale = float(np.sqrt(np.mean(centred.astype(np.float64) ** 2)))
    out = np.zeros_like(field)
    if scale > 0:
        out[mask] = centred / scale
    return out, scale


def normalise_magnitude(magnitude, mask):
    """The magnitude divided by its mean inside ``mask`` (zero outside; all zero if that mean is not positive)."""
    magnitude = np.asarray(magnitude, dtype=np.float32)
    level = float(magnitude[mask].mean(dtype=np.float64)) if mask.any() else 0.0
    return np.where(mask, magnitude / level, np.float32(0)) if level > 0 else np.zeros_like(magnitude)


def fft_padding(mask):
    """Voxels per side by which Meta-QSM's FFT boxes pad the mask's bounding box (:data:`FFT_PAD_FRACTION`)."""
    return [int((s.stop - s.start) * FFT_PAD_FRACTION) for s in PaddedBox(mask).crop]


def network_input(local_field_ppm, mask, voxel_size_mm, b0_dir, input_kind, magnitude=None,
                  tv_iterations=TV_INPUT_DEFAULTS["tv_iterations"],
                  tv_rho_per_alpha=TV_INPUT_DEFAULTS["tv_rho_per_alpha"],
                  tv_weighting=TV_INPUT_DEFAULTS["tv_weighting"]):
    """Input channels (C, I, J, K float32) for a network with config ``input`` and the RMS (ppm) divided out.

    Channel 0 is :func:`normalise_field`; ``field+tkd`` adds TKD (threshold
    :data:`.models.TKD_THRESHOLD`) of that normalised field, ``field+tv+magnitude`` TV-ADMM's map (its default
    alpha, ``tv_iterations`` iterations and penalty ``tv_rho_per_alpha``, and data weighting ``tv_weighting``: the model
    config's; on the box of :func:`fft_padding`) of the demeaned field in ppm divided by the RMS;
    ``*+magnitude`` adds :func:`normalise_magnitude` of ``magnitude`` (required for it, same shape).
    """
    channels = INPUTS[input_kind]
    x, scale = normalise_field(local_field_ppm, mask)
    out = [x]
    if "tkd" in channels:
        out.append(tkd(x, mask, voxel_size_mm, b0_dir, threshold=TKD_THRESHOLD) if scale > 0 else np.zeros_like(x))
    if ("magnitude" in channels or ("tv" in channels and tv_weighting != "none")) and (
            magnitude is None or np.shape(magnitude) != np.shape(mask)):
        raise ValueError(f"a network with input {input_kind!r} needs the magnitude image, of the field's shape")
    if "tv" in channels:
        # on the field in ppm, then normalised: TV-ADMM is not scale-free (its alpha and rho are per ppm)
        out.append(tv_admm(x * scale, mask, voxel_size_mm, b0_dir, alpha=TVParameters.alpha,
                           iterations=tv_iterations, rho_per_alpha=tv_rho_per_alpha, weighting=tv_weighting,
                           magnitude=magnitude, pad_voxels=fft_padding(mask)) / scale
                   if scale > 0 else np.zeros_like(x))
    if "magnitude" in channels:
        out.append(normalise_magnitude(magnitude, mask))
    return np.stack(out), scale


def _model_files(name, models_dir=None):
    directory = Path(models_dir) if models_dir is not None else MODELS_DIR
    pt, meta = directory / f"{name}.pt", directory / f"{name}.json"
    if not pt.exists() or not meta.exists():
        available = sorted(p.stem for p in directory.glob("*.pt"))
        raise ValueError(f"no model {name!r} in {directory} (available: {', '.join(available) or 'none'})")
    return pt, meta


def file_sha256(path):
    """sha256 (hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_sha256(name, models_dir=None):
    """sha256 (hex) of the model's ``.pt`` file, as recorded in provenance."""
    return file_sha256(_model_files(name, models_dir)[0])


def model_info(name, models_dir=None):
    """The model's ``.json`` metadata (config, sha256, recipe, command, validation)."""
    return json.loads(_model_files(name, models_dir)[1].read_text())


def load_model(name=METAQSM_MODEL, device="cpu", models_dir=None):
    """Load a shipped model in eval mode on ``device``, checking the ``.pt`` against its recorded sha256."""
    pt, _ = _model_files(name, models_dir)
    expected = model_info(name, models_dir)["sha256"]
    actual = file_sha256(pt)
    if actual != expected:
        raise ValueError(f"model file {pt} has sha256 {actual}, but {pt.with_suffix('.json').name} "
                         f"records {expected}: the file is corrupt or was replaced")
    return load_network(pt, map_location=device).to(device)


def _tiles(n, q, margin, blend, multiple):
    """Patch starts along one axis of padded length ``n`` for patches of length ``q``."""
    if q >= n:
        return [0]
    step = max((q - 2 * margin - blend) // multiple * multiple, multiple)
    return sorted(set(range(0, n - q, step)) | {n - q})


def _window(start, q, n, margin, blend):
    """Blending weight along one axis: 0 where the patch edge's zero padding reaches (``margin``
    voxels from an edge inside the volume), a raised-cosine ramp over ``blend`` voxels, then 1."""
    w = np.ones(q, dtype=np.float32)
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(blend) + 0.5) / blend)).astype(np.float32)
    if start > 0:
        w[:margin] = 0
        w[margin:margin + blend] = ramp
    if start + q < n:
        w[q - margin:] = 0
        w[q - margin - blend:q - margin] = ramp[::-1]
    return w


def _patch_shape(shape, max_voxels, margin, blend, multiple):
    """Largest patch (multiples of ``multiple``) within ``max_voxels``, shrinking the longest axis first."""
    smallest = [min(n, -(-(2 * margin + blend + multiple) // multiple) * multiple) for n in shape]
    q = list(shape)
    while math.prod(q) > max_voxels:
        axis = max((a for a in range(3) if q[a] - multiple >= smallest[a]), key=lambda a: q[a], default=None)
        if axis is None:
            break
        q[axis] -= multiple
    return q


def orientation_transforms(b0_dir, orientations=DEFAULT_ORIENTATIONS):
    """``[(axis order, flipped axes)]`` the prediction runs in, for ``orientations``:

    * ``canonical``: the axes reordered so that the one closest to B0 comes last (k, as in training)
      and the other two keep their stored order; one pass;
    * ``pair``: that pass and the one with the axis along B0 reversed (B0's sign in it too): the
      same physics, which the network answers a little differently; their mean is most of what
      averaging over every flip gains; 2 passes;
    * ``flips``: that order with each of the 8 combinations of axis flips; 8 passes;
    * ``all``: ``flips`` for both orders of the two axes across B0; 16 passes.
    """
    if orientations not in ORIENTATIONS:
        raise ValueError(f"orientations must be one of {', '.join(ORIENTATIONS)}, got {orientations!r}")
    along = int(np.argmax(np.abs(np.asarray(b0_dir, float))))
    across = [a for a in range(3) if a != along]
    orders = [(across[0], across[1], along)]
    if orientations == "all":
        orders.append((across[1], across[0], along))
    flips = {"canonical": [()], "pair": [(), (2,)]}.get(
        orientations, [tuple(a for a in range(3) if bits >> a & 1) for bits in range(8)])
    return [(order, flipped) for order in orders for flipped in flips]


def predict_chi(model, local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), device="cpu",
                max_patch_voxels=MAX_PATCH_VOXELS, blend_voxels=8, orientations="canonical", magnitude=None):
    """Susceptibility (ppm, float32, zero outside ``mask``) from a local field (ppm), averaged over orientations.

    The physics does not depend on how the volume is stored (axis order and direction,
    with B0 and the voxel size expressed in the same axes); a network does. The network
    runs on each of :func:`orientation_transforms` (``orientations``) of the volume -- each
    reordered/flipped copy with its own voxel size and B0 in its own axes -- and the results,
    mapped back, are averaged. The input channels (:func:`network_input`) are made once and
    reordered/flipped with the volume: TKD and TV-ADMM of a flipped or reordered field (B0 and the
    voxel size following) are the same map flipped or reordered, to float rounding. For two storages of
    one volume that differ by flips (``flips``) or by any axis order and flips (``all``), the passes are
    the same set, so the averages agree to float rounding. Costs one network pass per transform
    (the default here is one; the pipeline's :func:`~metaqsm_bids.qsm.inversion.metaqsm` uses
    :data:`DEFAULT_ORIENTATIONS`). ``magnitude`` (same shape): the magnitude image, required by a
    ``*+magnitude`` model, ignored by the others; for the rest see :func:`predict_stored`.
    """
    field, mask, voxel, b0 = check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    x, scale = network_input(field, mask, voxel, b0, model.config["input"], magnitude, model.config["tv_iterations"],
                             model.config["tv_rho_per_alpha"], model.config["tv_weighting"])
    total = np.zeros(field.shape, np.float64)
    if scale == 0:
        return total.astype(np.float32)
    transforms = orientation_transforms(b0, orientations)
    for order, flipped in transforms:
        channels, m = np.transpose(x, (0, *(a + 1 for a in order))), np.transpose(mask, order)
        v, b = tuple(voxel[a] for a in order), np.asarray(b0)[list(order)].copy()
        if flipped:
            channels, m = np.flip(channels, tuple(a + 1 for a in flipped)), np.flip(m, flipped)
            b[list(flipped)] *= -1
        out = predict_stored(model, np.ascontiguousarray(channels), np.ascontiguousarray(m), v, b, device,
                             max_patch_voxels, blend_voxels)
        if flipped:
            out = np.flip(out, flipped)
        total += np.transpose(out, np.argsort(order))
    return (total * (scale / len(transforms))).astype(np.float32)


def predict_stored(model, x, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), device="cpu",
                   max_patch_voxels=MAX_PATCH_VOXELS, blend_voxels=8):
    """The network's output in the normalised units of its input channels ``x`` ((C, I, J, K) from
    :func:`network_input`; float32, zero outside ``mask``), in the volume's stored orientation (one pass).

    Any matrix size: the mask's bounding box plus :data:`CONTEXT_VOXELS` is zero-padded to the U-Net's
    multiple, run, and placed back.
    Above ``max_patch_voxels`` (padded) it runs in overlapping patches whose outputs are
    blended with raised-cosine weights; each patch carries a context margin of the
    network's receptive radius, so the result equals whole-volume inference to float
    precision. Kernels are predicted once per call. Deterministic on CPU. Unlike the
    analytic inversions the output is not demeaned: the network was trained on absolute
    susceptibility (CSF near 0 ppm).
    """
    mask = np.asarray(mask, bool)
    cfg = model.config
    voxel = np.asarray(voxel_size_mm, dtype=float)
    b0_dir = np.asarray(b0_dir, dtype=float)
    if cfg["arch"] == "mesa":
        trained = np.asarray(cfg["fixed_voxel_size_mm"])
        if not np.allclose(voxel, trained, rtol=0.05):
            warnings.warn(f"this Mesa-QSM model was trained for {tuple(trained)} mm voxels only, "
                          f"not {tuple(voxel)} mm: expect degraded susceptibility", stacklevel=2)
        cond = None
    else:
        cond = encode_condition(voxel, b0_dir, cfg["conditioning"]).to(device)
        low = np.subtract(VOXEL_CENTRE_MM, VOXEL_HALF_RANGE_MM)
        high = np.add(VOXEL_CENTRE_MM, VOXEL_HALF_RANGE_MM)
        if np.any(voxel < 0.9 * low) or np.any(voxel > 1.1 * high):
            warnings.warn(f"voxel size {tuple(voxel)} mm is outside the training range "
                          f"{tuple(low)}-{tuple(high)} mm: the network extrapolates", stacklevel=2)
        # trained with B0 along k ('voxel') or within 30 deg of it ('voxel+b0')
        max_tilt = 5.0 if cfg["conditioning"] == "voxel" else 35.0
        if abs(b0_dir[2]) < np.cos(np.radians(max_tilt)):
            warnings.warn(f"B0 is {np.degrees(np.arccos(abs(b0_dir[2]))):.0f} deg from the slice axis k, beyond "
                          f"what this model was trained for ({max_tilt:.0f} deg): consider resampling to the "
                          "B0-aligned frame", stacklevel=2)

    chi = np.zeros(mask.shape, dtype=np.float32)
    # only the mask's bounding box (plus context) is run, zero-padded to the U-Net's multiple
    box = PaddedBox(mask, CONTEXT_VOXELS, multiple=model.multiple)
    xp = np.stack([box.embed(c) for c in x])
    padded = list(box.shape)
    m = model.multiple
    model = model.to(device)

    with torch.no_grad():
        weights = model.predict_weights(cond)

        def run(block):
            t = torch.from_numpy(np.ascontiguousarray(block))[None].to(device)
            return model.run(t, weights)[0, 0].float().cpu().numpy()

        if math.prod(padded) <= max_patch_voxels:
            out = run(xp)
        else:
            margin = model.receptive_radius
            q = _patch_shape(padded, max_patch_voxels, margin, blend_voxels, m)
            out = np.zeros(padded, dtype=np.float32)
            total = np.zeros(padded, dtype=np.float32)
            starts = [_tiles(n, qa, margin, blend_voxels, m) for n, qa in zip(padded, q)]
            for i in starts[0]:
                for j in starts[1]:
                    for k in starts[2]:
                        sl = (slice(i, i + q[0]), slice(j, j + q[1]), slice(k, k + q[2]))
                        wi, wj, wk = (_window(s, qa, n, margin, blend_voxels)
                                      for s, qa, n in zip((i, j, k), q, padded))
                        w = wi[:, None, None] * wj[None, :, None] * wk[None, None, :]
                        out[sl] += w * run(xp[(slice(None),) + sl])
                        total[sl] += w
            out /= total
    chi[mask] = box.extract(out)[mask]
    return chi
