#!/usr/bin/env python
"""Lesions in the map: haemorrhages, calcifications and microbleeds on the stage benchmark's qsm-forward heads.

The heads of ``benchmarks/qsmforward_heads.py`` with :data:`metaqsm_bids.sim.mni_head.LESIONS` (never
in any training data): haemorrhages of 0.4-1.2 ppm and 3-22 mm, calcifications of -0.2 and -1 ppm,
microbleeds of 1-3 mm, besides the head's veins, sinus and small calcification. Per protocol, mode
and inversion it prints each lesion's

* ``truth`` and ``recon``: mean chi (ppm) in its core (its voxels on the acquisition grid eroded by
  one voxel; all of them when that leaves none), each relative to its mean over the scored region;
* ``cover``: the fraction of its voxels in the QSM mask;
* ``moment``, ``streak``: QSM-CI's calcification metrics (``calcification_metrics``: moment
  deviation, streak level) with this lesion as the calcification (sign-flipped for a positive one);
* ``shell``: the error RMS (ppm) in the 5 mm shell around it (inside the QSM mask);

and the whole-brain metrics of ``bench_stages.py`` (QSM-CI's ``challenge_metrics`` inside the
method's mask and the true brain eroded by one voxel). Modes:

* ``true-local``: each inversion of the TRUE local field on the true brain mask (the inversion's own
  ceiling for these numbers);
* ``before``: the pipeline's steps in-process as they were before lesions were kept (the pipeline's brain mask
  and total field, then the reliability map as the QSM mask: PDF fitted and the inversion run on the reliable
  voxels only);
* ``pipeline``: the CLI's participant run in-process, default options but ``--inversion`` (and ``--pipeline-bfr``)
  (:func:`metaqsm_bids.steps.pipeline.local_field_maps` then :func:`~metaqsm_bids.steps.pipeline.susceptibility`:
  the same numbers as ``composed``);
* ``composed``: the real ``metaqsm`` CLI from the raw phase, default options but ``--inversion``.

Usage: python benchmarks/bench_lesions.py [--cache DIR] [--protocols ...] [--inversions tkd metaqsm]
           [--modes true-local before pipeline composed] [--network-data-consistency LAMBDA]
           [--network-data-consistency-edge-mm MM] [--pipeline-bfr METHOD] [--realistic-magnitude]
           [--json results.json]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import qsm_forward.qsm_forward as qf
import scipy.fft as sfft
from qsm_ci.qsm_eval import calcification_metrics
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))
from bench_stages import _invert, pipeline_inputs, score  # noqa: E402
from qsmforward_heads import PROTOCOLS, SUBJECT, simulate  # noqa: E402
from score import read_output  # noqa: E402

from metaqsm_bids.qsm.background.registry import (BACKGROUND_REMOVALS, DEFAULT_BACKGROUND_REMOVAL,  # noqa: E402
                                                   remove_background)
from metaqsm_bids.qsm.core import physics  # noqa: E402
from metaqsm_bids.qsm.field.reliability import reliable_voxels  # noqa: E402
from metaqsm_bids.qsm.inversion.consistency import DEFAULT_EDGE_MM, DEFAULT_LAMBDA  # noqa: E402
from metaqsm_bids.qsm.inversion.registry import INVERSIONS  # noqa: E402
from metaqsm_bids.sim.mni_head import LESIONS, mni_head  # noqa: E402
from metaqsm_bids.steps.pipeline import local_field_maps, susceptibility  # noqa: E402

SHELL_MM = 5.0
WHOLE_BRAIN = ("nrmse", "hfen", "xsim", "nrmse_blood", "calc_streak")


def lesion_map(sim):
    """Lesion index (n: ``LESIONS[n - 1]``) on the acquisition grid, resized as qsm-forward resizes its seg."""
    path = Path(sim.bids_dir).parent / "lesion_index.nii.gz"  # beside the simulation
    if not path.exists():
        head = mni_head(sim.protocol.phantom_mm, lesions=True)
        resized = qf.resize(nib.Nifti1Image(head.lesion.astype(np.float32), head.affine),
                            np.array(sim.protocol.voxel_mm), "nearest")
        nib.save(nib.Nifti1Image(np.rint(resized.get_fdata()).astype(np.uint8), np.eye(4)), path)
    index = np.asarray(nib.load(path).dataobj)
    if index.shape != sim.chi_ppm.shape:
        raise RuntimeError(f"lesion map {index.shape} is not on the simulation's grid {sim.chi_ppm.shape}")
    return index


def lesion_rows(chi, sim, mask, index, voxel):
    """Per-lesion figures (see the module text) of ``chi`` with QSM mask ``mask``."""
    region = mask & ndi.binary_erosion(sim.brain_mask)
    chi_ref = chi - chi[region].mean(dtype=np.float64)
    truth_ref = sim.chi_ppm - sim.chi_ppm[region].mean(dtype=np.float64)
    rows = {}
    for n, lesion in enumerate(LESIONS, start=1):
        voxels = index == n
        if not voxels.any():
            rows[lesion.name] = {"absent": True}
            continue
        core = ndi.binary_erosion(voxels)
        core = core if core.any() else voxels
        sign = 1.0 if lesion.chi_ppm > 0 else -1.0
        seg = np.where(voxels, 16, 0)
        moment, streak = calcification_metrics(sign * chi.astype(np.float64), sign * sim.chi_ppm.astype(np.float64),
                                               seg)
        shell = ndi.distance_transform_edt(~voxels, sampling=voxel)
        shell = (shell > 0) & (shell <= SHELL_MM) & mask
        error = chi_ref - truth_ref
        rows[lesion.name] = {
            "truth": float(truth_ref[core].mean()), "recon": float(chi_ref[core].mean()),
            "cover": float(mask[voxels].mean()), "moment": float(moment), "streak": float(streak),
            "shell": float(np.sqrt(np.mean(error[shell] ** 2))) if shell.any() else float("nan"),
        }
    return rows


def run_cli(sim, method, out_root):
    exe = Path(sys.executable).with_name("metaqsm")
    out = out_root / f"out-{method}"
    start = time.perf_counter()
    run = subprocess.run([str(exe), str(sim.bids_dir), str(out), "participant", "-w", str(out_root / "work"),
                          "--inversion", method, "--nprocs", "1", "--omp-nthreads", "2"], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"metaqsm --inversion {method} failed: {run.stderr.strip()[-500:]}")
    chi = read_output(out, "chimap", SUBJECT, np.float32)
    qsm_mask = read_output(out, "qsm_mask", SUBJECT) > 0
    return chi, qsm_mask, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="bench_cache/qsmforward", help="simulations and CLI outputs (reused)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--inversions", nargs="+", default=["tkd", "metaqsm"], choices=sorted(INVERSIONS))
    parser.add_argument("--modes", nargs="+", default=["true-local", "before", "composed"],
                        choices=["true-local", "before", "pipeline", "composed"])
    parser.add_argument("--network-data-consistency", type=float, metavar="LAMBDA", default=DEFAULT_LAMBDA,
                        help="the networks' k-space data-consistency step (the CLI's option of the same name and "
                             "default; 0: off) in the true-local, before and pipeline modes")
    parser.add_argument("--network-data-consistency-edge-mm", type=float, metavar="MM", default=DEFAULT_EDGE_MM,
                        help="its field weighted down within MM of the mask's edge (the CLI's option and default; "
                             "0: the closed form)")
    parser.add_argument("--realistic-magnitude", action="store_true",
                        help="the heads whose magnitude is no oracle for chi (mni_head's realistic_magnitude)")
    parser.add_argument("--pipeline-bfr", default=DEFAULT_BACKGROUND_REMOVAL, choices=sorted(BACKGROUND_REMOVALS),
                        help="background removal of the pipeline mode (the CLI's --bfr; its default: PDF)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    results = {}
    with sfft.set_workers(args.threads):
        for name in args.protocols:
            sim = simulate(name, args.cache, lesions=True, realistic_magnitude=args.realistic_magnitude)
            index = lesion_map(sim)
            voxel = physics.voxel_size_mm(sim.affine)
            b0_dir = physics.b0_direction_voxel(sim.affine)
            tes = sim.protocol.echo_times_s
            rss = np.sqrt((sim.magnitude ** 2).sum(-1)).astype(np.float32)
            print(f"\n== {name}: {sim.chi_ppm.shape} voxels of {tuple(sim.protocol.voxel_mm)} mm", flush=True)
            maps = {}  # (mode, inversion) -> (chi, mask, seconds)

            def parameters(method):
                """The inversion's parameters: the networks' data-consistency step as ``--network-data-consistency``."""
                return INVERSIONS[method].own({
                    "data_consistency_lambda": args.network_data_consistency or None,
                    "data_consistency_edge_mm": args.network_data_consistency_edge_mm or None})

            def invert(method, local_hz, mask):
                """The CLI's inversion step."""
                return _invert(method, local_hz, mask, voxel, b0_dir, rss, tes, parameters(method), {})
            if "true-local" in args.modes:
                for method in args.inversions:
                    start = time.perf_counter()
                    chi = invert(method, sim.local_field_hz, sim.brain_mask)
                    maps["true-local", method] = chi, sim.brain_mask, time.perf_counter() - start
            if {"before", "pipeline"} & set(args.modes):
                pipeline = local_field_maps(**pipeline_inputs(sim), bfr=args.pipeline_bfr)  # the CLI's defaults
                if "before" in args.modes:
                    reliable = reliable_voxels(pipeline.brain_mask, pipeline.magnitude_rss, pipeline.fit_residual_rad)
                    bfr = remove_background("pdf", pipeline.total_field_hz, reliable, voxel, b0_dir,
                                            magnitude=pipeline.magnitude_rss)
                    for method in args.inversions:
                        start = time.perf_counter()
                        chi = invert(method, bfr.local_field, bfr.mask)
                        maps["before", method] = chi, bfr.mask, time.perf_counter() - start
                if "pipeline" in args.modes:
                    for method in args.inversions:
                        start = time.perf_counter()
                        chi = susceptibility(pipeline, inversion=method, inversion_params=parameters(method)).chimap
                        maps["pipeline", method] = chi, pipeline.qsm_mask, time.perf_counter() - start
            if "composed" in args.modes:
                for method in args.inversions:
                    maps["composed", method] = run_cli(sim, method, Path(sim.bids_dir).parent / "cli")
            res = results[name] = {}
            print("\n  whole brain")
            print("  | mode | inversion | " + " | ".join(WHOLE_BRAIN) + " | coverage | seconds |")
            for (mode, method), (chi, mask, seconds) in maps.items():
                s = score(chi, sim, mask)
                coverage = float(np.count_nonzero(mask & sim.brain_mask) / sim.brain_mask.sum())
                lesions = lesion_rows(chi, sim, mask, index, voxel)
                res[f"{mode} {method}"] = {"whole_brain": {k: float(s[k]) for k in WHOLE_BRAIN}, "coverage": coverage,
                                           "seconds": seconds, "lesions": lesions}
                print(f"  | {mode} | {method} | " + " | ".join(f"{s[k]:.3f}" for k in WHOLE_BRAIN)
                      + f" | {coverage:.4f} | {seconds:.0f} |")
            print("\n  lesions: core mean recon / truth (ppm), coverage, moment deviation, streak, 5 mm shell RMS (ppm)")
            print("  | lesion | truth | " + " | ".join(f"{m} {i}" for m, i in maps) + " |")
            for n, lesion in enumerate(LESIONS, start=1):
                cells = []
                truth = None
                for key in maps:
                    row = res[f"{key[0]} {key[1]}"]["lesions"][lesion.name]
                    if row.get("absent"):
                        cells.append("absent")
                        continue
                    truth = row["truth"]
                    cells.append(f"{row['recon']:+.2f} ({row['recon'] / row['truth']:.2f}) cov {row['cover']:.2f} "
                                 f"m {row['moment']:.1f} s {row['streak']:.2f} sh {row['shell']:.3f}")
                print(f"  | {lesion.name} | " + (f"{truth:+.2f}" if truth is not None else "-") + " | "
                      + " | ".join(cells) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
