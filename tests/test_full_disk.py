"""A full disk: the run ends with one line per participant and exits non-zero, instead of nipype waiting
for ever for a task whose result file could not be written (a CI run hung 900 s on it)."""
import errno
import logging
import signal

import pytest
from nipype.pipeline import engine as pe
from nipype.interfaces.utility import Function

from metaqsm_bids.cli import run
from metaqsm_bids.cli.plugins import make_runner


def _fails(x):
    raise OSError(28, "No space left on device")


def _dies(x):
    import os
    import signal
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would


@pytest.fixture
def alarm():
    """Fail the test, instead of hanging it, after 120 s."""
    def expired(signum, frame):
        raise TimeoutError("the workflow still runs after 120 s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_task_failing_outside_its_node_fails_the_node_under_multiproc(tmp_path, monkeypatch, alarm):
    # nipype's run_node catches the node's error, then reads the node's result file: with a full disk there
    # is none, and it raises in the worker (the fork context gives the workers this patch)
    def no_result_file(node):
        raise FileNotFoundError(f"{node.output_dir()}/result_{node.name}.pklz")
    monkeypatch.setattr(pe.Node, "result", property(no_result_file))
    wf = pe.Workflow("wf", base_dir=str(tmp_path / "work"))
    wf.config["execution"].update(crashdump_dir=str(tmp_path / "crash"), crashfile_format="txt")
    node = pe.Node(Function(input_names=["x"], output_names=["y"], function=_fails), name="full")
    node.inputs.x = 1
    wf.add_nodes([node])
    runner = make_runner("MultiProc", {"n_procs": 2, "mp_context": "fork"})
    with pytest.raises(RuntimeError, match="result_full.pklz"):
        wf.run(plugin=runner)
    (crash,) = (tmp_path / "crash").glob("crash-*-full-*.txt")
    assert "FileNotFoundError" in crash.read_text()


def test_a_task_whose_worker_died_fails_its_node(tmp_path, alarm):
    wf = pe.Workflow("wf", base_dir=str(tmp_path / "work"))
    wf.config["execution"].update(crashdump_dir=str(tmp_path / "crash"), crashfile_format="txt")
    node = pe.Node(Function(input_names=["x"], output_names=["y"], function=_dies), name="killed")
    node.inputs.x = 1
    wf.add_nodes([node])
    with pytest.raises(RuntimeError, match="BrokenProcessPool"):
        wf.run(plugin=make_runner("MultiProc", {"n_procs": 2, "mp_context": "fork"}))


def test_crash_reasons_name_a_full_disk_and_the_step_of_an_empty_crash_file(tmp_path):
    uuid = "0b8a64f4-6c6e-4a51-8a39-6f1e3b1c2d3e"
    (tmp_path / f"crash-20261206-181611-root-r2star_map-{uuid}.txt").write_text("")
    (tmp_path / f"crash-20261206-181612-root-ds_run-{uuid}.txt").write_text(
        "Node: metaqsm_wf.sub_02_wf.ds_run\n\tOSError: [Errno 28] No space left on device\n"
        "\tFileNotFoundError: /w/result_ds_run.pklz\n")
    reasons = run._crash_reasons(tmp_path, since=0)
    assert reasons["?"].startswith("step r2star_map failed: no space left on the device (details: ")
    assert reasons["02"].startswith("step ds_run failed: no space left on the device (details: ")


def test_a_full_disk_outside_the_workflow_is_one_line(tmp_path, monkeypatch, capsys):
    def full(opts):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "dataset_description.json"))
    monkeypatch.setattr(run, "run_participant", full)
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    assert run.main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "no space left on the device writing " + str(tmp_path / "out" / "dataset_description.json") in lines[0]
    assert "-w " + str(tmp_path / "work") in lines[0]
    logging.getLogger("metaqsm").handlers.clear()
