#!/usr/bin/env python
"""Speed, memory and accuracy of the participant pipeline on one clinical-size subject.

Simulates one 256x256x64 subject at 0.76x0.76x3 mm with 7 echoes (the method paper's
clinical SWI protocol: TE1 12.6 ms, spacing 4.1 ms, 3 T), then

1. runs every pipeline stage (the same nipype interfaces the workflow uses) in its own
   forked process, printing its wall time and peak RSS (the process high-water mark,
   which includes the ~0.3-0.4 GB of the interpreter and its imports);
2. runs the real ``metaqsm`` CLI on the dataset, printing its total wall time and peak RSS;
3. scores the Chimap (the default inversion, Meta-QSM) against the ground truth with qsm-ci's
   challenge metrics (benchmarks/score.py).

Usage: python benchmarks/bench_pipeline.py [--threads 2] [--keep DIR]
Targets (2-core CPU): < 60 s total and < 4 GiB peak RSS; Meta-QSM within 10x TKD's time.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from metaqsm_bids.interfaces.qsm import BackgroundRemoval, BrainMask, DipoleInversion, PrepareMEGRE, TotalField
from metaqsm_bids.sim.bids import RunSpec, simulate_dataset

SHAPE, VOXEL = (256, 256, 64), (0.76, 0.76, 3.0)
ECHO_TIMES = tuple(round(0.0126 + 0.0041 * n, 4) for n in range(7))


def _in_child(func):
    """Run ``func`` in a forked process; return (its result dict, wall s, peak RSS GiB)."""
    read, write = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            payload = json.dumps(func()).encode()
            code = 0
        except Exception as err:  # report and exit non-zero; the parent raises
            payload, code = json.dumps({"error": repr(err)}).encode(), 1
        with os.fdopen(write, "wb") as pipe:
            pipe.write(payload)
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    result = json.loads(payload)
    if status != 0:
        raise RuntimeError(result.get("error"))
    return result, wall, usage.ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def _stage(interface, cwd, **inputs):
    def run():
        os.chdir(cwd)
        outputs = interface(**inputs).run().outputs.get()
        return {k: v for k, v in outputs.items() if isinstance(v, str)}
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FFT/torch threads per stage")
    parser.add_argument("--keep", type=Path, help="keep the dataset and outputs in this folder")
    opts = parser.parse_args(argv)
    root = opts.keep or Path(tempfile.mkdtemp(prefix="metaqsm-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    bids_dir, work, out = root / "bids", root / "stages", root / "out"

    start = time.perf_counter()
    if not (bids_dir / "sub-01").exists():
        simulate_dataset(bids_dir, [RunSpec("01", shape=SHAPE, voxel_size_mm=VOXEL, echo_times_s=ECHO_TIMES,
                                            peak_snr=100, seed=0)])
    print(f"simulated {SHAPE} x {len(ECHO_TIMES)} echoes at {VOXEL} mm in {time.perf_counter() - start:.1f} s\n")

    anat = bids_dir / "sub-01" / "anat"
    mags = [str(anat / f"sub-01_echo-{n}_part-mag_MEGRE.nii.gz") for n in range(1, 8)]
    phases = [str(anat / f"sub-01_echo-{n}_part-phase_MEGRE.nii.gz") for n in range(1, 8)]
    t = opts.threads
    rows, files = [], {}
    stages = [
        ("phase scaling (+ load, stack)", PrepareMEGRE, lambda: dict(magnitude_files=mags, phase_files=phases)),
        ("brain mask", BrainMask, lambda: dict(magnitude_file=files["magnitude_file"], source_file=mags[0])),
        ("total field (unwrap + echo fit)", TotalField,
         lambda: dict(magnitude_file=files["magnitude_file"], phase_file=files["phase_file"],
                      echo_times_s=list(ECHO_TIMES))),
        ("RESHARP (6 mm)", BackgroundRemoval,
         lambda: dict(field_file=files["field_file"], mask_file=files["mask_file"], source_file=phases[0])),
        ("TKD (0.2)", DipoleInversion,
         lambda: dict(local_field_file=files["local_field_file"], mask_file=files["mask_file"],
                      field_strength_t=3.0, method="tkd", parameters={"threshold": 0.2})),
        ("Meta-QSM (default inversion)", DipoleInversion,
         lambda: dict(local_field_file=files["local_field_file"], mask_file=files["mask_file"],
                      field_strength_t=3.0, method="metaqsm", device="cpu")),
    ]
    for name, interface, inputs in stages:
        cwd = work / interface.__name__
        cwd.mkdir(parents=True, exist_ok=True)
        extra = {"num_threads": t}
        outputs, wall, rss = _in_child(_stage(interface, cwd, **inputs(), **extra))
        files.update(outputs)
        rows.append((name, wall, rss))

    print(f"{'stage (own process, ' + str(t) + ' threads)':<40} {'wall s':>8} {'peak RSS GiB':>13}")
    for name, wall, rss in rows:
        print(f"{name:<40} {wall:>8.2f} {rss:>13.2f}")
    print(f"{'sum of stages':<40} {sum(r[1] for r in rows):>8.2f} {max(r[2] for r in rows):>13.2f}\n")

    exe = Path(sys.executable).with_name("metaqsm")
    start = time.perf_counter()
    result = subprocess.run([str(exe), str(bids_dir), str(out), "participant", "-w", str(root / "work"),
                             "--nprocs", "1", "--omp-nthreads", str(t)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    if result.returncode:
        sys.exit(result.stderr)
    print(f"{'metaqsm CLI, whole participant run':<40} {wall:>8.2f} {peak:>13.2f}")
    print("(includes Python start-up, imports, pybids indexing, nipype and writing 7 gzipped derivatives)\n")

    sys.path.insert(0, str(Path(__file__).parent))
    from score import print_table, score_dataset

    print("accuracy of the default run (Meta-QSM) against the ground truth (qsm-ci challenge_metrics, qsm mask & true brain):")
    print_table(score_dataset(bids_dir, out))
    if not opts.keep:
        print(f"\n(outputs in {root}; pass --keep DIR to choose where)")


if __name__ == "__main__":
    main()
