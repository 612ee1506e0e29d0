"""The training loop: synthetic batches, L1 + L2 loss, RMSprop, checkpoints, resume, validation, export.

The loss is the masked L1 of the susceptibility, optionally plus QSMnet's (Yoon et al. 2018)
model loss ``dc_weight`` x L1 of the field of the error (:func:`dipole_error_l1`: errors the
measured field would show) and gradient-difference loss ``grad_weight`` x L1 of the error's
finite differences (:func:`gradient_error_l1`: blurred edges), plus L2 on the weights.

With ``network_data_consistency`` (lambda) the network trains through the k-space data-consistency
step (:func:`data_consistency_layer`) that inference applies after it with the same lambda
(``metaqsm --network-data-consistency``), and is scored (validation) after it; with
``network_data_consistency_edge_mm`` too, through the edge-weighted step that inference applies by default
(``--network-data-consistency-edge-mm``: the field weighted down within that distance of the mask's edge, one
majorize-minimize step; :func:`~metaqsm_bids.qsm.inversion.consistency.edge_weighted_steps`).

``tissue_only_fraction`` of the made crops are tissue only (:data:`TISSUE_ONLY`: no bleed or
calcification shapes, at most one vein). With the default mix (0-6 shapes up to 0.6 ppm and 0-4
veins per crop, 3 % of crops free of both) metaqsm-v3 leads TKD on crops but not on tissue-only
crops (1 mm: 80.9 vs 82.0 %), nor on the benchmark heads, whose contrast is tissue. Trained with half
of its crops tissue only it did worse on the heads, as did the loss terms above (BENCHMARKS.md,
"Training levers, scored on the heads"): both are off by default.

``texture_ppm`` gives every crop's tissue a texture of standard deviation drawn up to it, and
``hard_edges_fraction`` of the crops label-map tissue edges, and ``edge_background`` the field of sources just
outside the mask, what background removal leaves near the brain's edge (:func:`~metaqsm_bids.training.synth.make_sample`);
the validation crops are made the same way. ``lesion_ppm`` is the range of the random shapes' susceptibility
(bleeds, calcifications; metaqsm-v3's crops: -0.3 to 0.6 ppm, mirrored by the sign augmentation), which a clinical
haemorrhage (up to ~1.2 ppm) or calcification (to -1 ppm) exceeds; ``lesion_radius_mm`` the range of their
semi-axes (metaqsm-v3's: 0.75-8 mm, smaller than a large haemorrhage).

``small_patch_fraction`` of the made batches are crops of ``small_patch`` voxels instead of ``patch``: a
network trained on 128x128x64 crops only (metaqsm-v4) does worse than one trained on 64x64x32 crops on volumes
about as small as its view (a slab, a small field of view; BENCHMARKS.md, "Where v4 is worse than v3"). The
validation crops keep ``patch``. metaqsm-v5 trained from v4 with 30 % of 64x64x32 batches: better on the heads,
not on 64x64x32 crops (BENCHMARKS.md, "metaqsm-v5").

With ``ema`` (a decay, e.g. 0.999) a moving average of the weights is kept beside them (Polyak averaging): at batch 1
and a small learning rate the raw weights' scores on the heads swing 1-2 points between checkpoints; validation
scores the average and ``best.pt`` (what is exported) holds it, ``last.pt`` both.

A run directory holds ``run.json`` (training config and every command that ran in it),
``log.jsonl`` (one line per step), ``val.jsonl`` (one line per validation),
``last.pt`` (everything needed to resume) and ``best.pt`` (the network with the lowest
mean validation NRMSE). Batches are a pure function of ``(seed, step)``, so a resumed
run sees exactly the data an uninterrupted one would have.

Making samples costs several times the network's step on a CPU (~0.6 s for a batch of two 64x64x32
crops against ~0.15 s for the step, one thread, BENCHMARKS.md), so ``reuse`` > 1 lets each made batch serve that many
consecutive steps, each time stored differently (:func:`~metaqsm_bids.training.synth.augment`:
random axis reversals with B0 following, and the sign of the susceptibility), which the physics
allows and which teaches the network that how a volume is stored does not matter. With ``data_workers`` the made
batches are made ahead in worker processes (:class:`DataWorkers`), the same batches: on two cores, a 128x128x64 crop
a step at reuse-6's speed (1.48x the steps per hour of reuse 1 in-process); on a GPU the workers are what feeds it
(BENCHMARKS.md, "Training throughput with data workers").

A run can start from an exported model's weights (cumulative training, ``init_from``): it
takes the parent's architecture (or widens its input, :func:`~metaqsm_bids.qsm.network.networks.widen_input`:
a ``field+tkd`` parent can start a ``field+tkd+magnitude`` run, a ``field+tkd+magnitude`` one a ``field+tv+magnitude``
run), and its batches and learning-rate schedule continue from the
parent's step count, so the run goes on where the parent's data stream and schedule stopped.
The optimiser restarts warm (fresh RMSprop state): the state is not exported, because for
metaqsm-v3 (6.7 M parameters, 13.4 MB as float16) RMSprop's running squares alone would add
27 MB (float32) to a model budget of about 15 MB.
"""
import copy
import functools
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..io.processes import end_with_parent
from ..qsm.core.dipole import dipole_kernel, padded_shape
from ..qsm.inversion.consistency import edge_weight
from ..qsm.network.deepqsm import file_sha256, load_model, model_info, network_input
from ..qsm.inversion.tv import RHO_PER_ALPHA, TVParameters
from ..qsm.network.models import INPUTS, TV_INPUT_DEFAULTS
from ..qsm.network.networks import (DEFAULT_CONFIG, build_network, encode_condition, load_network, save_network,
                                    widen_input)
from .synth import LESION_PPM, LESION_RADIUS_MM, augment, make_sample

#: Held-out validation resolutions (mm): clinical 2D-like, the paper's SWI protocol, isotropic research data.
VALIDATION_VOXELS = ((0.5, 0.5, 2.0), (0.76, 0.76, 3.0), (1.0, 1.0, 1.0), (0.75, 0.75, 1.5))
NETWORK_KEYS = tuple(DEFAULT_CONFIG)
#: Training settings; the network's are :data:`DEFAULT_CONFIG`'s, with the residual-TKD input shipped and a TV-ADMM
#: input channel made with TV-ADMM's own defaults.
DEFAULTS = {
    **DEFAULT_CONFIG, "input": "field+tkd", "tv_iterations": TVParameters.iterations, "tv_rho_per_alpha": RHO_PER_ALPHA,
    "tv_weighting": TVParameters.weighting, "steps": 20000, "batch_size": 2, "patch": [64, 64, 32], "lr": 1e-4,
    "lr_decay": 0.98, "lr_decay_steps": 200, "l2": 0.01, "rmsprop_alpha": 0.9,
    "val_every": 250, "ckpt_every": 250, "val_samples": 2, "seed": 0, "supersample": 2, "init_from": None,
    "reuse": 1, "dc_weight": 0.0, "grad_weight": 0.0, "tissue_only_fraction": 0.0, "network_data_consistency": 0.0,
    "network_data_consistency_edge_mm": 0.0, "texture_ppm": 0.0, "hard_edges_fraction": 0.0, "edge_background": 0.0,
    "lesion_ppm": list(LESION_PPM), "lesion_radius_mm": list(LESION_RADIUS_MM), "ema": 0.0, "small_patch": None,
    "small_patch_fraction": 0.0,
}
#: Settings a run from before they existed trained with.
LEGACY_DEFAULTS = {"init_from": None, "reuse": 1, "dc_weight": 0.0, "grad_weight": 0.0, "tissue_only_fraction": 0.0,
                   "network_data_consistency": 0.0, "network_data_consistency_edge_mm": 0.0, "texture_ppm": 0.0,
                   "hard_edges_fraction": 0.0, "edge_background": 0.0, "lesion_ppm": list(LESION_PPM),
                   "lesion_radius_mm": list(LESION_RADIUS_MM), "ema": 0.0, "small_patch": None,
                   "small_patch_fraction": 0.0, **TV_INPUT_DEFAULTS}
#: A tissue-only crop: no bleed/calcification shapes and at most one vein (``make_sample``'s limits).
TISSUE_ONLY = {"max_shapes": 0, "max_veins": 1}


def load_parent(name):
    """The model a run starts from (``--init-from``) and its lineage.

    ``name`` is a model in the package data or the path of an exported ``NAME.pt`` (its
    ``NAME.json`` beside it). Returns the network (float32, its sha256 checked), the parent's
    ``.json`` metadata, and the lineage a run records as ``init_from``: the parent's name and
    sha256, its total steps and training wall time (s), counting its own ancestors'.
    """
    path = Path(name)
    name, models_dir = (path.stem, path.parent) if path.suffix == ".pt" else (name, None)
    model = load_model(name, "cpu", models_dir)
    meta = model_info(name, models_dir)
    # a model exported before lineage was recorded was trained from scratch
    lineage = {"name": name, "sha256": meta["sha256"], "steps": meta.get("cumulative_steps", meta["steps"]),
               "wall_time_s": meta.get("cumulative_wall_time_s", meta["wall_time_s"])}
    return model, meta, lineage


def _network_input(sample, cfg):
    """:func:`~metaqsm_bids.qsm.network.deepqsm.network_input` of ``sample`` with ``cfg``'s input settings."""
    return network_input(sample.field_ppm, sample.mask, sample.voxel_size_mm, sample.b0_dir, cfg["input"],
                         sample.magnitude, cfg["tv_iterations"], cfg["tv_rho_per_alpha"], cfg["tv_weighting"])


def _as_tensors(samples, cfg, inputs=None):
    """Stack samples into normalised network inputs, labels, masks and condition vectors; ``inputs``: the samples'
    ``(channels, scale)`` when already made (else made here)."""
    xs, ys, ms, conds, kernels, step_kernels, weights = [], [], [], [], [], [], []
    edge_mm = cfg.get("network_data_consistency_edge_mm", 0.0) if cfg.get("network_data_consistency", 0.0) else 0.0
    for i, s in enumerate(samples):
        x, scale = inputs[i] if inputs is not None else _network_input(s, cfg)
        xs.append(x)
        ys.append(s.chi_ppm / scale if scale > 0 else np.zeros_like(s.chi_ppm))
        ms.append(s.mask.astype(np.float32))
        conds.append(encode_condition(s.voxel_size_mm, s.b0_dir, cfg["conditioning"]))
        if cfg.get("dc_weight", 0.0):
            kernels.append(dipole_kernel(_dc_shape(s.mask.shape), s.voxel_size_mm, s.b0_dir, half=True))
        if cfg.get("network_data_consistency", 0.0):
            step_kernels.append(dipole_kernel(_step_shape(s.mask.shape), s.voxel_size_mm, s.b0_dir, half=True))
        if edge_mm:
            weight = edge_weight(s.mask, s.voxel_size_mm, edge_mm)
            weights.append(weight * weight)
    batch = {k: torch.from_numpy(np.stack(v))[:, None] for k, v in (("y", ys), ("mask", ms))}
    batch["x"] = torch.from_numpy(np.stack(xs))
    batch["cond"] = torch.stack(conds) if cfg["arch"] == "meta" else None
    batch["kernel"] = torch.from_numpy(np.stack(kernels))[:, None] if kernels else None
    batch["step_kernel"] = torch.from_numpy(np.stack(step_kernels))[:, None] if step_kernels else None
    batch["weight2"] = torch.from_numpy(np.stack(weights))[:, None] if weights else None
    return batch


def _dc_shape(shape):
    """The FFT grid of the model loss: each axis padded by half its length (the dipole field of a
    crop's sources reaches past the crop; without padding it would fold back in)."""
    return padded_shape(shape, [n // 2 for n in shape])


def _step_shape(shape):
    """The FFT grid of the data-consistency step: each axis padded by a quarter of its length per side, the box
    inference's step runs on (:class:`~metaqsm_bids.qsm.core.grid.PaddedBox`'s default) for a mask across the crop."""
    return padded_shape(shape, [n // 4 for n in shape])


@functools.lru_cache(maxsize=8)  # made batches that the next ``reuse`` - 1 steps use again (a few kB-MB each)
def _made_samples(seed, group, batch_size, patch, fixed_voxel_size_mm, conditioning, supersample,
                  tissue_only_fraction=0.0, texture_ppm=0.0, hard_edges_fraction=0.0, edge_background=0.0,
                  lesion_ppm=LESION_PPM, lesion_radius_mm=LESION_RADIUS_MM, small_patch=None, small_patch_fraction=0.0):
    rng = np.random.default_rng([seed, group])
    # drawn only when asked for, so that runs without it keep their data stream; one size per batch (stacked)
    if small_patch_fraction and rng.random() < small_patch_fraction:
        patch = small_patch
    samples = []
    for _ in range(batch_size):
        # drawn only when asked for, so that runs without them keep their data stream
        limits = TISSUE_ONLY if tissue_only_fraction and rng.random() < tissue_only_fraction else {}
        samples.append(make_sample(rng, patch, voxel_size_mm=fixed_voxel_size_mm, conditioning=conditioning,
                                   supersample=supersample, lesion_ppm=lesion_ppm,
                                   lesion_radius_mm=lesion_radius_mm, **limits,
                                   **_crop_options(rng, texture_ppm, hard_edges_fraction, edge_background)))
    return tuple(samples)


def _crop_options(rng, texture_ppm, hard_edges_fraction, edge_background):
    """``make_sample``'s options for one crop: a texture of standard deviation up to ``texture_ppm``
    (none at 0), label-map (hard) tissue edges with probability ``hard_edges_fraction``, and the field of
    sources just outside the mask of relative RMS up to ``edge_background`` (none at 0)."""
    style = {}
    if edge_background:
        style["edge_background"] = (0.0, float(edge_background))
    if texture_ppm:
        style["texture_ppm"] = (0.0, float(texture_ppm))
    if hard_edges_fraction:
        style["hard_edges"] = bool(rng.random() < hard_edges_fraction)
    return style


def _lesion_ranges(cfg):
    """``make_sample``'s ``lesion_ppm`` and ``lesion_radius_mm`` of ``cfg`` (tuples; a legacy run's where absent)."""
    return {key: tuple(cfg.get(key, LEGACY_DEFAULTS[key])) for key in ("lesion_ppm", "lesion_radius_mm")}


def _small_patch(cfg):
    """``_made_samples``' ``small_patch`` (a tuple) and ``small_patch_fraction`` of ``cfg`` (none where absent)."""
    small = cfg.get("small_patch")
    return {"small_patch": tuple(small) if small else None,
            "small_patch_fraction": cfg.get("small_patch_fraction", 0.0) if small else 0.0}


@functools.lru_cache(maxsize=8)  # the made batches' input channels, for the next ``reuse`` - 1 steps
def _made_inputs(made, input_kind, tv_iterations, tv_rho_per_alpha, tv_weighting):
    """The network inputs ``(channels, scale)`` of ``_made_samples(*made)``."""
    cfg = {"input": input_kind, "tv_iterations": tv_iterations, "tv_rho_per_alpha": tv_rho_per_alpha,
           "tv_weighting": tv_weighting}
    return tuple(_network_input(s, cfg) for s in _made_samples(*made))


def augment_input(channels, input_kind, flips=(), negate=False):
    """A sample's input ``channels`` (:func:`~metaqsm_bids.qsm.network.deepqsm.network_input`) as they are for the
    sample augmented alike (:func:`~metaqsm_bids.training.synth.augment`): reversed along ``flips``, and with
    ``negate`` every channel but the magnitude negated. Exact for the field; for the TKD and TV-ADMM channels up to
    float rounding (both are odd in the field, and a reversal with B0 following maps their kernels, gradients' pairs
    and edge masks onto the reversed ones); the scale (the field's RMS in the mask) is unchanged."""
    axes = tuple(sorted({int(a) + 1 for a in flips}))
    out = np.flip(channels, axes) if axes else channels
    if negate:
        sign = np.array([1 if name == "magnitude" else -1 for name in INPUTS[input_kind]], np.float32)
        out = out * sign[:, None, None, None]
    return np.ascontiguousarray(out)


def made_batch(cfg, group):
    """Made batch ``group`` of a run with ``cfg``: the key that fixes it (``_made_samples``' arguments) and the
    arguments of its input channels (``_made_inputs``' after the key); steps ``r*g .. r*g + r - 1`` use group ``g``
    (``r``: ``cfg['reuse']``)."""
    fixed = cfg["fixed_voxel_size_mm"]
    lesions, small = _lesion_ranges(cfg), _small_patch(cfg)
    key = (cfg["seed"], group, cfg["batch_size"], tuple(cfg["patch"]),
           tuple(fixed) if fixed is not None else None, cfg["conditioning"], cfg["supersample"],
           cfg.get("tissue_only_fraction", 0.0), cfg.get("texture_ppm", 0.0), cfg.get("hard_edges_fraction", 0.0),
           cfg.get("edge_background", 0.0), lesions["lesion_ppm"], lesions["lesion_radius_mm"],
           small["small_patch"], small["small_patch_fraction"])
    return key, (cfg["input"], cfg["tv_iterations"], cfg["tv_rho_per_alpha"], cfg["tv_weighting"])


def made_samples_and_inputs(key, input_args):
    """The samples of made batch ``key`` and their input channels (:func:`made_batch`), made in this process (and
    kept for the steps that reuse them) or, as a :class:`DataWorkers` task, in a worker's."""
    return _made_samples(*key), _made_inputs(key, *input_args)


def _in_process(cfg, group):
    """:func:`training_batch`'s default ``made``: made batch ``group`` made in this process."""
    return made_samples_and_inputs(*made_batch(cfg, group))


def training_batch(cfg, step, made=_in_process):
    """The batch for ``step``: a pure function of ``cfg['seed']``, ``cfg['reuse']`` and ``step``.

    With ``reuse`` r the samples made for steps ``r*g .. r*g + r - 1`` are the same (those of step
    ``g`` with r = 1), each step augmenting them anew (random axis reversals and sign); r = 1 gives
    the made samples as they are. Their input channels are made once per made batch and augmented with them (the
    TV-ADMM channel costs more than making the crop). ``made(cfg, group)`` gives made batch ``group``'s samples and
    input channels (:func:`made_samples_and_inputs`): in this process by default, or a :class:`DataWorkers`', the
    same arrays made ahead by worker processes."""
    reuse = int(cfg.get("reuse", 1))
    samples, inputs = made(cfg, step // reuse)
    if reuse > 1:
        rng = np.random.default_rng([cfg["seed"], step, 0, 1])  # length 4: no maker's (2) or validation's (3) key
        augmented_samples, augmented_inputs = [], []
        for s, (x, scale) in zip(samples, inputs):
            flips, negate = [a for a in range(3) if rng.random() < 0.5], rng.random() < 0.5
            augmented_samples.append(augment(s, flips, negate))
            augmented_inputs.append((augment_input(x, cfg["input"], flips, negate), scale))
        samples, inputs = augmented_samples, augmented_inputs
    return _as_tensors(samples, cfg, inputs)


class DataWorkers:
    """``training_batch``'s ``made``: made batches made ahead by ``workers`` processes (``spawn``ed: forking a process
    whose torch and OpenMP threads run can deadlock the child), the next ``workers`` groups always in the making,
    each worker with one torch thread and ending with this process, even if it is killed. The batches are those
    made in-process (pure functions of the run's seed and the group; pickled across). A context manager: leaving it
    stops the workers, with any batch still in the making.
    """

    def __init__(self, workers):
        if int(workers) != workers or workers < 1:
            raise ValueError(f"data workers must be a positive integer, got {workers!r}")
        self.ahead = int(workers)
        self._pool = ProcessPoolExecutor(self.ahead, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_data_worker_start, initargs=(os.getpid(),))
        self._futures = {}  # group -> the future of its made batch

    def __call__(self, cfg, group):
        for ahead in range(group, group + self.ahead + 1):
            if ahead not in self._futures:
                self._futures[ahead] = self._pool.submit(made_samples_and_inputs, *made_batch(cfg, ahead))
        for done in [g for g in self._futures if g < group]:  # groups no later step uses
            del self._futures[done]
        return self._futures[group].result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()


def _data_worker_start(parent):
    """A :class:`DataWorkers` process's start: one torch thread, its life tied to the training process's."""
    torch.set_num_threads(1)
    if not end_with_parent(signal.SIGKILL, parent):  # it holds nothing to clean up
        os._exit(1)


def validation_set(cfg):
    """Held-out samples at :data:`VALIDATION_VOXELS` (or the mesa resolution), from a seed stream
    disjoint from training's (different entropy length)."""
    voxels = [tuple(cfg["fixed_voxel_size_mm"])] if cfg["arch"] == "mesa" else VALIDATION_VOXELS
    out = {}
    for v_idx, voxel in enumerate(voxels):
        rng = np.random.default_rng([cfg["seed"], 7919, v_idx])
        samples = [make_sample(rng, cfg["patch"], voxel_size_mm=voxel, conditioning=cfg["conditioning"],
                               supersample=cfg["supersample"],
                               **_lesion_ranges(cfg),
                               **_crop_options(rng, cfg.get("texture_ppm", 0.0), cfg.get("hard_edges_fraction", 0.0),
                                               cfg.get("edge_background", 0.0)))
                   for _ in range(cfg["val_samples"])]
        out["x".join(f"{x:g}" for x in voxel)] = _as_tensors(samples, cfg)
    return out


def data_consistency_layer(pred, batch, lambda_):
    """The k-space data-consistency step of inference
    (:func:`~metaqsm_bids.qsm.inversion.consistency.data_consistency`) in torch, so that the network
    trains through it: ``IFFT((D FFT(f) + lambda FFT(pred)) / (D^2 + lambda))`` inside the masks, with
    ``f`` the normalised field (input channel 0) and the kernels in ``batch['step_kernel']`` (half spectra on
    :func:`_step_shape`). The network then only has to be right where the field says little (near the
    magic-angle cone): elsewhere the step replaces its output by the field's answer. With ``batch['weight2']``
    (the squared edge weight, :func:`_as_tensors`) it is inference's edge-weighted step instead: ``f`` replaced by
    ``W^2 f + (1 - W^2) D pred``, the network's own field where the field is not trusted."""
    shape = pred.shape[2:]
    fshape, dims = _step_shape(shape), (2, 3, 4)
    kernel, mask = batch["step_kernel"], batch["mask"]
    prior = torch.fft.rfftn(pred * mask, s=fshape, dim=dims)
    field = batch["x"][:, :1] * mask
    if batch.get("weight2") is not None:
        pad = [x for n, m in zip(reversed(shape), reversed(fshape)) for x in (0, m - n)]
        weight2 = torch.nn.functional.pad(batch["weight2"], pad)
        own_field = torch.fft.irfftn(prior * kernel, s=fshape, dim=dims)
        target = torch.nn.functional.pad(field, pad) * weight2 + (1 - weight2) * own_field
        spectrum = torch.fft.rfftn(target, dim=dims) * kernel + lambda_ * prior
    else:
        spectrum = torch.fft.rfftn(field, s=fshape, dim=dims) * kernel + lambda_ * prior
    chi = torch.fft.irfftn(spectrum / (kernel ** 2 + lambda_), s=fshape, dim=dims)
    return chi[..., : shape[0], : shape[1], : shape[2]] * mask


def predict(model, batch, cfg):
    """The network's susceptibility (normalised units), pulled onto the field when
    ``cfg['network_data_consistency']`` (lambda) is set."""
    pred = model(batch["x"], batch["cond"])
    lambda_ = cfg.get("network_data_consistency", 0.0)
    return data_consistency_layer(pred, batch, lambda_) if lambda_ else pred


def masked_l1(pred, batch):
    """Mean absolute error (normalised units) inside the masks."""
    return ((pred - batch["y"]).abs() * batch["mask"]).sum() / batch["mask"].sum().clamp_min(1)


def dipole_error_l1(pred, batch):
    """QSMnet's model loss: mean absolute field (normalised units) of the error ``pred - y`` inside the
    masks, by the dipole kernels in ``batch['kernel']`` (half spectra on :func:`_dc_shape`)."""
    shape = pred.shape[2:]
    fshape = _dc_shape(shape)
    err = (pred - batch["y"]) * batch["mask"]
    field = torch.fft.irfftn(torch.fft.rfftn(err, s=fshape, dim=(2, 3, 4)) * batch["kernel"], s=fshape, dim=(2, 3, 4))
    field = field[..., : shape[0], : shape[1], : shape[2]]
    return (field.abs() * batch["mask"]).sum() / batch["mask"].sum().clamp_min(1)


def gradient_error_l1(pred, batch):
    """QSMnet's gradient-difference loss: mean absolute forward difference (per voxel, each axis) of
    the error ``pred - y``, over the voxel pairs that both lie inside the masks."""
    err = pred - batch["y"]
    total, count = 0.0, 0.0
    for axis in (2, 3, 4):
        n = err.shape[axis]
        pair = batch["mask"].narrow(axis, 1, n - 1) * batch["mask"].narrow(axis, 0, n - 1)
        diff = err.narrow(axis, 1, n - 1) - err.narrow(axis, 0, n - 1)
        total = total + (diff.abs() * pair).sum()
        count = count + pair.sum()
    return total / max(float(count), 1.0)


def training_loss(pred, batch, cfg):
    """The data terms of the loss (the L2 on the weights is added by the loop): a dict of the
    total ``loss`` and each term, as tensors."""
    terms = {"l1": masked_l1(pred, batch)}
    if cfg.get("dc_weight", 0.0):
        terms["dc"] = dipole_error_l1(pred, batch)
    if cfg.get("grad_weight", 0.0):
        terms["grad"] = gradient_error_l1(pred, batch)
    terms["loss"] = terms["l1"] + cfg.get("dc_weight", 0.0) * terms.get("dc", 0.0) \
        + cfg.get("grad_weight", 0.0) * terms.get("grad", 0.0)
    return terms


def evaluate(model, val_set, device, cfg=None):
    """Per resolution: masked L1 and NRMSE (%, demeaned, as the 2016 challenge) of the network output
    (after the data-consistency step when ``cfg`` trains through it)."""
    model.eval()
    scores = {}
    with torch.no_grad():
        for key, batch in val_set.items():
            batch = _to(batch, device)
            pred = predict(model, batch, cfg or {})
            m = batch["mask"] > 0
            errs = []
            for b in range(pred.shape[0]):
                p, y = pred[b][m[b]], batch["y"][b][m[b]]
                p, y = p - p.mean(), y - y.mean()
                errs.append(100 * float((p - y).norm() / y.norm().clamp_min(1e-12)))
            scores[key] = {"l1": float(masked_l1(pred, batch)), "nrmse": float(np.mean(errs))}
    model.train()
    return scores


def _to(batch, device):
    return {k: (v.to(device) if v is not None else None) for k, v in batch.items()}


def hardware_description(device):
    """One line: CPU, thread count, torch version and the GPU if used."""
    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if str(device).startswith("cuda"):
        text += f", {torch.cuda.get_device_name(0)}"
    return text


class _Progress:
    """tqdm when installed, else a plain bar printed every few percent."""

    def __init__(self, start, total, enabled):
        self.bar = None
        self.total, self.enabled, self.shown = total, enabled, start
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step, loss):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif step == self.total or step - self.shown >= max(self.total // 50, 1):
            self.shown = step
            done = int(30 * step / self.total)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} loss {loss:.4f}", end="", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print()


def train(cfg, out_dir, resume=False, device="cpu", progress=True, command=None, parent=None, data_workers=0):
    """Train (or continue) a network in ``out_dir`` up to ``cfg['steps']`` steps; returns the final state.

    With ``resume`` the run continues from ``last.pt`` (network settings must match;
    ``steps`` and the logging cadence may change). ``command`` (the command line) is appended
    to ``run.json`` for provenance. A new run starts from the weights of ``parent`` (a network
    from :func:`load_parent`, whose lineage is ``cfg['init_from']`` and whose config must be
    ``cfg``'s) instead of a random initialisation; ``cfg['steps']`` counts this run's steps. ``data_workers`` > 0
    makes the batches ahead in that many processes (:class:`DataWorkers`; the same batches as in this process).
    """
    cfg = {**DEFAULTS, **cfg}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    if resume and last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        cfg, model = _resumed_network(cfg, ckpt)
        step, best, wall = ckpt["step"], ckpt["best_nrmse"], ckpt["wall_s"]
    elif last.exists():
        raise ValueError(f"{out} already holds a run (last.pt): pass --resume to continue it or choose another --out")
    else:
        model = _new_network(cfg, parent)
        ckpt, step, best, wall = None, 0, math.inf, 0.0
    model.to(device).train()
    average = None
    if cfg["ema"]:  # the weights' moving average, which validation scores and best.pt keeps
        average = copy.deepcopy(model)
        if ckpt is not None and "ema" in ckpt:
            average.load_state_dict(ckpt["ema"])
        average.requires_grad_(False)
    optimiser = torch.optim.RMSprop(model.parameters(), lr=cfg["lr"], alpha=cfg["rmsprop_alpha"])
    if ckpt is not None:
        optimiser.load_state_dict(ckpt["optimizer"])
    _record_command(out / "run.json", cfg, command, step, device)

    val_set = validation_set(cfg)
    bar = _Progress(step, cfg["steps"], progress)
    offset = cfg["init_from"]["steps"] if cfg["init_from"] else 0  # data and schedule go on from the parent's
    t_start = time.time()
    with (open(out / "log.jsonl", "a") as log,
          DataWorkers(data_workers) if data_workers else nullcontext(_in_process) as made):
        while step < cfg["steps"]:
            loss = _train_step(model, average, optimiser, cfg, step, offset, device, log, made)
            step += 1
            bar.update(step, loss)
            if step % cfg["val_every"] == 0 or step == cfg["steps"]:
                log.flush()
                scored = average if average is not None else model
                scores = evaluate(scored, val_set, device, cfg)
                mean_nrmse = float(np.mean([s["nrmse"] for s in scores.values()]))
                with open(out / "val.jsonl", "a") as vlog:
                    vlog.write(json.dumps({"step": step, "mean_nrmse": mean_nrmse, "scores": scores}) + "\n")
                if mean_nrmse < best:
                    best = mean_nrmse
                    _save(out / "best.pt", scored, optimiser, cfg, step, best, wall + time.time() - t_start, scores)
            if step % cfg["ckpt_every"] == 0 or step == cfg["steps"]:
                _save(last, model, optimiser, cfg, step, best, wall + time.time() - t_start, None, average)
    bar.close()
    return {"step": step, "best_nrmse": best, "wall_s": wall + time.time() - t_start}


#: Settings a resumed run must share with its checkpoint besides :data:`NETWORK_KEYS`: they shape the data or the loss.
RESUME_FIXED_KEYS = ("patch", "batch_size", "seed", "supersample", "init_from", "dc_weight", "grad_weight",
                     "tissue_only_fraction", "network_data_consistency", "network_data_consistency_edge_mm",
                     "texture_ppm", "hard_edges_fraction", "edge_background", "lesion_ppm", "lesion_radius_mm", "ema",
                     "small_patch", "small_patch_fraction")


def _resumed_network(cfg, ckpt):
    """The run's config and network from checkpoint ``ckpt``; only ``steps`` and the cadences come from ``cfg``,
    any other setting that differs from the checkpoint's is a ValueError."""
    old = {**LEGACY_DEFAULTS, **ckpt["train_cfg"]}
    # a key the checkpoint lacks (a run from before that setting existed) counts as changed
    changed = [k for k in NETWORK_KEYS + RESUME_FIXED_KEYS if k not in old or _norm(old[k]) != _norm(cfg[k])]
    if changed:
        raise ValueError(f"--resume with settings that differ from the checkpoint's: {', '.join(changed)}")
    cfg = {**old, **{k: cfg[k] for k in ("steps", "val_every", "ckpt_every", "reuse")}}
    model = build_network({k: cfg[k] for k in NETWORK_KEYS})
    model.load_state_dict(ckpt["model"])
    return cfg, model


def _new_network(cfg, parent):
    """A new run's network: seeded random weights, or ``parent``'s (its input widened where ``cfg`` asks more)."""
    torch.manual_seed(cfg["seed"])
    model = build_network({k: cfg[k] for k in NETWORK_KEYS})
    if (parent is None) != (cfg["init_from"] is None):
        raise ValueError("a run from a parent model needs both the parent network and its lineage (init_from)")
    if parent is not None:
        if parent.config["input"] != model.config["input"]:
            # new input channels start at zero weight; a swapped estimate channel keeps its weights
            parent = widen_input(parent, model.config["input"])
        if any(parent.config[k] != v for k, v in model.config.items() if k not in TV_INPUT_DEFAULTS):
            raise ValueError(f"the parent's network settings {parent.config} differ from the run's {model.config}")
        model.load_state_dict(parent.state_dict())  # the parent's exact (float16-stored) weights, as float32
    return model


def _record_command(run_file, cfg, command, step, device):
    """Write ``cfg`` to ``run_file`` (run.json) and append this command, its start step, date and hardware."""
    run = json.loads(run_file.read_text()) if run_file.exists() else {"train_cfg": cfg, "commands": []}
    run["train_cfg"] = cfg
    run["commands"].append({"command": command or " ".join(sys.argv), "start_step": step,
                            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "hardware": hardware_description(device)})
    run_file.write_text(json.dumps(run, indent=2))


def _train_step(model, average, optimiser, cfg, step, offset, device, log, made):
    """The run's step ``step`` (0-based): one optimiser step on batch ``offset + step`` (its made batch from
    ``made``, :func:`training_batch`'s) with the learning rate decayed to it, the moving ``average`` (if any) updated,
    the step's line written to ``log``; returns the loss."""
    lr = cfg["lr"] * cfg["lr_decay"] ** ((offset + step) // cfg["lr_decay_steps"])
    for group in optimiser.param_groups:
        group["lr"] = lr
    t0 = time.time()
    batch = _to(training_batch(cfg, offset + step, made), device)
    t_data = time.time() - t0
    terms = training_loss(predict(model, batch, cfg), batch, cfg)
    reg = sum(p.pow(2).sum() for p in model.regularised_parameters())
    loss = terms["loss"] + cfg["l2"] * reg
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    if average is not None:
        with torch.no_grad():
            for a, p in zip(average.parameters(), model.parameters()):
                a.lerp_(p, 1.0 - cfg["ema"])
    log.write(json.dumps({"step": step + 1, "loss": loss.item(),
                          **{k: v.item() for k, v in terms.items() if k != "loss"}, "l2": reg.item(),
                          "lr": lr, "data_s": round(t_data, 3), "step_s": round(time.time() - t0, 3)}) + "\n")
    return loss.item()


def _norm(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def _save(path, model, optimiser, cfg, step, best, wall, scores, average=None):
    tmp = path.with_suffix(".tmp")  # write then rename: an interrupted save never corrupts a checkpoint
    torch.save({"model": model.state_dict(), "optimizer": optimiser.state_dict(), "train_cfg": cfg, "step": step,
                "best_nrmse": best, "wall_s": wall, "val_scores": scores, "network": model.config,
                **({"ema": average.state_dict()} if average is not None else {})}, tmp)
    os.replace(tmp, path)


def export_model(run_dir, name, models_dir, checkpoint="best"):
    """Write ``<name>.pt`` (float16 weights, config) and ``<name>.json`` (provenance) from a run's checkpoint.

    The provenance holds the lineage: ``init_from`` (the parent's name, sha256, total steps and wall
    time; None for a run from scratch), ``cumulative_steps`` (the parent's total plus the exported
    checkpoint's steps in this run) and ``cumulative_wall_time_s`` (the parent's plus this run's).
    """
    run_dir, models_dir = Path(run_dir), Path(models_dir)
    source = run_dir / f"{checkpoint}.pt"
    if not source.exists():
        source = run_dir / "last.pt"
    if not source.exists():
        raise ValueError(f"{run_dir} has no checkpoint to export")
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    model = build_network(ckpt["network"])
    model.load_state_dict(ckpt["model"])
    models_dir.mkdir(parents=True, exist_ok=True)
    pt = models_dir / f"{name}.pt"
    save_network(model, pt, half=True)
    load_network(pt)  # fail here, not at the user's, if the file does not load
    run = json.loads((run_dir / "run.json").read_text())
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    lineage = ckpt["train_cfg"].get("init_from")  # absent in runs from before init_from
    parent_steps, parent_wall = (lineage["steps"], lineage["wall_time_s"]) if lineage else (0, 0.0)
    meta = {
        "name": name, "sha256": file_sha256(pt), "config": model.config,
        "recipe": {k: v for k, v in ckpt["train_cfg"].items() if k not in NETWORK_KEYS + ("init_from",)},
        "commands": run["commands"], "exported_checkpoint": checkpoint if source.stem == checkpoint else "last",
        "steps": ckpt["step"], "steps_trained_in_run": last["step"], "wall_time_s": round(last["wall_s"], 1),
        "init_from": lineage, "cumulative_steps": parent_steps + ckpt["step"],
        "cumulative_wall_time_s": round(parent_wall + last["wall_s"], 1),
        "hardware": run["commands"][-1]["hardware"], "validation": {"mean_nrmse": ckpt["best_nrmse"],
                                                                    "scores": ckpt["val_scores"]},
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (models_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return pt


def average_models(sources, name, models_dir, command=None):
    """Write ``<name>.pt`` and ``<name>.json``: the mean of the weights of the exported models ``sources`` (each a
    model in the package data or the path of an exported ``NAME.pt``, its ``NAME.json`` beside it; one architecture).

    Runs that start from one parent (``init_from``) stay in its basin, so their average is a network too, often a
    better one than each (a "model soup": Wortsman et al. 2022, ICML): where fine-tunings of one model trade one kind
    of input for another, the average keeps most of each one's gain. The ``.json`` records each source's name, sha256,
    lineage, steps and commands (``average_of``), the command that averaged them, and the validation scores of the
    average on the first source's validation crops (its recipe's seed and sizes, as its run made them).
    """
    if len(sources) < 2:
        raise ValueError("averaging takes two or more models")
    loaded = [load_parent(source) for source in sources]
    configs = {json.dumps(model.config, sort_keys=True) for model, _, _ in loaded}
    if len(configs) > 1:
        raise ValueError(f"the models to average differ in architecture or input: {sorted(configs)}")
    states = [model.state_dict() for model, _, _ in loaded]
    model = loaded[0][0]
    model.load_state_dict({key: sum(state[key].double() for state in states).div(len(states)).to(value.dtype)
                           for key, value in states[0].items()})
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    pt = models_dir / f"{name}.pt"
    save_network(model, pt, half=True)
    first = loaded[0][1]
    cfg = {**DEFAULTS, **LEGACY_DEFAULTS, **first["recipe"], **model.config}
    try:  # scored as it ships (float16 weights); no .pt left without its .json
        scores = evaluate(load_network(pt), validation_set(cfg), "cpu", cfg)
    except BaseException:
        pt.unlink()
        raise
    sources_meta = [{"name": lineage["name"], "sha256": lineage["sha256"], "cumulative_steps": lineage["steps"],
                     "cumulative_wall_time_s": lineage["wall_time_s"], "init_from": source_meta.get("init_from"),
                     "commands": source_meta["commands"]} for _, source_meta, lineage in loaded]
    # training time once: each source's own run, and the parents that are not sources themselves
    own = {source["sha256"]: source["cumulative_wall_time_s"] - (source["init_from"] or {}).get("wall_time_s", 0.0)
           for source in sources_meta}
    parents = {source["init_from"]["sha256"]: source["init_from"]["wall_time_s"] for source in sources_meta
               if source["init_from"] and source["init_from"]["sha256"] not in own}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = {
        "name": name, "sha256": file_sha256(pt), "config": model.config, "average_of": sources_meta,
        "commands": [{"command": command, "date": now}],
        "hardware": hardware_description("cpu"), "recipe": first["recipe"],
        "steps": 0, "wall_time_s": 0.0,  # trained none itself
        # where a run from this model continues the batches and the learning-rate schedule: the latest source's
        "cumulative_steps": max(source["cumulative_steps"] for source in sources_meta),
        "cumulative_wall_time_s": round(sum(own.values()) + sum(parents.values()), 1),
        "validation": {"mean_nrmse": float(np.mean([score["nrmse"] for score in scores.values()])), "scores": scores},
        "exported": now,
    }
    (models_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return pt
