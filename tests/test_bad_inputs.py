"""Bad input, end to end: the simulated demo with one participant broken at a time.

Each case asserts what a user sees: the exit status, one console line naming the file and what
is wrong, no traceback on the console, nothing written for the broken participant, and the
other participant processed. The demo is simulated once (small grid); every case restores it at
the same path and shares one work directory, so the healthy participant's steps come from
nipype's cache after the first run (the output directory is new per case, so its files are
written each time).
"""
import gzip
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest import console_script, run_cli

pytestmark = pytest.mark.slow

SIM_ARGS = ("--shape", "32", "32", "16", "--voxel-size", "2", "2", "3")
FAST = ("--inversion", "tkd", "--nprocs", "1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(pristine demo dataset, folder for the cases); the demo as `metaqsm-simulate demo_bids` writes it, smaller."""
    root = tmp_path_factory.mktemp("bad_inputs")
    result = run_cli("metaqsm-simulate", root / "demo_bids", *SIM_ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (root / "demo_bids").glob("sub-*")) == ["sub-01", "sub-02"]
    return root / "demo_bids", root


def _restore(demo):
    pristine, root = demo
    bids = root / "bids"
    if bids.exists():
        shutil.rmtree(bids)
    shutil.copytree(pristine, bids)  # copy2 keeps time stamps: nipype's cache still holds sub-01's steps
    return bids


def _anat(bids):
    return bids / "sub-02" / "anat"


def _edit_sidecar(path, **changes):
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta, indent=2))


def _rewrite(path, change):
    img = nib.load(path)
    data = change(np.asarray(img.dataobj, dtype=np.float32))
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    return path


def truncated_gzip(bids):
    path = _anat(bids) / "sub-02_echo-2_part-mag_MEGRE.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert gzip.decompress(raw)  # the original was fine
    return path


def missing_echo(bids):
    for path in _anat(bids).glob("sub-02_echo-2_part-phase_MEGRE.*"):
        path.unlink()
    return _anat(bids) / "sub-02_echo-2_part-phase_MEGRE.nii.gz"  # the missing file is named


def missing_echo_time(bids):
    _edit_sidecar(_anat(bids) / "sub-02_echo-3_part-phase_MEGRE.json", EchoTime=None)
    return _anat(bids) / "sub-02_echo-3_part-phase_MEGRE.nii.gz"


def missing_field_strength(bids):
    for path in _anat(bids).glob("*.json"):
        _edit_sidecar(path, MagneticFieldStrength=None, ImagingFrequency=None)
    return _anat(bids) / "sub-02_echo-1_part-mag_MEGRE.nii.gz"


def shape_mismatch(bids):
    path = _anat(bids) / "sub-02_echo-3_part-mag_MEGRE.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine, img.header), path)
    return path


def nan_phase(bids):
    def change(data):
        data[10:12, 10:12, 5] = np.nan
        return data
    return _rewrite(_anat(bids) / "sub-02_echo-2_part-phase_MEGRE.nii.gz", change)


def zero_magnitude(bids):
    return _rewrite(_anat(bids) / "sub-02_echo-1_part-mag_MEGRE.nii.gz", np.zeros_like)


def missing_units(bids):
    for path in sorted(_anat(bids).glob("sub-02_echo-*_part-phase_MEGRE.json")):
        _edit_sidecar(path, Units=None)
    return _anat(bids) / "sub-02_echo-1_part-phase_MEGRE.nii.gz"


def invalid_json_sidecar(bids):
    path = _anat(bids) / "sub-02_echo-2_part-mag_MEGRE.json"
    path.write_text(path.read_text()[:-20])  # cut short, as by an interrupted copy
    return path


def _edit_header(path, offset, value):
    """Overwrite one float32 of a .nii.gz header in place (nibabel would fix the header on saving)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[offset:offset + 4] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)))


PIXDIM_3, SROW_X_0 = 76 + 3 * 4, 280  # NIfTI-1 header offsets: pixdim[3] (slice thickness), srow_x[0]


def zero_voxel_size_in_one_file(bids):
    path = _anat(bids) / "sub-02_echo-2_part-mag_MEGRE.nii.gz"
    _edit_header(path, PIXDIM_3, 0.0)
    return path


def zero_voxel_size_in_every_file(bids):
    for path in _anat(bids).glob("sub-02_*_MEGRE.nii.gz"):
        _edit_header(path, PIXDIM_3, 0.0)
    return _anat(bids) / "sub-02_echo-1_part-mag_MEGRE.nii.gz"  # the first file of the run is named


def non_finite_affine(bids):
    path = _anat(bids) / "sub-02_echo-3_part-phase_MEGRE.nii.gz"
    _edit_header(path, SROW_X_0, float("nan"))
    return path


#: case -> (breaker: bids -> the culprit file, words the console line must hold)
FAILING = {
    "truncated gzip": (truncated_gzip, "truncated or corrupt"),
    "missing echo": (missing_echo, "no matching part-phase file"),
    "missing EchoTime": (missing_echo_time, "no EchoTime"),
    "missing field strength": (missing_field_strength, "neither MagneticFieldStrength nor ImagingFrequency"),
    "shape mismatch": (shape_mismatch, "differs from"),
    "NaN phase": (nan_phase, "NaN or infinite"),
    "zero magnitude": (zero_magnitude, "zero in every voxel"),
    "invalid JSON sidecar": (invalid_json_sidecar, "not valid JSON"),
    "zero voxel size in one file": (zero_voxel_size_in_one_file, "voxel size 2 x 2 x 0 mm in the header"),
    "zero voxel size in every file": (zero_voxel_size_in_every_file, "voxel size 2 x 2 x 0 mm in the header"),
    "non-finite affine": (non_finite_affine, "affine from the sform (code 1) holds NaN or infinite values"),
}


def _console(result):
    return (result.stdout + result.stderr).splitlines()


def _assert_no_traceback(result):
    """No traceback, and nothing but metaqsm's own lines (no library's warnings) on the console."""
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    foreign = [line for line in _console(result) if not re.match(r"(\d\d:\d\d:\d\d \[metaqsm\] |sub-)", line)]
    assert not foreign, result.stdout + result.stderr


def _assert_sub01_only(out, result):
    assert "sub-01: OK (1 run(s))" in result.stdout, result.stdout + result.stderr
    assert (out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").exists()
    assert not [p for p in out.rglob("*") if "sub-02" in p.name], "a partial derivative of sub-02"


@pytest.mark.parametrize("case", list(FAILING))
def test_broken_participant_fails_alone_with_one_line(case, demo):
    breaker, words = FAILING[case]
    bids = _restore(demo)
    culprit = breaker(bids)
    out = demo[1] / f"out_{case.replace(' ', '_')}"
    result = run_cli("metaqsm", bids, out, "participant", "-w", demo[1] / "work", *FAST)
    assert result.returncode == 1, result.stdout + result.stderr
    _assert_no_traceback(result)
    naming = [line for line in _console(result) if culprit.name in line]
    assert len(naming) == 1, result.stdout + result.stderr
    assert naming[0].startswith("sub-02: FAILED: ") and words in naming[0] and str(culprit) in naming[0], naming
    assert not [line for line in _console(result) if "ERROR" in line], result.stderr  # said once, in that line
    _assert_sub01_only(out, result)


def test_failure_inside_a_step_keeps_the_traceback_off_the_console(demo):
    """An empty brain mask (given with --brain-mask-dir) fails sub-02 in its brain_mask step: one console line
    names the mask file and the crash file; the traceback is in the crash file and the log."""
    bids = _restore(demo)
    masks = demo[1] / "masks_empty"
    truth = bids / "derivatives" / "metaqsm-simulate"
    for subject in ("01", "02"):
        target = masks / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-brain_mask.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(truth / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-brain_mask.nii.gz", target)
    empty = _rewrite(masks / "sub-02" / "anat" / "sub-02_desc-brain_mask.nii.gz", np.zeros_like)
    out, work = demo[1] / "out_empty_mask", demo[1] / "work_empty_mask"
    result = run_cli("metaqsm", bids, out, "participant", "-w", work, "--brain-mask-dir", masks, *FAST)
    assert result.returncode == 1, result.stdout + result.stderr
    _assert_no_traceback(result)
    failed = [line for line in _console(result) if empty.name in line]
    assert len(failed) == 1 and failed[0].startswith("sub-02: FAILED: step brain_mask failed: ValueError: "), failed
    assert f"{empty}: the brain mask is empty" in failed[0]
    crash = failed[0].rsplit("(details: ", 1)[1].rstrip(")")
    assert "Traceback" in open(crash).read()
    logs = list((work / "logs").glob("metaqsm_*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()
    _assert_sub01_only(out, result)


def test_single_echo_warns_and_says_what_was_done(demo):
    bids = _restore(demo)
    for path in _anat(bids).glob("sub-02_echo-[234]_*"):
        path.unlink()
    out = demo[1] / "out_single_echo"
    result = run_cli("metaqsm", bids, out, "participant", "-w", demo[1] / "work", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_no_traceback(result)
    phase = _anat(bids) / "sub-02_echo-1_part-phase_MEGRE.nii.gz"
    naming = [line for line in _console(result) if phase.name in line]
    assert len(naming) == 1 and "WARNING" in naming[0] and "phase offset at TE = 0 cannot be removed" in naming[0]
    assert "sub-01: OK" in result.stdout and "sub-02: OK" in result.stdout
    sidecar = json.loads((out / "sub-02" / "fmap" / "sub-02_desc-total_fieldmap.json").read_text())
    assert sidecar["EchoTime"] == [0.004] and "single echo" in sidecar["TotalField"]["Method"]
    assert [w for w in sidecar["Warnings"] if "cannot be removed" in w] == [
        "bids:raw:sub-02/anat/sub-02_echo-1_part-phase_MEGRE.nii.gz: one echo only: the phase offset at TE = 0 cannot "
        "be removed (that needs two or more echoes), so the coil and transmit phase stays in the field map and in "
        "chi, and no R2*/T2* map is written (a decay needs two echoes or more); use multi-echo data"]  # once, the file
    # named as in Sources
    assert not list(out.rglob("sub-02*_R2starmap.nii.gz")) and list(out.rglob("sub-01*_R2starmap.nii.gz"))
    assert "Warnings" not in sidecar["TotalField"]
    report = (out / "sub-02.html").read_text()
    assert "missing derivative" not in report and "R2* mosaic" not in report  # one echo: no R2* map, by design
    assert "from 1 echo (TE = 4 ms)" in report and "estimated from the single echo" in report
    assert "from all" not in report and "removes the phase offset" not in report
    multi = (out / "sub-01.html").read_text()
    assert "estimated from all 4 echoes" in multi and "removes the phase offset at TE = 0" in multi


def test_phase_without_units_is_inferred_with_one_warning(demo):
    """No Units in the phase sidecars (BIDS requires it; qsm-forward and dcm2niix omit it): the units are inferred
    from the value range, with one WARNING naming the file, and recorded; the validator's error is not repeated."""
    bids = _restore(demo)
    phase = missing_units(bids)
    out = demo[1] / "out_missing_units"
    result = run_cli("metaqsm", bids, out, "participant", "-w", demo[1] / "work", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_no_traceback(result)
    naming = [line for line in _console(result) if "part-phase" in line]
    assert len(naming) == 1 and "WARNING" in naming[0] and str(phase) in naming[0], result.stdout + result.stderr
    assert "no Units" in naming[0] and "infers them from the value range" in naming[0]
    assert not [line for line in _console(result) if "ERROR" in line], result.stderr
    assert "sub-01: OK" in result.stdout and "sub-02: OK" in result.stdout
    chimap = json.loads((out / "sub-02" / "anat" / "sub-02_Chimap.json").read_text())
    assert chimap["PhaseScaling"]["PhaseUnits"] == "inferred from range" and "Warnings" not in chimap["PhaseScaling"]
    assert [w for w in chimap["Warnings"] if "no Units" in w] == [naming[0].split("WARNING: ", 1)[1].replace(
        f"{bids}/", "bids:raw:")]  # the console's line, the file named as in Sources
    assert "units inferred from their value range" in (out / "sub-02.html").read_text()


def test_integer_phase_with_units_arbitrary(demo):
    bids = _restore(demo)
    for path in sorted(_anat(bids).glob("sub-02_echo-*_part-phase_MEGRE.nii.gz")):
        img = nib.load(path)
        phase = np.asarray(img.dataobj, dtype=np.float32)
        integers = np.clip(np.round(phase / np.pi * 4096), -4096, 4095).astype(np.int16)
        nib.save(nib.Nifti1Image(integers, img.affine), path)
        _edit_sidecar(path.with_name(path.name.replace(".nii.gz", ".json")), Units="arbitrary")
    out = demo[1] / "out_integer_phase"
    result = run_cli("metaqsm", bids, out, "participant", "-w", demo[1] / "work", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_no_traceback(result)
    assert "sub-01: OK" in result.stdout and "sub-02: OK" in result.stdout
    chimap = json.loads((out / "sub-02" / "anat" / "sub-02_Chimap.json").read_text())
    assert chimap["PhaseScaling"]["PhaseUnits"] == "arbitrary"


def _assert_stopped(result, path, words, out):
    assert result.returncode == 1, result.stdout + result.stderr
    _assert_no_traceback(result)
    lines = _console(result)
    naming = [line for line in lines if str(path) in line]
    assert len(naming) == 1 and words in naming[0], lines
    assert len([line for line in lines if "ERROR" in line or "FAILED" in line]) == 1, lines
    assert not (out.exists() and out.is_dir() and list(out.iterdir())), "something was written"


def test_findings_about_participants_not_selected_stay_off_the_console(demo):
    """A file the validator flags in sub-02 is not said when only sub-01 is processed (it is in the log)."""
    bids = _restore(demo)
    (_anat(bids) / "sub-02_notes.txt").write_text("not BIDS\n")
    out, work = demo[1] / "out_only_01", demo[1] / "work"
    result = run_cli("metaqsm", bids, out, "participant", "-w", work, "--participant-label", "01", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_no_traceback(result)
    assert not [line for line in _console(result) if "sub-02" in line], result.stdout + result.stderr
    assert "sub-01: OK" in result.stdout
    result = run_cli("metaqsm", bids, out, "participant", "-w", work, "--participant-label", "02", *FAST)
    assert [line for line in _console(result) if "WARNING" in line and "sub-02_notes.txt" in line], result.stderr


def test_unknown_participant_label(demo):
    bids = _restore(demo)
    out = demo[1] / "out_label"
    result = run_cli("metaqsm", bids, out, "participant", "-w", demo[1] / "work", "--participant-label", "07", *FAST)
    _assert_stopped(result, bids, "['07'] not found", out)
    assert "['01', '02']" in result.stderr


@pytest.mark.parametrize("where", ["output under a file", "output is a file", "work dir is a file"])
def test_unwritable_output_or_work_dir(where, demo, tmp_path):
    """A folder that cannot be created fails for root too (permission bits would not)."""
    bids = _restore(demo)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    out, work = tmp_path / "out", tmp_path / "work"
    if where == "output under a file":
        out = blocker / "out"
    elif where == "output is a file":
        out = blocker
    else:
        work = blocker
    result = run_cli("metaqsm", bids, out, "participant", "-w", work, *FAST)
    _assert_stopped(result, out if "output" in where else work, "a file", out)
    assert blocker.read_text() == "not a folder\n"
    if "output" in where:
        assert not work.exists() or not list(work.glob("metaqsm_wf"))  # nothing ran


def test_filter_file_with_unknown_entity(demo, tmp_path):
    bids = _restore(demo)
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"acq": "highres"}))
    out = tmp_path / "out"
    result = run_cli("metaqsm", bids, out, "participant", "-w", demo[1] / "work", "--bids-filter-file", filters,
                     *FAST)
    _assert_stopped(result, filters, "unknown entity 'acq'", out)
    assert "'acquisition'" in result.stderr


def test_missing_filter_file_is_named_before_indexing(demo, tmp_path):
    bids = _restore(demo)
    filters, out, work = tmp_path / "filters.json", tmp_path / "out", tmp_path / "work"
    result = run_cli("metaqsm", bids, out, "participant", "-w", work, "--bids-filter-file", filters, *FAST)
    _assert_stopped(result, filters, "the BIDS filter file (--bids-filter-file) no such file", out)
    assert "usage:" not in result.stderr
    assert not work.exists()  # said before the dataset was validated or indexed (both log to the work dir)


def test_demo_outputs_pass_the_validator_without_warnings(demo, bids_validator):
    """The demo's derivatives: 0 errors and 0 warnings from bids-validator-deno."""
    bids = _restore(demo)
    out = demo[1] / "out_clean"
    result = run_cli("metaqsm", bids, out, "participant", "-w", demo[1] / "work", *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sub-01: OK" in result.stdout and "sub-02: OK" in result.stdout
    report = subprocess.run([bids_validator, "--format", "json", str(out)], capture_output=True, text=True,
                            timeout=300)
    issues = json.loads(report.stdout)["issues"]["issues"]
    found = [(i["severity"], i["code"], i.get("subCode"), i.get("location")) for i in issues
             if i["severity"] in ("error", "warning")]
    assert found == [], found
    description = json.loads((out / "dataset_description.json").read_text())
    assert len(description["Authors"]) >= 2 and description["Authors"][0] == "metaqsm-simulate"
    for mask in out.rglob("*_mask.json"):
        reference = json.loads(mask.read_text())["SpatialReference"]
        assert reference.startswith("bids:raw:") and (bids / reference.removeprefix("bids:raw:")).exists()


def _processes():
    """{pid: (parent pid, command line)} of the live (not zombie) processes."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # ended meanwhile
            continue
        if state != "Z":
            found[int(proc.name)] = (int(ppid), cmdline)
    return found


def _descendants(pid):
    """PIDs of the live processes started by ``pid`` and by those (a fork server's workers included)."""
    processes, found = _processes(), set()
    for _ in range(4):
        found |= {child for child, (parent, _) in processes.items() if parent in found | {pid}}
    return found


def _start_and_wait_for_workers(bids, out, work, console):
    """Start a MultiProc run (its console to the file ``console``: a surviving worker would hold a pipe open);
    return (its Popen, the PIDs of its processes) once its two workers are running."""
    with open(console, "w") as f:
        run = subprocess.Popen([str(console_script("metaqsm")), str(bids), str(out), "participant", "-w", str(work),
                                "--inversion", "tkd", "--nprocs", "2"], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        processes = _processes()
        children = _descendants(run.pid)
        if len([pid for pid in children if "bids-validator" not in processes.get(pid, (0, ""))[1]]) >= 2:
            return run, children | {run.pid}
        time.sleep(0.05)
    run.kill()
    pytest.fail(f"no two workers appeared (exit {run.wait()}): {console.read_text()}")


def _assert_nothing_survives(pids, out):
    deadline = time.monotonic() + 15  # a worker exits at its next Python instruction after the signal
    while set(_processes()) & pids and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = sorted(set(_processes()) & pids)
    assert not survivors, f"processes of the stopped run survived it: {survivors}"
    assert not [pid for pid, (_, cmdline) in _processes().items() if str(out) in cmdline]
    assert not [p for p in out.rglob(".tmp-*")], "a half-written derivative"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers end with metaqsm through Linux's prctl")
def test_killed_or_stopped_run_leaves_no_process_and_resumes(demo, tmp_path):
    """SIGKILL: the workers end with metaqsm (nothing else could stop them); SIGTERM: one line, exit 143, the
    workers stopped; then the same command completes the run."""
    bids = _restore(demo)
    out, work, console = tmp_path / "out_killed", tmp_path / "work", tmp_path / "console.txt"
    run, pids = _start_and_wait_for_workers(bids, out, work, console)
    run.kill()
    run.wait()
    _assert_nothing_survives(pids, out)

    run, pids = _start_and_wait_for_workers(bids, out, work, console)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM, console.read_text()
    _assert_nothing_survives(pids, out)
    result = subprocess.CompletedProcess(run.args, run.returncode, console.read_text(), "")
    _assert_no_traceback(result)
    errors = [line for line in _console(result) if "ERROR" in line]
    assert len(errors) == 1 and "stopped by SIGTERM before the run finished" in errors[0], result.stdout
    assert "OK" not in result.stdout

    result = run_cli("metaqsm", bids, out, "participant", "-w", work, "--inversion", "tkd", "--nprocs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sub-01: OK" in result.stdout and "sub-02: OK" in result.stdout
    assert (out / "sub-02" / "anat" / "sub-02_Chimap.nii.gz").exists()
    _assert_nothing_survives(set(), out)  # the completed run's workers ended with it


def test_stopped_serial_run_stops_at_once(demo, tmp_path):
    """With --nprocs 1 the steps run in metaqsm's own process, where nipype takes any exception for the step's
    failure: SIGINT still stops the run (no participant goes on), with one line and exit 130."""
    bids = _restore(demo)
    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.Popen([str(console_script("metaqsm")), str(bids), str(out), "participant", "-w", str(work),
                            *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(work.glob("metaqsm_wf/*/*/*/_node.pklz")) and time.monotonic() < deadline:  # a step started
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before the signal"
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    result = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
    assert result.returncode == 128 + signal.SIGINT, stdout + stderr
    _assert_no_traceback(result)
    assert [line for line in _console(result) if "ERROR" in line or "FAILED" in line or "OK" in line] == [
        line for line in _console(result) if "stopped by SIGINT before the run finished" in line], stdout + stderr
    assert not list(out.glob("sub-*")) and not list(out.rglob(".tmp-*"))

    result = run_cli("metaqsm", bids, out, "participant", "-w", work, *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sub-01: OK" in result.stdout and "sub-02: OK" in result.stdout
    assert (out / "sub-02" / "anat" / "sub-02_Chimap.nii.gz").exists()
