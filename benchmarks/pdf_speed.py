"""PDF's variants (issue 31) side by side in one process, interleaved, each timed ``--repeats`` times (median), on
the stage benchmark's qsm-forward heads: the default; the padding before it (20 voxels per side on every axis, the
MEDI toolbox's, where the default pads 20 voxels of the finest axis and the same mm on the others); the source
preconditioner (``pdf(..., source_scale_mm=...)``, an option). From two fields:

* ``true``: the TRUE total field on the true brain mask, magnitude weights (RSS over echoes);
* ``pipeline``: the pipeline's own total field (echo fit of the raw phase), on its QSM region with weight 0 on the
  unreliable voxels, as :func:`~metaqsm_bids.steps.local_field.estimate_local_field` runs PDF (before completion).

Prints per protocol, field and variant: its FFT box, CG iterations, median seconds, the time ratio to the default,
and the local
field's relative error against the true local field (demeaned; in the brain, or in the reliable voxels of the QSM
region for ``pipeline``) and TKD's NRMSE % of it (``bench_stages.score``, in the same region).

    python benchmarks/pdf_speed.py --cache bench_cache/qsmforward [--realistic-magnitude] [--variants ...]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stages import mask_stage, relative_error, score  # noqa: E402
from qsmforward_heads import B0_TESLA, PROTOCOLS, simulate  # noqa: E402

from metaqsm_bids.qsm.background.pdf import SOURCE_SCALE_MM, padded_box, pdf  # noqa: E402
from metaqsm_bids.qsm.core import physics  # noqa: E402
from metaqsm_bids.qsm.inversion.tkd import tkd  # noqa: E402
from metaqsm_bids.steps.brain_mask import magnitude_rss  # noqa: E402
from metaqsm_bids.steps.local_field import reliability_map  # noqa: E402
from metaqsm_bids.steps.total_field import estimate_total_field  # noqa: E402

#: name -> pdf()'s keywords; the first is the default, the time ratios' reference.
VARIANTS = {"default": {}, "20 voxels per side (before)": {"pad_voxels": 20},
            f"preconditioned, {SOURCE_SCALE_MM:g} mm (option)": {"source_scale_mm": SOURCE_SCALE_MM}}


def inputs(sim, field_kind, voxel):
    """(total field Hz, PDF's mask, its weight, the region scored) for ``field_kind``."""
    if field_kind == "true":
        return sim.total_field_hz, sim.brain_mask, magnitude_rss(sim.magnitude), sim.brain_mask
    _, brain = mask_stage(sim, voxel)
    maps = estimate_total_field(sim.magnitude, sim.phase_rad, sim.protocol.echo_times_s, voxel)
    reliability = reliability_map(brain, maps.magnitude_rss, maps.residual_rad)
    region, reliable = reliability.qsm_region, reliability.reliable
    return maps.field_hz, region, np.where(reliable, maps.magnitude_rss, 0), region & reliable


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="bench_cache/qsmforward")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--fields", nargs="+", default=["true", "pipeline"], choices=["true", "pipeline"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--realistic-magnitude", action="store_true",
                        help="the heads whose magnitude is no oracle for chi (it is PDF's weight)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    variants = {label: VARIANTS[label] for label in VARIANTS if label in args.variants}
    print("| protocol | field | variant | box | iterations | seconds (median) | time ratio | relative error | TKD NRMSE % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.protocols:
        sim = simulate(name, args.cache, realistic_magnitude=args.realistic_magnitude)
        voxel, b0 = physics.voxel_size_mm(sim.affine), physics.b0_direction_voxel(sim.affine)
        for field_kind in args.fields:
            field, mask, weight, scored = inputs(sim, field_kind, voxel)
            times = {label: [] for label in variants}
            results = {}
            for _ in range(args.repeats):
                for label, options in variants.items():
                    start = time.perf_counter()
                    results[label] = pdf(field, mask, voxel, b0, magnitude=weight, **options)
                    times[label].append(time.perf_counter() - start)
            base = statistics.median(times[next(iter(variants))])
            for label, result in results.items():
                seconds = statistics.median(times[label])
                box = padded_box(mask, voxel, variants[label].get("pad_voxels")).shape
                chi = tkd(physics.field_hz_to_ppm(result.local_field, B0_TESLA), scored, voxel, b0)
                print(f"| {name} | {field_kind} | {label} | {'x'.join(map(str, box))} | {result.iterations} | "
                      f"{seconds:.1f} | "
                      f"{base / seconds:.2f}x | {relative_error(result.local_field, sim.local_field_hz, scored):.4f} | "
                      f"{score(chi, sim, scored)['nrmse']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
