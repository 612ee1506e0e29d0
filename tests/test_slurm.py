"""Cluster execution: nipype plugin files, and the SLURM recipes on a real SLURM cluster.

The SLURM tests submit real jobs. They need a running cluster with an idle node, which
``bash .ci/slurm.sh`` (root) sets up on this machine; without one they are skipped with the reason.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from nipype.pipeline import engine as pe
from nipype.interfaces.utility import IdentityInterface

from metaqsm_bids.cli.parser import parse_args
from metaqsm_bids.cli.plugins import (add_resource_hints, default_plugin, load_plugin_file, make_runner,
                                      plugin_settings, stop_runner)
from metaqsm_bids.interfaces.qsm import DipoleInversion, TotalField
from metaqsm_bids.io.derivatives import dataset_description
from metaqsm_bids.io.outputs import OUTPUTS, output_path

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "workflows" / "slurm" / "submit.sh"
SIM_ARGS = ["--shape", "32", "32", "16", "--voxel-size", "2", "2", "3"]  # a few seconds per participant
#: every derivative of a run (the simulated runs have several echoes), by the output spec
DERIVATIVES = [kind for kind, output in OUTPUTS.items() if output.written in ("always", "two echoes or more")]


# --- plugin files -------------------------------------------------------------------------------

def test_default_plugin_follows_nprocs():
    assert default_plugin(1) == ("Linear", {})
    assert default_plugin(6) == ("MultiProc", {"n_procs": 6, "raise_insufficient": False})
    assert plugin_settings(3) == default_plugin(3)


def test_plugin_files(tmp_path):
    (tmp_path / "job.sh").write_text("#!/bin/bash\nmodule load cuda\n")
    slurm = tmp_path / "slurm.yml"
    slurm.write_text("plugin: SLURMGraph\nplugin_args:\n  sbatch_args: --partition=short\n  template: job.sh\n"
                     "  dont_resubmit_completed_jobs: true\n")
    assert load_plugin_file(slurm) == ("SLURMGraph", {"sbatch_args": "--partition=short",
                                                      "template": str(tmp_path / "job.sh"),
                                                      "dont_resubmit_completed_jobs": True})
    multiproc = tmp_path / "mp.json"  # JSON is YAML too
    multiproc.write_text('{"plugin": "MultiProc", "plugin_args": {"memory_gb": 12, "scheduler": "mem_thread"}}')
    assert plugin_settings(4, multiproc) == ("MultiProc", {"n_procs": 4, "raise_insufficient": False,
                                                           "memory_gb": 12, "scheduler": "mem_thread"})
    linear = tmp_path / "linear.yml"
    linear.write_text("plugin: Linear\n")
    (tmp_path / "bids").mkdir()
    opts = parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--nprocs", "8",
                       "--nipype-plugin-file", str(linear)])
    assert (opts.plugin, opts.plugin_args, opts.omp_nthreads) == ("Linear", {}, 8)


@pytest.mark.parametrize("text, message", [
    ("plugin: Condor\n", "plugin 'Condor' is not supported; use one of Linear, MultiProc, SLURM, SLURMGraph"),
    ("plugin_args: {n_procs: 2}\n", "expected a mapping with a 'plugin' key"),
    ("- MultiProc\n", "expected a mapping with a 'plugin' key"),
    ("plugin: Linear\nplugins_args: {}\n", "unknown key(s) plugins_args"),
    ("plugin: MultiProc\nplugin_args: [4]\n", "'plugin_args' must be a mapping, not list"),
    ("plugin: MultiProc\nplugin_args: {n_procs: 0}\n", "plugin_args.n_procs must be an integer >= 1, not 0"),
    ("plugin: MultiProc\nplugin_args: {n_procs: '4'}\n", "plugin_args.n_procs must be an integer >= 1, not '4'"),
    ("plugin: SLURM\nplugin_args: {qsub_args: -q all}\n", "SLURM has no plugin_args key 'qsub_args'"),
    ("plugin: Linear\nplugin_args: {n_procs: 2}\n", "Linear has no plugin_args key 'n_procs' (known: none)"),
    ("plugin: SLURM\nplugin_args: {template: missing.sh}\n", "missing.sh does not exist"),
    ("plugin: SLURM\nplugin_args: {sbatch_args: [--mem=1G]}\n", "plugin_args.sbatch_args must be a string"),
    ("plugin: [SLURM\n", "not a readable YAML/JSON plugin file"),
])
def test_bad_plugin_files_are_explained(tmp_path, capsys, text, message):
    path = tmp_path / "plugin.yml"
    path.write_text(text)
    (tmp_path / "bids").mkdir()
    with pytest.raises(ValueError) as err:
        load_plugin_file(path)
    assert message in str(err.value) and str(path) in str(err.value)
    with pytest.raises(SystemExit) as exit_:  # the CLI stops with the same message, status 2
        parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--nipype-plugin-file", str(path)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_stopping_cancels_the_slurm_jobs_metaqsm_waits_for(tmp_path, monkeypatch):
    """metaqsm stopped (SIGTERM at a job's time limit): the SLURM plugin's pending step jobs are scancel'ed."""
    calls = tmp_path / "scancel.txt"
    scancel = tmp_path / "bin" / "scancel"
    scancel.parent.mkdir()
    scancel.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scancel.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scancel.parent}:{os.environ['PATH']}")
    runner = make_runner("SLURM", {"sbatch_args": "--time=00:10:00"})
    runner.pending_tasks = [(4242, 0), (4243, 1)]  # (SLURM job id, graph index), as nipype keeps them
    stop_runner(runner)
    assert calls.read_text().split() == ["4242", "4243"]
    stop_runner(make_runner("Linear", {}))  # nothing to cancel, no worker: no scancel
    assert calls.read_text().split() == ["4242", "4243"]


def test_resource_hints_for_slurm_nodes():
    inner = pe.Workflow(name="qsm_wf")
    field = pe.Node(TotalField(), name="total_field", mem_gb=1.5, n_procs=4)
    invert = pe.Node(DipoleInversion(device="cuda"), name="dipole_inversion", mem_gb=2.0, n_procs=3)
    sink = pe.Node(IdentityInterface(fields=["x"]), name="ds", run_without_submitting=True)
    inner.connect([(field, invert, [("field_file", "local_field_file")]), (invert, sink, [("chimap_file", "x")])])
    outer = pe.Workflow(name="top")
    outer.add_nodes([inner])

    add_resource_hints(outer, "MultiProc")  # MultiProc reads mem_gb/n_procs itself
    assert field.plugin_args == {} and invert.plugin_args == {}
    add_resource_hints(outer, "SLURMGraph")
    # memory = the node's data + 0.5 GB for its Python process (+ 1 GB of CUDA context on a GPU)
    assert field.plugin_args == {"sbatch_args": " --mem=2048M --cpus-per-task=4"}
    assert invert.plugin_args == {"sbatch_args": " --mem=3584M --cpus-per-task=3 --gres=gpu:1"}
    assert sink.plugin_args == {}
    assert os.environ["LOGNAME"]  # nipype's SLURM plugins name jobs after it


# --- the array recipe's participant list (no submission) -------------------------------------------

def _dataset(root, subjects, tsv=None):
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    for subject in subjects:
        (root / f"sub-{subject}").mkdir()
    if tsv is not None:
        (root / "participants.tsv").write_text(tsv)
    return root


def test_submit_maps_array_tasks_to_participants(tmp_path):
    env = _environment()
    folders = _dataset(tmp_path / "a", ["10", "02", "01"])
    result = subprocess.run(["bash", str(SUBMIT), folders, tmp_path / "out", "--dry-run"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "participants (3): 01 02 10" in result.stdout and "--array=0-2" in result.stdout

    # participants.tsv wins, in its order, whatever its column order and line endings
    tsv = _dataset(tmp_path / "b", ["01", "02", "03"], "age\tparticipant_id\r\n30\tsub-03\r\n41\tsub-01\r\n")
    result = subprocess.run(["bash", str(SUBMIT), tsv, tmp_path / "out", "--dry-run", "--", "--inversion", "tkd"],
                            capture_output=True, text=True, env=env)
    assert "participants (2): 03 01" in result.stdout and "--array=0-1" in result.stdout, result.stderr
    assert "with metaqsm options: --inversion tkd" in result.stdout

    result = subprocess.run(["bash", str(SUBMIT), tsv, tmp_path / "out", "--participants", "sub-02 03", "--dry-run"],
                            capture_output=True, text=True, env=env)
    assert "participants (2): 02 03" in result.stdout


@pytest.mark.parametrize("variables, message", [
    ({"METAQSM_RUNNER": "singularity"}, "METAQSM_SIF='' is not a file: point it at the metaqsm .sif image"),
    ({"METAQSM_RUNNER": "docker"}, "METAQSM_RUNNER=docker: use singularity, apptainer or native"),
    ({"METAQSM_RUNNER": "native", "METAQSM_CMD": "no-such-metaqsm"}, "no-such-metaqsm is not on PATH"),
])
def test_submit_explains_a_bad_runner(tmp_path, variables, message):
    bids = _dataset(tmp_path / "bids", ["01"])
    result = subprocess.run(["bash", str(SUBMIT), bids, tmp_path / "out"], capture_output=True, text=True,
                            env={**_environment(), **variables})
    assert result.returncode == 2 and message in result.stderr, result.stderr


# --- a real SLURM cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm():
    """Skip unless a SLURM controller answers and a node is idle."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed here (bash .ci/slurm.sh installs and starts it, as root)")
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo did not answer in 30 s: slurmctld is not running (bash .ci/slurm.sh starts it)")
    if result.returncode != 0:
        pytest.skip(f"SLURM is not running: sinfo: {result.stderr.strip()} (bash .ci/slurm.sh starts it)")
    states = result.stdout.split()[1::2]
    if not {"idle", "mix"} & set(states):
        pytest.skip(f"no idle SLURM node (sinfo: {result.stdout.strip() or 'no nodes'})")


def _environment():
    bin_dir = str(Path(sys.executable).parent)  # the metaqsm console script under test
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "METAQSM_RUNNER": "native",
            "METAQSM_POLL_S": "1"}


def _submit(state_dir, *args, timeout=300):
    """Run submit.sh; on a timeout cancel what it submitted and fail with the queue's state."""
    try:
        return subprocess.run(["bash", str(SUBMIT), *map(str, args)], capture_output=True, text=True,
                              env=_environment(), timeout=timeout)
    except subprocess.TimeoutExpired:
        queue = subprocess.run(["squeue", "-o", "%i %j %T %r"], capture_output=True, text=True).stdout
        for job_file in Path(state_dir).glob("submissions/*/job_id"):
            subprocess.run(["scancel", job_file.read_text().strip()])
        pytest.fail(f"the array did not finish in {timeout} s; squeue:\n{queue}")


def _task_states(job_id):
    """Array task index -> (JobState, ExitCode), as SLURM's controller records them."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          check=True).stdout
    states = {}
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        states[int(fields["ArrayTaskId"])] = (fields["JobState"], fields["ExitCode"])
    return states


def _task_times(log):
    """(start, end) of an array task from the first and last lines the recipe writes to its log."""
    stamps = re.findall(r"^metaqsm array task \S+: .*?(\d{4}-\d\d-\d\dT[\d:]+[+-][\d:]+)$", log.read_text(), re.M)
    return datetime.fromisoformat(stamps[0]), datetime.fromisoformat(stamps[-1])


def _assert_complete(out, subject):
    expected = {output_path(out, kind, {"subject": subject}, ext).relative_to(out).as_posix()
                for kind in DERIVATIVES for ext in (".nii.gz", ".json")}
    found = {p.relative_to(out).as_posix() for p in (out / f"sub-{subject}").rglob("*")
             if p.is_file() and p.parent.name != "figures"}  # the report's figures
    assert found == expected
    assert (out / f"sub-{subject}.html").is_file()


@pytest.mark.slow
def test_array_recipe_one_broken_participant(slurm, tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    state = tmp_path / "out_slurm"  # submit.sh's default state dir
    result = run_cli("metaqsm-simulate", bids, "--participants", "01", "02", "03", *SIM_ARGS)
    assert result.returncode == 0, result.stderr
    broken = bids / "sub-03" / "anat" / "sub-03_echo-2_part-phase_MEGRE.nii.gz"
    broken.rename(tmp_path / broken.name)

    sbatch_args = "--cpus-per-task=1 --mem=2G --time=00:15:00"  # the default asks for 4 CPUs, 16 GB
    result = _submit(state, bids, out, "--sbatch-args", sbatch_args, "--wait", "--", "--omp-nthreads", "1")
    assert result.returncode == 1, result.stdout + result.stderr  # --wait: not every participant succeeded
    job_id = next(state.glob("submissions/*/job_id")).read_text().strip()
    assert f"submitted array job {job_id}: 3 participant(s) (01 02 03)" in result.stdout

    # two participants complete, nothing of the broken one
    _assert_complete(out, "01")
    _assert_complete(out, "02")
    assert not (out / "sub-03").exists()
    # the broken participant's log says which file is missing
    log_03 = (state / "logs" / "sub-03.log").read_text()
    assert re.search(r"^sub-03: FAILED: \S*sub-03_echo-2_part-phase_MEGRE\.nii\.gz: missing: no matching part-phase "
                     r"file for sub-03_echo-2_part-mag_MEGRE\.nii\.gz$", log_03, re.M), log_03
    assert "sub-01: OK (1 run(s))" in (state / "logs" / "sub-01.log").read_text()
    # the per-task status files and SLURM itself say which task failed
    statuses = {s: (state / "status" / f"sub-{s}").read_text().split()[:3] for s in ("01", "02", "03")}
    assert statuses == {"01": ["ok", f"job={job_id}_0", "exit=0"], "02": ["ok", f"job={job_id}_1", "exit=0"],
                        "03": ["failed", f"job={job_id}_2", "exit=1"]}
    assert _task_states(job_id) == {0: ("COMPLETED", "0:0"), 1: ("COMPLETED", "0:0"), 2: ("FAILED", "1:0")}

    # tasks 0 and 1 wrote into the same output dir at the same time, and its shared files are sound
    (start_0, end_0), (start_1, end_1) = (_task_times(state / "logs" / f"{job_id}_{i}.log") for i in (0, 1))
    assert start_0 < end_1 and start_1 < end_0, "the two tasks did not overlap"
    assert json.loads((out / "dataset_description.json").read_text()) == dataset_description(bids)
    assert not [p for p in out.rglob(".tmp-*")], "a temporary file was left behind"

    # resubmit only the failed participant once it is repaired
    (tmp_path / broken.name).rename(broken)
    dry = _submit(state, "--retry-failed", bids, out, "--dry-run")
    assert dry.returncode == 0 and "participants (1): 03" in dry.stdout, dry.stdout + dry.stderr
    retry = _submit(state, "--retry-failed", bids, out, "--sbatch-args", sbatch_args, "--wait",
                    "--", "--omp-nthreads", "1")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "1 participant(s) (03)" in retry.stdout
    _assert_complete(out, "03")
    assert all((state / "status" / f"sub-{s}").read_text().startswith("ok ") for s in ("01", "02", "03"))
    assert json.loads((out / "dataset_description.json").read_text()) == dataset_description(bids)
    nothing = _submit(state, "--retry-failed", bids, out)
    assert nothing.returncode == 0 and "nothing to resubmit" in nothing.stdout


@pytest.mark.slow
def test_nipype_slurm_plugin_submits_each_step(slurm, tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    result = run_cli("metaqsm-simulate", bids, "--participants", "01", *SIM_ARGS)
    assert result.returncode == 0, result.stderr
    token = f"metaqsm-test-{os.getpid()}-{tmp_path.name}"
    plugin = tmp_path / "slurm.yml"
    plugin.write_text(f"plugin: SLURM\nplugin_args:\n  sbatch_args: --time=00:10:00 --comment={token}\n")
    result = run_cli("metaqsm", bids, out, "participant", "-w", tmp_path / "work", "--omp-nthreads", "2",
                     "--nipype-plugin-file", plugin, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sub-01: OK (1 run(s))" in result.stdout
    _assert_complete(out, "01")

    jobs = {}
    text = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True).stdout
    for line in text.splitlines():
        if f"Comment={token}" in line:
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            tres = dict(t.split("=") for t in fields["TRES"].split(","))
            mem_mb = float(tres["mem"][:-1]) * {"M": 1, "G": 1024, "T": 1024 ** 2}[tres["mem"][-1]]
            jobs[fields["JobName"].split(".")[0]] = (fields["JobState"], int(tres["cpu"]), mem_mb)
    # one batch job per step (the sink and the sub-second R2* fit run in the submitting process), each with its
    # own request
    assert set(jobs) == {"phase_scaling", "brain_mask", "total_field", "background_removal", "dipole_inversion"}, jobs
    assert all(state == "COMPLETED" for state, _, _ in jobs.values()), jobs
    cpus = {step: cpu for step, (_, cpu, _) in jobs.items()}
    assert cpus == {"phase_scaling": 1, "brain_mask": 2, "total_field": 2, "background_removal": 2, "dipole_inversion": 2}
    mem_mb = {step: mem for step, (_, _, mem) in jobs.items()}
    assert min(mem_mb.values()) >= 512 and mem_mb["total_field"] > mem_mb["brain_mask"], mem_mb
