#!/usr/bin/env python
"""Speed, memory and accuracy of whole participant runs of the real CLI on one clinical-size subject.

Simulates one 256x256x64 subject at 0.76x0.76x3 mm with 7 echoes (the method paper's clinical
SWI protocol: TE1 12.6 ms, spacing 4.1 ms, 3 T; ``metaqsm_bids.sim``), then runs the ``metaqsm``
CLI on it once per inversion setting (``--nprocs 1 --omp-nthreads THREADS``, one work folder, so
nipype reuses the steps before the inversion: the first run's wall time is the whole participant's),
side by side in one process so that time ratios hold on a shared machine. For each run it prints the
wall time and peak RSS of the CLI and its workers (``/usr/bin/time -v``), each step's seconds from
the Chimap sidecar's ``ElapsedSeconds``, the inversion's time over TKD's, and qsm-ci's challenge
metrics of the Chimap against the truth (``benchmarks/score.py``).

With ``--qsmforward-cache DIR`` it runs the same on the stage benchmark's qsm-forward heads instead
(``benchmarks/qsmforward_heads.py``, simulated into DIR once; ``--protocols`` chooses them), one work folder
per protocol, and scores as the stage benchmark does (``bench_stages.score``). Each step's share is its
seconds over the sum of the steps' seconds of the first run (the whole participant). ``--bfr pdf tfi`` runs the set
once per background removal there (a work folder each), one after the other on each head.

Usage: python benchmarks/bench_pipeline.py [--threads 2] [--keep DIR]
           [--runs tkd metaqsm metaqsm:flips ilsqr medi]   (METHOD[:NETWORK_ORIENTATIONS])
           [--qsmforward-cache DIR [--protocols 0.76x0.76x3 0.5x0.5x2 ...] [--realistic-magnitude] [--bfr pdf tfi]]
Targets (2-core CPU; issue 31/32): the whole participant <= 30 s (0.76x0.76x3; <= 90 s at 0.5x0.5x2), peak
memory <= 3 GiB; Meta-QSM's inversion within 10x TKD's.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from metaqsm_bids.io.outputs import output_path, sidecar_path
from metaqsm_bids.sim.dataset import RunSpec, simulate_dataset

sys.path.insert(0, str(Path(__file__).parent))
from score import COLUMNS, read_output, score_run  # noqa: E402

SUBJECT = {"subject": "01"}
SHAPE, VOXEL = (256, 256, 64), (0.76, 0.76, 3.0)
ECHO_TIMES = tuple(round(0.0126 + 0.0041 * n, 4) for n in range(7))
#: Chimap sidecar keys of the steps (their ``ElapsedSeconds``), in pipeline order, and their column names.
STEPS = (("PhaseScaling", "phase"), ("BrainMask", "mask"), ("TotalField", "field"),
         ("BackgroundFieldRemoval", "bfr"), ("DipoleInversion", "inversion"))


def run_cli(bids_dir, out, work, method, orientations, threads, bfr=None):
    """One participant run under ``/usr/bin/time -v`` (``bfr``: its ``--bfr``, None for the default): (wall s, peak
    RSS GiB)."""
    exe = Path(sys.executable).with_name("metaqsm")
    command = [str(exe), str(bids_dir), str(out), "participant", "-w", str(work), "--inversion", method,
               "--nprocs", "1", "--omp-nthreads", str(threads)]
    if orientations:
        command += ["--network-orientations", orientations]
    if bfr:
        command += ["--bfr", bfr]
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    # GNU time reports the largest RSS of the process and of each waited-for child (KiB)
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return wall, peak_kib / 2 ** 20


def step_seconds(sidecar):
    """Seconds of each of :data:`STEPS` recorded in a Chimap sidecar (None where absent)."""
    return {name: (sidecar[key].get("ElapsedSeconds") if isinstance(sidecar.get(key), dict) else None)
            for key, name in STEPS}


def bench_participant(bids_dir, subject, root, runs, threads, score, bfr=None):
    """Run the CLI on ``subject`` of ``bids_dir`` once per setting of ``runs`` (one work folder in ``root``; ``bfr``:
    the runs' ``--bfr``, None for the default):
    rows (label, wall s, peak GiB, step seconds, background removal iterations, metrics from
    ``score(output_dir)``)."""
    rows = []
    for setting in runs:
        method, _, orientations = setting.partition(":")
        out = root / f"out-{setting.replace(':', '-')}"
        wall, peak = run_cli(bids_dir, out, root / "work", method, orientations, threads, bfr)
        sidecar = json.loads(sidecar_path(output_path(out, "chimap", subject)).read_text())
        passes = sidecar.get("DipoleInversion", {}).get("OrientationPasses")
        label = setting + (f" ({passes} pass{'es' if passes > 1 else ''})" if passes else "")
        iterations = sidecar.get("BackgroundFieldRemoval", {}).get("Iterations")
        rows.append((label, wall, peak, step_seconds(sidecar), iterations, score(out)))
    return rows


def print_rows(rows):
    base = rows[0][3]["inversion"]
    whole = sum(v for v in rows[0][3].values() if v is not None)
    steps = [name for _, name in STEPS]
    print(f"{'run':<32}{'wall s':>8}{'peak GiB':>9}" + "".join(f"{s:>10}" for s in steps) + f"{'bfr iter':>9}"
          + f"{'inv/TKD':>9}" + "".join(f"{c:>15}" for c in COLUMNS))
    for name, wall, peak, seconds, iterations, metrics in rows:
        cells = "".join(f"{seconds[s]:>10.2f}" if seconds[s] is not None else f"{'-':>10}" for s in steps)
        print(f"{name:<32}{wall:>8.1f}{peak:>9.2f}{cells}{iterations if iterations else '-':>9}"
              f"{seconds['inversion'] / base:>9.1f}" + "".join(f"{metrics[c]:>15.3f}" for c in COLUMNS))
    print(f"{'share of the first run':<49}" + "".join(
        f"{seconds / whole:>10.0%}" if seconds is not None else f"{'-':>10}" for seconds in rows[0][3].values()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="--omp-nthreads of each run")
    parser.add_argument("--keep", type=Path, help="keep the dataset and outputs in this folder")
    parser.add_argument("--runs", nargs="+", default=["tkd", "metaqsm", "metaqsm:flips", "ilsqr", "medi"],
                        help="inversion settings, METHOD or METHOD:NETWORK_ORIENTATIONS (TKD first: the ratios' base)")
    parser.add_argument("--qsmforward-cache", type=Path,
                        help="run on the stage benchmark's qsm-forward heads, simulated into (or read from) this folder")
    parser.add_argument("--protocols", nargs="+", help="with --qsmforward-cache: which heads (default: all four)")
    parser.add_argument("--bfr", nargs="+", default=[None],
                        help="background removals to run the set with, one after another (default: the CLI's)")
    parser.add_argument("--realistic-magnitude", action="store_true",
                        help="with --qsmforward-cache: the heads whose magnitude is no oracle for chi")
    opts = parser.parse_args(argv)
    root = opts.keep or Path(tempfile.mkdtemp(prefix="metaqsm-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"CLI runs: --nprocs 1 --omp-nthreads {opts.threads}, one work folder per subject (steps before the "
          "inversion are computed by the first run and reused by the others)\n")
    if opts.qsmforward_cache:
        from bench_stages import score
        from qsmforward_heads import PROTOCOLS, SUBJECT as QSMFORWARD_SUBJECT, simulate

        for name in opts.protocols or list(PROTOCOLS):
            sim = simulate(name, opts.qsmforward_cache, realistic_magnitude=opts.realistic_magnitude)
            shape = sim.brain_mask.shape
            print(f"== {name}: {shape[0]}x{shape[1]}x{shape[2]} voxels, {len(sim.protocol.echo_times_s)} echoes")

            def score_head(out, sim=sim):
                chi = read_output(out, "chimap", QSMFORWARD_SUBJECT, np.float32)
                return score(chi, sim, read_output(out, "qsm_mask", QSMFORWARD_SUBJECT) > 0)

            for bfr in opts.bfr:
                if bfr:
                    print(f"-- --bfr {bfr}")
                print_rows(bench_participant(sim.bids_dir, QSMFORWARD_SUBJECT, root / name / (bfr or "default"),
                                             opts.runs, opts.threads, score_head, bfr))
                print()
    else:
        bids_dir = root / "bids"
        start = time.perf_counter()
        if not (bids_dir / "sub-01").exists():
            simulate_dataset(bids_dir, [RunSpec(**SUBJECT, shape=SHAPE, voxel_size_mm=VOXEL, echo_times_s=ECHO_TIMES,
                                                peak_snr=100, seed=0)])
        print(f"simulated {SHAPE} x {len(ECHO_TIMES)} echoes at {VOXEL} mm in {time.perf_counter() - start:.1f} s")
        truth_dir = bids_dir / "derivatives" / "metaqsm-simulate"
        print_rows(bench_participant(bids_dir, SUBJECT, root, opts.runs, opts.threads,
                                     lambda out: score_run(SUBJECT, out, truth_dir)[0]))
    if not opts.keep:
        print(f"\n(outputs in {root}; pass --keep DIR to choose where)")


if __name__ == "__main__":
    main()
