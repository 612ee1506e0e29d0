#!/usr/bin/env python
"""Per-task overhead of ``metaqsm ... participant --participant-label 001`` against the number of participants.

A study run as one SLURM array task per participant pays this overhead once per task: everything the CLI does
before the workflow runs (input validation, pybids indexing, metaqsm's header and integrity checks of the runs).
It must not grow with the number of participants: a task reads its own participant's files and the dataset-level
ones; only directory listings of the dataset's top level remain.

For each dataset size (``--sizes``, default 2 and 200) a dataset is made of symbolic links: participant 001 (and
002) are the demo's sub-01 (and sub-02), the others links to the demo's sub-01 files under their own names; the
dataset-level files are the demo's, with every participant in participants.tsv. Each case runs the CLI in a fresh
Python process (no cache shared between cases) as ``metaqsm BIDS OUT participant --participant-label 001
--inversion tkd --nprocs 1``, stopped where the workflow would be built, with and without the input validation
(``--skip-bids-validation``). The table gives, in seconds: the CLI's ``main()`` up to that point ("to workflow"),
its parts (validate = the official validator when installed, else pybids' name checks, plus metaqsm's checks of
the runs; index = the participant level's pybids index; collect = the selected runs' checks, which reuse the
validation's image reads where it ran), the process's wall time including imports, and the MiB the process read
(``rchar``; the official validator runs in a child process, its reads are not counted).

Usage: python benchmarks/bench_validation_overhead.py [--demo DIR] [--sizes 2 200] [--work DIR]
(without ``--demo``, ``metaqsm-simulate`` writes the demo dataset into the work folder first, about 40 s).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

#: Runs in a fresh process: the CLI, timed in parts, stopped where the workflow would be built.
CHILD = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import metaqsm_bids.cli.run as run
    import metaqsm_bids.io.inputs as inputs
    import metaqsm_bids.io.validation as validation  # bound to the unwrapped index_dataset before the wrapping
    import metaqsm_bids.workflows.base as base

    parts = {"validate": 0.0, "index": 0.0, "collect": 0.0}

    def timed(part, function):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[part] += time.perf_counter() - t
        return wrapper

    class WouldRun(BaseException):
        pass

    def stop(*args, **kwargs):
        raise WouldRun

    validation.validate_input = timed("validate", validation.validate_input)
    inputs.index_dataset = timed("index", inputs.index_dataset)
    run._collect = timed("collect", run._collect)
    base.init_metaqsm_wf = stop
    imported = time.perf_counter()
    try:
        status = run.main(sys.argv[1:])
        raise SystemExit(f"the CLI ended (exit status {status}) before building the workflow")
    except WouldRun:
        pass
    done = time.perf_counter()
    rchar = int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])
    print(json.dumps({"to_workflow": done - imported, "process": done - start, "mib_read": rchar / 2**20, **parts}))
""")


def make_dataset(demo, root, n):
    """``root``: the demo's dataset-level files and ``n`` participants 001..n of links to the demo's images."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name in ("dataset_description.json", "README.md", "participants.json"):
        if (demo / name).exists():
            shutil.copy(demo / name, root / name)
    labels = [f"{i:03d}" for i in range(1, n + 1)]
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{label}\n" for label in labels))
    for i, label in enumerate(labels, start=1):
        source = demo / ("sub-02" if i == 2 else "sub-01")
        for path in sorted(source.rglob("*")):
            if path.is_file():
                relative = path.relative_to(source).as_posix().replace(source.name, f"sub-{label}")
                target = root / f"sub-{label}" / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path.resolve())
    return root


def measure(bids, work, validation):
    """One CLI run in a fresh process, stopped where the workflow would be built: its timings (s) and MiB read."""
    out, work_dir = work / "out", work / "work"
    shutil.rmtree(out, ignore_errors=True)
    args = [str(bids), str(out), "participant", "--participant-label", "001", "--inversion", "tkd", "--nprocs", "1",
            "-w", str(work_dir)] + ([] if validation else ["--skip-bids-validation"])
    result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"the CLI failed: {result.stdout}{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="a dataset written by metaqsm-simulate (default: write one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 200], help="participants per dataset")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="metaqsm-bench-overhead-"))
    try:
        demo = args.demo
        if demo is None:
            demo = work / "demo_bids"
            if not (demo / "dataset_description.json").exists():
                subprocess.run([shutil.which("metaqsm-simulate") or "metaqsm-simulate", str(demo)], check=True)
        demo = demo.resolve()
        rows = []
        for n in args.sizes:
            bids = make_dataset(demo, work / f"bids_{n}", n)
            for validation in (True, False):
                row = measure(bids, work, validation)
                row.update(participants=n, validation="yes" if validation else "skipped")
                rows.append(row)
                print(f"  {n} participants, validation {row['validation']}: {row['to_workflow']:.2f} s",
                      file=sys.stderr)
        validator = shutil.which("bids-validator-deno") or \
            (Path(sys.executable).with_name("bids-validator-deno").exists() and "bids-validator-deno") or "pybids"
        print(f"participant 001 of N, --inversion tkd, up to the workflow; {os.cpu_count()} CPUs; "
              f"validator: {Path(validator).name}")
        print("| participants | validation | to workflow (s) | validate (s) | index (s) | collect (s) "
              "| process incl. imports (s) | MiB read |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['participants']} | {r['validation']} | {r['to_workflow']:.2f} | {r['validate']:.2f} "
                  f"| {r['index']:.2f} | {r['collect']:.2f} | {r['process']:.2f} | {r['mib_read']:.0f} |")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
