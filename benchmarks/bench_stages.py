#!/usr/bin/env python
"""Stage benchmark on qsm-forward heads (the peer's simulator, its defaults): the yardstick of accuracy.

In the spirit of QSM-CI's isolated and composed modes. For each protocol of
``benchmarks/qsmforward_heads.py`` (an MNI152-based head with CSF rim, skull, sinuses, veins,
deep grey nuclei and a calcification; shim field and phase offset on, peak SNR 100):

* **field**: the pipeline's total field (echo fit) against the true shimmed total field, inside
  the true brain mask (both demeaned there): relative error, correlation, slope, the fraction of
  voxels off by more than 5 Hz and the error RMS by depth from the brain's edge;
* **mask**: the pipeline's brain mask against the simulator's (Dice, extra and missed fractions);
  the final QSM mask's coverage of the brain (with the reliability map in play);
* **background removal, isolated**: fed the true total field and the true brain mask, each
  method's local field against the true local field (relative error and correlation inside the
  method's mask, demeaned), its coverage of the brain, and TKD (0.2) of it scored against the
  true susceptibility, beside TKD of the true local field in the same mask; and the floor of
  harmonic methods: RESHARP applied to the true local field itself;
* **inversion, isolated**: fed the true local field on the true brain mask, each inversion
  scored with ``qsm_ci.qsm_eval.challenge_metrics``;
* **pipeline**: the CLI's participant run in this process from the raw files
  (:func:`metaqsm_bids.steps.pipeline.local_field_maps`: phase scaling, brain mask, echo fit, reliability map,
  ``--pipeline-bfr``, completion; then :func:`~metaqsm_bids.steps.pipeline.susceptibility` per inversion: the
  inversion and the reference, the CLI's defaults), beside TKD from the true total field with the same background
  removal; the same numbers as ``composed`` (tests/test_inprocess_pipeline.py);
* **composed**: the real ``metaqsm`` CLI from the raw phase, one run per inversion (upstream steps
  cached by nipype between them), scored the same way inside its QSM mask.

``--data-consistency LAMBDA ...`` adds, in the inversion and pipeline stages, a row per lambda for
each network inversion followed by the k-space data-consistency step, and the same for TKD (what the
network contributes is the difference).

``--network-orientations canonical flips ...`` scores each network inversion (inversion and pipeline
stages) once per setting of the CLI's ``--network-orientations`` (a row each, named by it when several
are given; default: the CLI's default).

``--metaqsm-model NAME`` scores a candidate model (exported into the package's models folder) as metaqsm.

``--realistic-magnitude`` runs every stage on the heads whose magnitude is no oracle for chi
(``mni_head(realistic_magnitude=True)``: deep grey nuclei and veins with the proton density of the
tissue around them, an M0 texture of its own, a receive-coil bias of 0.7-1.3, iron gradients inside
the nuclei that the magnitude does not show): what magnitude priors (MEDI's edges, magnitude-input
networks) get from a real scan. Simulated and cached apart (``<protocol>-realmag``), CLI outputs too.
``--warped``: the heads deformed into another anatomy (``mni_head(warp_seed=...)``, cached as ``...-warped``), on
which a network's gain must hold too (its training crops are cut from the same MNI152 template as the heads).

Scores are inside the true brain mask eroded by one voxel (and the method's mask). NRMSE and HFEN
in %, DGM linearity |1 - slope|.

Usage: python benchmarks/bench_stages.py [--cache DIR] [--protocols ...] [--inversions ...]
           [--composed ...] [--stages field mask bfr inversion pipeline composed] [--pipeline-bfr METHOD]
           [--resharp-radius-mm R] [--data-consistency LAMBDA ...] [--network-data-consistency-edge-mm MM]
           [--network-orientations ...] [--network-tv-refinement N ...] [--metaqsm-model NAME]
           [--realistic-magnitude] [--warped] [--json results.json]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft as sfft
from qsm_ci.qsm_eval import challenge_metrics
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))
from qsmforward_heads import B0_TESLA, PROTOCOLS, SUBJECT, simulate  # noqa: E402
from score import read_output  # noqa: E402

from metaqsm_bids.cli.parser import build_parser  # noqa: E402
from metaqsm_bids.io.inputs import find_megre_runs, index_dataset  # noqa: E402
from metaqsm_bids.qsm.background.registry import BACKGROUND_REMOVALS  # noqa: E402
from metaqsm_bids.qsm.core import physics  # noqa: E402
from metaqsm_bids.qsm.inversion.consistency import data_consistency  # noqa: E402
from metaqsm_bids.qsm.inversion.registry import INVERSIONS, NETWORK_INVERSIONS  # noqa: E402
from metaqsm_bids.qsm.inversion.tkd import tkd  # noqa: E402
from metaqsm_bids.qsm.inversion.tv import DEFAULT_TV_REFINEMENT  # noqa: E402
from metaqsm_bids.qsm.network.models import ORIENTATIONS  # noqa: E402
from metaqsm_bids.qsm.mask.brain import brain_mask  # noqa: E402
from metaqsm_bids.steps.brain_mask import compute_brain_mask, magnitude_rss  # noqa: E402
from metaqsm_bids.steps.inversion import invert_local_field  # noqa: E402
from metaqsm_bids.steps.local_field import remove_background_field  # noqa: E402
from metaqsm_bids.steps.pipeline import local_field_maps, run_inputs, susceptibility  # noqa: E402
from metaqsm_bids.steps.total_field import estimate_total_field  # noqa: E402

DEPTH_BINS_MM = (0, 2, 4, 6, 10, 20, 1000)
METRICS = ("nrmse", "hfen", "xsim", "correlation", "dgm_linearity", "nrmse_blood", "calc_streak")


def relative_error(estimate, truth, mask):
    """||e - t|| / ||t|| inside ``mask``, both demeaned there (fields are known up to a constant)."""
    e = estimate[mask] - estimate[mask].mean(dtype=np.float64)
    t = truth[mask] - truth[mask].mean(dtype=np.float64)
    return float(np.linalg.norm(e - t) / np.linalg.norm(t))


def correlation(a, b, mask):
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def score(chi, sim, mask):
    """qsm-ci challenge metrics inside ``mask`` and the truth brain eroded by one voxel."""
    region = mask & ndi.binary_erosion(sim.brain_mask)
    return challenge_metrics(chi.astype(np.float64), sim.chi_ppm.astype(np.float64), region.astype(np.uint8),
                             sim.seg * region)


def field_stage(sim, voxel, fit):
    brain = sim.brain_mask
    est = fit.field_hz - fit.field_hz[brain].mean(dtype=np.float64)
    truth = sim.total_field_hz - sim.total_field_hz[brain].mean(dtype=np.float64)
    error = np.where(brain, est - truth, 0)
    depth = ndi.distance_transform_edt(brain, sampling=voxel)
    rows = {"relative_error": relative_error(est, truth, brain), "correlation": correlation(est, truth, brain),
            "slope": float(np.polyfit(truth[brain], est[brain], 1)[0]),
            "off_5hz": float(np.mean(np.abs(error[brain]) > 5)), "depth_rms_hz": {}}
    for lo, hi in zip(DEPTH_BINS_MM[:-1], DEPTH_BINS_MM[1:]):
        shell = brain & (depth > lo) & (depth <= hi)
        if shell.any():
            rows["depth_rms_hz"][f"{lo}-{hi}"] = float(np.sqrt(np.mean(error[shell] ** 2)))
    return rows


def dice(a, b):
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def mask_stage(sim, voxel):
    """The pipeline's brain mask (:func:`~metaqsm_bids.steps.brain_mask.compute_brain_mask`: threshold + morphology,
    then the CSF rim dropped by R2*) against the truth, beside its first part (the magnitude's mask) alone."""
    brain = sim.brain_mask
    axial = physics.axial_axis(sim.affine)
    magnitude_mask = brain_mask(magnitude_rss(sim.magnitude), voxel, axial_axis=axial)
    mask, _ = compute_brain_mask(sim.magnitude, voxel, sim.protocol.echo_times_s, B0_TESLA, axial_axis=axial)
    rows = {}
    for name, m in (("magnitude", magnitude_mask), ("pipeline", mask)):
        rows[name] = {"dice": dice(m, brain), "extra": float(np.count_nonzero(m & ~brain) / brain.sum()),
                      "missed": float(np.count_nonzero(brain & ~m) / brain.sum())}
    return rows, mask


def bfr_stage(sim, voxel, b0_dir, methods, rss, resharp_radius_mm):
    brain = sim.brain_mask
    local_ppm = physics.field_hz_to_ppm(sim.local_field_hz, B0_TESLA)
    rows = {}
    for method in methods:
        start = time.perf_counter()
        result = remove_background_field(method, sim.total_field_hz, brain, voxel, b0_dir, magnitude=rss,
                                         parameters=_bfr_parameters(method, resharp_radius_mm), b0_tesla=B0_TESLA)
        wall = time.perf_counter() - start
        region = result.mask
        chi = tkd(physics.field_hz_to_ppm(result.local_field, B0_TESLA), region, voxel, b0_dir)
        reference = tkd(local_ppm, region, voxel, b0_dir)
        rows[method] = {"relative_error": relative_error(result.local_field, sim.local_field_hz, region),
                        "correlation": correlation(result.local_field, sim.local_field_hz, region),
                        "coverage": float(np.count_nonzero(region & brain) / brain.sum()),
                        "tkd_nrmse": score(chi, sim, region)["nrmse"],
                        "tkd_true_local_nrmse": score(reference, sim, region)["nrmse"], "seconds": wall}
    floor = remove_background_field("resharp", sim.local_field_hz, brain, voxel, b0_dir,
                                    parameters={"radius_mm": resharp_radius_mm})
    rows["floor: resharp of the true local field"] = {
        "relative_error": relative_error(floor.local_field, sim.local_field_hz, floor.mask),
        "coverage": float(floor.mask.sum() / brain.sum())}
    return rows


def _bfr_parameters(method, resharp_radius_mm):
    """The parameters of a background removal: the CLI's defaults, RESHARP's radius given."""
    return BACKGROUND_REMOVALS[method].own({"radius_mm": resharp_radius_mm})


def _bfr_label(method, resharp_radius_mm):
    return f"resharp {resharp_radius_mm:g} mm" if method == "resharp" else method


def _variants(method, orientations, metaqsm_model=None, network_lambda=None, network_edge_mm=None, refinements=None):
    """``(row name, parameters, options)`` of :func:`~metaqsm_bids.steps.inversion.invert_local_field` per network
    orientation setting and TV refinement (``refinements``: iterations, None off; default the CLI's) (and Meta-QSM's
    model when one is named), the networks followed by the data-consistency
    step of ``network_lambda`` (None: off; its field weighted down within ``network_edge_mm`` of the edge); MEDI
    with and without its edge mask; TV-ADMM with and without the magnitude's weighting; one row with the CLI's
    defaults otherwise."""
    if method == "medi":  # and without its edge mask (plain TV): what the magnitude's edges are worth to it
        return [(method, {}, {}), ("medi (no edge mask)", {}, {"edge_percentage": 0.0})]
    if method == "tv":  # and weighted by the magnitude, with MEDI's edge mask (MEDI's prior, TV-ADMM's cost x2)
        return [(method, {}, {}), ("tv (magnitude weighting)", {"weighting": "magnitude"}, {})]
    if method not in NETWORK_INVERSIONS:
        return [(method, {}, {})]
    model = {"model": metaqsm_model} if method == "metaqsm" and metaqsm_model else {}
    name = f"{method} {metaqsm_model}" if model else method
    refinements = [DEFAULT_TV_REFINEMENT] if refinements is None else refinements
    return [(name + "".join(f" ({part})" for part, several in ((o, len(orientations) > 1),
                                                               (f"refinement {r or 'off'}", len(refinements) > 1))
                            if several),
             {"orientations": o, "data_consistency_lambda": network_lambda,
              "data_consistency_edge_mm": network_edge_mm, "tv_refinement": r}, model)
            for o in orientations for r in refinements]


def _invert(method, local_hz, mask, voxel, b0_dir, rss, tes, parameters, options):
    """The susceptibility (ppm) by the CLI's inversion step, in this process."""
    return invert_local_field(method, local_hz, mask, voxel, b0_dir, B0_TESLA, parameters=parameters, magnitude=rss,
                              echo_times_s=tes, options=options)[0]


def _consistency_rows(method, chi, local_ppm, mask, voxel, b0_dir, lambdas, sim, extra):
    """Rows of a network's map (and, to show what the network contributes, TKD's) pulled onto the field by the
    k-space data-consistency step, one per lambda."""
    rows = {}
    for lambda_ in lambdas if method in NETWORK_INVERSIONS or method == "tkd" else ():
        start = time.perf_counter()
        fitted = data_consistency(chi, local_ppm, mask, voxel, b0_dir, lambda_)
        fitted[mask] -= fitted[mask].mean(dtype=np.float64)  # as the CLI's inversions: demeaned in the mask
        rows[f"{method} + data consistency {lambda_:g}"] = {
            **score(fitted, sim, mask), **extra, "seconds": time.perf_counter() - start}
    return rows


def inversion_stage(sim, voxel, b0_dir, methods, rss, lambdas, orientations, metaqsm_model=None, network_lambda=None,
                    network_edge_mm=None, refinements=None):
    brain = sim.brain_mask
    local_ppm = physics.field_hz_to_ppm(sim.local_field_hz, B0_TESLA)
    tes = sim.protocol.echo_times_s
    rows = {}
    for method in methods:
        for name, parameters, options in _variants(method, orientations, metaqsm_model, network_lambda, network_edge_mm,
                                                   refinements):
            start = time.perf_counter()
            chi = _invert(method, sim.local_field_hz, brain, voxel, b0_dir, rss, tes, parameters, options)
            rows[name] = {**score(chi, sim, brain), "seconds": time.perf_counter() - start}
            rows.update(_consistency_rows(method, chi, local_ppm, brain, voxel, b0_dir, lambdas, sim, {}))
    return rows


def pipeline_inputs(sim):
    """The raw inputs of :func:`metaqsm_bids.steps.pipeline.reconstruct` for the simulation's BIDS run, read as the
    CLI reads them (the ``composed`` stage's input; the phase sign as the CLI's default resolves it)."""
    layout, _ = index_dataset(sim.bids_dir)
    [(_, run)] = find_megre_runs(layout, SUBJECT["subject"], phase_sign=build_parser().get_default("phase_sign"))
    if isinstance(run, Exception):
        raise run
    return run_inputs(run)


def pipeline_stage(sim, voxel, b0_dir, methods, bfr_method, resharp_radius_mm, lambdas, orientations,
                   metaqsm_model=None, network_lambda=None, network_edge_mm=None, refinements=None):
    """The CLI's participant run in this process, from the raw files (what ``composed`` runs through the CLI, minus
    the I/O): :func:`~metaqsm_bids.steps.pipeline.local_field_maps` once, then
    :func:`~metaqsm_bids.steps.pipeline.susceptibility` per inversion (and network setting)."""
    start = time.perf_counter()
    fields = local_field_maps(**pipeline_inputs(sim), bfr=bfr_method,
                              bfr_params=_bfr_parameters(bfr_method, resharp_radius_mm))
    mask, qsm_mask, rss, tes = fields.brain_mask, fields.qsm_mask, fields.magnitude_rss, fields.echo_times_s
    upstream = time.perf_counter() - start
    local_ppm = physics.field_hz_to_ppm(fields.local_field_hz, B0_TESLA)
    rows = {}
    common = {"dice": dice(mask, sim.brain_mask),
              "coverage": float(np.count_nonzero(qsm_mask & sim.brain_mask) / sim.brain_mask.sum()),
              "excluded": float(np.count_nonzero(mask & ~fields.reliable_mask) / mask.sum())}
    for method in methods:
        for name, parameters, options in _variants(method, orientations, metaqsm_model, network_lambda, network_edge_mm,
                                                   refinements):
            start = time.perf_counter()
            chi = susceptibility(fields, inversion=method, inversion_params=parameters,
                                 inversion_options=options).chimap
            rows[name] = {**score(chi, sim, qsm_mask), **common, "seconds": upstream + time.perf_counter() - start}
            rows.update(_consistency_rows(method, chi, local_ppm, qsm_mask, voxel, b0_dir, lambdas, sim, common))
    # the yardstick: the same background removal and inversion from the true total field and true mask
    truth = remove_background_field(bfr_method, sim.total_field_hz, sim.brain_mask, voxel, b0_dir, magnitude=rss,
                                    parameters=_bfr_parameters(bfr_method, resharp_radius_mm), b0_tesla=B0_TESLA)
    chi = _invert("tkd", truth.local_field, truth.mask, voxel, b0_dir, rss, tes, {}, {})
    rows["tkd from the true total field"] = {
        **score(chi, sim, truth.mask), "coverage": float(truth.mask.sum() / sim.brain_mask.sum())}
    return rows


def composed_stage(sim, methods, out_root, bfr_method, resharp_radius_mm):
    exe = Path(sys.executable).with_name("metaqsm")
    rows = {}
    for method in methods:
        out = out_root / f"out-{method}-{_bfr_label(bfr_method, resharp_radius_mm).replace(' ', '')}"
        start = time.perf_counter()
        run = subprocess.run([str(exe), str(sim.bids_dir), str(out), "participant", "-w", str(out_root / "work"),
                              "--inversion", method, "--bfr", bfr_method, "--bfr-radius-mm", str(resharp_radius_mm),
                              "--nprocs", "1", "--omp-nthreads", "2"],
                             capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode:
            rows[method] = {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
            continue
        chi = read_output(out, "chimap", SUBJECT, np.float32)
        qsm_mask = read_output(out, "qsm_mask", SUBJECT) > 0
        mask = read_output(out, "brain_mask", SUBJECT) > 0
        rows[method] = {**score(chi, sim, qsm_mask), "dice": dice(mask, sim.brain_mask),
                        "coverage": float(np.count_nonzero(qsm_mask & sim.brain_mask) / sim.brain_mask.sum()),
                        "seconds": wall}
    return rows


def _print_table(title, rows, columns):
    print(f"\n  {title}")
    print("  " + f"{'':<40}" + "".join(f"{c:>14}" for c in columns))
    for name, row in rows.items():
        if "error" in row:
            print(f"  {name:<40}  failed: {row['error']}")
            continue
        print("  " + f"{name:<40}" + "".join(
            f"{row[c]:>14.3f}" if isinstance(row.get(c), float) else f"{'-':>14}" for c in columns))


def main(argv=None):
    cli = build_parser()  # the CLI's defaults, so that the pipeline stages run what a user gets
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="bench_cache/qsmforward", help="simulations and CLI outputs (reused)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--stages", nargs="+", default=["field", "mask", "bfr", "inversion", "composed"])
    parser.add_argument("--bfr", nargs="+", default=sorted(BACKGROUND_REMOVALS))
    parser.add_argument("--inversions", nargs="+", default=["tkd", "l2", "tv", "ilsqr", "medi", "mesaqsm", "metaqsm"],
                        choices=sorted(INVERSIONS))
    parser.add_argument("--composed", nargs="+", default=["tkd", "metaqsm"], choices=sorted(INVERSIONS))
    parser.add_argument("--resharp-radius-mm", type=float, default=cli.get_default("bfr_radius_mm"),
                        help="RESHARP's SMV radius in the bfr, pipeline and composed stages (the CLI's --bfr-radius-mm)")
    parser.add_argument("--pipeline-bfr", default=cli.get_default("bfr"), choices=sorted(BACKGROUND_REMOVALS),
                        help="background removal of the pipeline and composed stages (the CLI's --bfr)")
    parser.add_argument("--data-consistency", nargs="*", type=float, default=[], metavar="LAMBDA",
                        help="also score each network inversion followed by the k-space data-consistency step "
                             "with these lambdas (inversion and pipeline stages), on the network's map as "
                             "--network-data-consistency gives it (0: the network alone)")
    parser.add_argument("--network-data-consistency", type=float, metavar="LAMBDA",
                        default=cli.get_default("network_data_consistency"),
                        help="the networks' own data-consistency step, the CLI's option (default the CLI's; 0: off)")
    parser.add_argument("--network-data-consistency-edge-mm", type=float, metavar="MM",
                        default=cli.get_default("network_data_consistency_edge_mm"),
                        help="the networks' data-consistency step with the field weighted down within MM of the "
                             "mask's edge, the CLI's option (default the CLI's; 0: the closed form)")
    parser.add_argument("--network-tv-refinement", nargs="+", type=int, metavar="N",
                        default=[cli.get_default("network_tv_refinement") or 0],
                        help="score the network inversions with each of these TV refinements (the CLI's "
                             "--network-tv-refinement; 0: off)")
    parser.add_argument("--network-orientations", nargs="+", choices=ORIENTATIONS,
                        default=[cli.get_default("network_orientations")],
                        help="score the network inversions with each of these (the CLI's --network-orientations)")
    parser.add_argument("--metaqsm-model", metavar="NAME",
                        help="score this model (in the package's models folder, e.g. exported by metaqsm-train "
                             "--export) as metaqsm in the inversion and pipeline stages, instead of the shipped one")
    parser.add_argument("--realistic-magnitude", action="store_true",
                        help="heads whose magnitude is no oracle for chi (mni_head's realistic_magnitude)")
    parser.add_argument("--warped", action="store_true",
                        help="heads deformed into another anatomy (mni_head's warp_seed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)

    results = {}
    bfr_label = _bfr_label(args.pipeline_bfr, args.resharp_radius_mm)
    with sfft.set_workers(args.threads):
        for name in args.protocols:
            start = time.perf_counter()
            sim = simulate(name, args.cache, realistic_magnitude=args.realistic_magnitude, warped=args.warped)
            protocol = sim.protocol
            voxel = physics.voxel_size_mm(sim.affine)
            b0_dir = physics.b0_direction_voxel(sim.affine)
            rss = np.sqrt((sim.magnitude ** 2).sum(-1)).astype(np.float32)
            head = (" (realistic magnitude)" if args.realistic_magnitude else "") + (" (warped)" if args.warped else "")
            print(f"\n== {name}{head}: {sim.chi_ppm.shape} voxels of {tuple(protocol.voxel_mm)} mm, "
                  f"{len(protocol.echo_times_s)} echoes, B0 {np.round(b0_dir, 3).tolist()} in voxel axes; "
                  f"brain {int(sim.brain_mask.sum())} voxels (simulated/loaded in {time.perf_counter() - start:.0f} s)")
            res = results[name] = {}
            if "field" in args.stages:
                fit = estimate_total_field(sim.magnitude, sim.phase_rad, protocol.echo_times_s, voxel)
                res["field"] = field_stage(sim, voxel, fit)
                f = res["field"]
                print(f"  field: relative error {f['relative_error']:.3f}, correlation {f['correlation']:.4f}, "
                      f"slope {f['slope']:.3f}, {f['off_5hz']:.2%} of brain voxels off by > 5 Hz; error RMS (Hz) by "
                      "depth (mm): " + ", ".join(f"{k} {v:.2f}" for k, v in f["depth_rms_hz"].items()))
            if "mask" in args.stages:
                res["mask"], _ = mask_stage(sim, voxel)
                for step, m in res["mask"].items():
                    print(f"  brain mask ({step}): Dice {m['dice']:.3f}, extra {m['extra']:.1%}, "
                          f"missed {m['missed']:.1%}")
            if "bfr" in args.stages:
                res["bfr"] = bfr_stage(sim, voxel, b0_dir, args.bfr, rss, args.resharp_radius_mm)
                _print_table("background removal from the true total field (true brain mask)", res["bfr"],
                             ("relative_error", "correlation", "coverage", "tkd_nrmse", "tkd_true_local_nrmse"))
            if "inversion" in args.stages:
                res["inversion"] = inversion_stage(sim, voxel, b0_dir, args.inversions, rss, args.data_consistency,
                                                   args.network_orientations, args.metaqsm_model,
                                                   args.network_data_consistency or None,
                                                   args.network_data_consistency_edge_mm or None,
                                                   [r or None for r in args.network_tv_refinement])
                _print_table("inversion from the true local field (true brain mask)", res["inversion"],
                             METRICS + ("seconds",))
            if "pipeline" in args.stages:
                res["pipeline"] = pipeline_stage(sim, voxel, b0_dir, args.composed, args.pipeline_bfr,
                                                 args.resharp_radius_mm, args.data_consistency,
                                                 args.network_orientations, args.metaqsm_model,
                                                 args.network_data_consistency or None,
                                                 args.network_data_consistency_edge_mm or None,
                                                 [r or None for r in args.network_tv_refinement])
                _print_table(f"pipeline steps in-process from raw phase ({bfr_label})", res["pipeline"],
                             METRICS + ("dice", "coverage", "excluded", "seconds"))
            if "composed" in args.stages:
                # beside the simulation it ran on (cache/<protocol>[-realmag]/cli)
                res["composed"] = composed_stage(sim, args.composed, sim.bids_dir.parent / "cli",
                                                 args.pipeline_bfr, args.resharp_radius_mm)
                _print_table(f"composed: metaqsm CLI from raw phase ({bfr_label})", res["composed"],
                             METRICS + ("dice", "coverage", "seconds"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
