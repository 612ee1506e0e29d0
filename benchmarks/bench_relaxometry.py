#!/usr/bin/env python
"""R2* and T2* maps (issue 29) on the stage benchmark's qsm-forward heads, against the simulator's R2*.

The heads of ``benchmarks/qsmforward_heads.py`` (four protocols, peak SNR 100 per echo, shim and phase offset
on): their magnitude is qsm-forward's complex signal ``M0 exp(-TE R2*) exp(i phase)`` on the phantom grid,
k-space cropped to the acquisition grid, plus complex noise. The truth is the phantom's R2* map
(``<cache>/<protocol>/phantom/R2star.nii.gz``, 1/s at 3 T, one value per tissue label) resampled to the
acquisition grid as qsm-forward resamples its labels (its ``resize``, linear). qsm-forward's ``dseg`` gives the
regions: white matter (label 8), cortical grey matter (9) and the deep grey nuclei (1-7: caudate, pallidum,
putamen, red nucleus, dentate, substantia nigra, thalamus). Per protocol and fit it prints the median of the
relative error ``R2*/truth - 1`` in each region (all its voxels, and its ``interior``: voxels whose 3x3x3
neighbourhood holds one label, away from partial volume), the median absolute relative error, and the seconds
of :func:`metaqsm_bids.qsm.field.relaxometry.estimate_r2star` (on the true brain mask, which holds every voxel of
these regions; one thread).

The k-space crop (slices 2-3x thicker than the phantom's 1 mm in three protocols) and the field gradients
across a voxel (near sinuses, veins) make the decay of a voxel multi-exponential: the fit returns its
effective rate, which is what a scanner's R2* map holds, too.

Usage: python benchmarks/bench_relaxometry.py [--cache DIR] [--protocols ...] [--methods loglinear arlo]
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import qsm_forward.qsm_forward as qf  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qsmforward_heads import PROTOCOLS, simulate  # noqa: E402

from metaqsm_bids.qsm.field.relaxometry import estimate_r2star  # noqa: E402

REGIONS = {"WM": (8,), "GM": (9,), "deep GM": (1, 2, 3, 4, 5, 6, 7)}


def true_r2star(sim, cache):
    """The phantom's R2* (1/s) on the acquisition grid, resampled as qsm-forward resamples its outputs."""
    path = Path(cache) / sim.protocol.name / "phantom" / "R2star.nii.gz"
    resized = qf.resize(nib.load(path), np.array(sim.protocol.voxel_mm), "linear")
    data = np.asarray(resized.dataobj, dtype=np.float32)
    if data.shape != sim.seg.shape:
        raise ValueError(f"{path}: resampled to {data.shape}, the acquisition grid is {sim.seg.shape}")
    return data


def score(r2star, truth, seg):
    """Per region: (median relative error, median |relative error|, voxels) over all its voxels and its interior."""
    # one label in the 3x3x3 neighbourhood: min and max filters agree
    uniform = ndi.minimum_filter(seg, size=3) == ndi.maximum_filter(seg, size=3)
    rows = {}
    for region, labels in REGIONS.items():
        inside = np.isin(seg, labels) & (truth > 0)
        for scope, where in (("all", inside), ("interior", inside & uniform)):
            error = r2star[where] / truth[where] - 1
            rows[region, scope] = (float(np.median(error)), float(np.median(np.abs(error))), int(where.sum()))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="bench_cache/qsmforward", help="simulations (reused)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--methods", nargs="+", default=["loglinear", "arlo"], choices=["loglinear", "arlo"])
    args = parser.parse_args(argv)
    print("| protocol | grid | echoes | fit | WM median err (interior) | GM median err (interior) "
          "| deep GM median err (interior) | median abs err WM/GM/deep | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.protocols:
        sim = simulate(name, args.cache)
        truth, seg = true_r2star(sim, args.cache), sim.seg
        tes = sim.protocol.echo_times_s
        for method in args.methods:
            start = time.perf_counter()
            result = estimate_r2star(sim.magnitude, tes, mask=sim.brain_mask, method=method)
            seconds = time.perf_counter() - start
            rows = score(result.r2star_hz, truth, seg)
            cells = [f"{100 * rows[r, 'all'][0]:+.1f} % ({100 * rows[r, 'interior'][0]:+.1f} %)" for r in REGIONS]
            absolute = "/".join(f"{100 * rows[r, 'all'][1]:.1f}" for r in REGIONS) + " %"
            grid = "x".join(str(n) for n in sim.magnitude.shape[:3])
            print(f"| {name} | {grid} | {len(tes)} ({1e3 * tes[0]:g}-{1e3 * tes[-1]:g} ms) | {result.method} | "
                  + " | ".join(cells) + f" | {absolute} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
