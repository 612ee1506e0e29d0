"""Input validation: clean datasets pass, each QSM-relevant defect is named with its file and participant."""
import gzip
import io
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from metaqsm_bids.io.validation import ensure_bidsignore, find_validator, format_findings, validate_input
from metaqsm_bids.sim.dataset import RunSpec, simulate_dataset

RUNS = [RunSpec(label, shape=(24, 24, 12), voxel_size_mm=(2.0, 2.0, 3.0), echo_times_s=(0.005, 0.01, 0.015), seed=n)
        for n, label in enumerate(("01", "02", "03", "04"))]
#: Both back ends: the official validator (installed by the test extras) and pybids' file-name checks.
BACK_ENDS = ["auto", None]


def _drop_magnitude(root):  # sub-01: echo-2 phase without its magnitude
    for path in root.glob("sub-01/anat/sub-01_echo-2_part-mag_MEGRE.*"):
        path.unlink()


def _drop_echo_time(root):  # sub-02: no EchoTime in one sidecar
    sidecar = root / "sub-02/anat/sub-02_echo-1_part-phase_MEGRE.json"
    meta = json.loads(sidecar.read_text())
    del meta["EchoTime"]
    sidecar.write_text(json.dumps(meta))


def _crop_echo(root):  # sub-03: one echo with fewer slices
    path = root / "sub-03/anat/sub-03_echo-3_part-mag_MEGRE.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :10], img.affine, img.header), path)


def _misname(root):  # sub-04: a MEGRE file with a broken name, and a stray non-BIDS file
    anat = root / "sub-04" / "anat"
    (anat / "sub-04_echo-1_part-phase_MEGRE.nii.gz").rename(anat / "sub-04_echo1_phase_MEGRE.nii.gz")
    (anat / "notes_about_sub-04.txt").write_text("not BIDS")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation") / "bids"
    simulate_dataset(root, RUNS)
    shutil.rmtree(root / "derivatives")  # the ground truth is not part of the input
    return root


@pytest.fixture(scope="module", params=BACK_ENDS, ids=["bids-validator", "pybids"])
def broken_findings(request, dataset, tmp_path_factory):
    """Findings on a copy of the dataset with one defect per participant, for each back end."""
    root = tmp_path_factory.mktemp("broken") / "bids"
    shutil.copytree(dataset, root)
    for breaker in (_drop_magnitude, _drop_echo_time, _crop_echo, _misname):
        breaker(root)
    return validate_input(root, validator=request.param)


def _errors(findings):
    return [f for f in findings if f.severity == "error"]


def _broken(dataset, tmp_path, breaker):
    copy = tmp_path / "bids"
    shutil.copytree(dataset, copy)
    breaker(copy)
    return copy


def test_official_validator_is_found():
    assert find_validator() is not None, "bids-validator-deno is part of the test extras"


@pytest.mark.parametrize("validator", BACK_ENDS)
def test_clean_dataset_has_no_errors(dataset, validator):
    findings = validate_input(dataset, validator=validator)
    assert not _errors(findings), format_findings(findings)


@pytest.mark.parametrize("subject, path, words", [
    ("01", "sub-01/anat/sub-01_echo-2_part-mag_MEGRE.nii.gz",
     "missing: no matching part-mag file for sub-01_echo-2_part-phase"),
    ("02", "sub-02/anat/sub-02_echo-1_part-phase_MEGRE.nii.gz", "no EchoTime"),
    ("03", "sub-03/anat/sub-03_echo-3_part-mag_MEGRE.nii.gz", "shape (24, 24, 10) differs"),
    ("04", "sub-04/anat/sub-04_echo-1_part-phase_MEGRE.nii.gz", "missing: no matching part-phase"),
], ids=["phase-without-magnitude", "missing-EchoTime", "echo-shape-differs", "magnitude-without-phase"])
def test_broken_run_is_named_once(broken_findings, subject, path, words):
    errors = [f for f in _errors(broken_findings) if f.subject == subject and f.code == "MEGRE_RUN"]
    assert len(errors) == 1, format_findings(broken_findings)
    assert errors[0].path == path and words in errors[0].message and errors[0].source == "metaqsm"


@pytest.mark.parametrize("subject", ["01", "02", "03"])
def test_each_defect_is_said_once(broken_findings, subject):
    # the validator also reports the missing EchoTime of sub-02: metaqsm's message replaces it
    assert len([f for f in broken_findings if f.subject == subject]) == 1, format_findings(broken_findings)


def test_misnamed_megre_file_is_an_error_other_files_a_warning(broken_findings):
    by_path = {f.path: f for f in broken_findings}
    assert by_path["sub-04/anat/sub-04_echo1_phase_MEGRE.nii.gz"].severity == "error"
    assert by_path["sub-04/anat/notes_about_sub-04.txt"].severity == "warning"
    assert broken_findings[0].severity == "error" and broken_findings[-1].severity == "warning"  # errors first


@pytest.mark.parametrize("validator", BACK_ENDS)
def test_missing_dataset_description_is_a_dataset_error(dataset, tmp_path, validator):
    root = _broken(dataset, tmp_path, lambda r: (r / "dataset_description.json").unlink())
    errors = _errors(validate_input(root, validator=validator))
    assert [e.subject for e in errors] == [None]
    assert "dataset_description.json" in errors[0].message


def test_unrunnable_validator_falls_back_to_pybids(dataset, tmp_path):
    broken = _broken(dataset, tmp_path, _drop_magnitude)
    findings = validate_input(broken, validator=str(tmp_path / "no-such-validator"))
    assert findings[0].code == "MEGRE_RUN"
    assert any(f.code == "VALIDATOR_FAILED" and f.severity == "warning" for f in findings)


def _damage_sub_02(root):  # sub-02: a truncated image (its header intact) and a sidecar that is not JSON
    image = root / "sub-02/anat/sub-02_echo-2_part-mag_MEGRE.nii.gz"
    image.write_bytes(image.read_bytes()[:-200])
    (root / "sub-02/anat/sub-02_echo-3_part-phase_MEGRE.json").write_text("{not json")


@pytest.mark.parametrize("validator", BACK_ENDS)
def test_only_the_selected_participants_are_read(dataset, tmp_path, validator):
    """A one-participant task (a SLURM array task) reads that participant's files and the dataset-level ones only:
    sub-02's damage is not seen when sub-01 is validated, and is when sub-02 is."""
    from metaqsm_bids.io.inputs import index_dataset

    root = _broken(dataset, tmp_path, _damage_sub_02)
    for selection in (["01"], ["sub-01", "03"]):
        findings = validate_input(root, validator=validator, participants=selection)
        assert not [f for f in findings if f.subject not in ("01", "03")], format_findings(findings)
        assert not _errors(findings), format_findings(findings)
    errors = _errors(validate_input(root, validator=validator, participants=["02"]))
    assert errors and {e.subject for e in errors} == {"02"}, format_findings(errors)
    assert any(e.code == "MEGRE_RUN" and "sub-02_echo-3_part-phase_MEGRE.json" in e.message for e in errors)
    layout, unreadable = index_dataset(root, ["01"])
    assert layout.get_subjects() == ["01"] and unreadable == {}
    assert {f.entities["subject"] for f in layout.get(suffix="MEGRE")} == {"01"}
    layout, unreadable = index_dataset(root, ["02"])
    assert layout.get_subjects() == ["02"] and list(unreadable) == ["02"]


def test_not_a_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        validate_input(tmp_path / "missing")


def test_ensure_bidsignore_appends_once(tmp_path):
    (tmp_path / ".bidsignore").write_text("extra/\n")
    ensure_bidsignore(tmp_path, ["*.html", "**/figures"])
    ensure_bidsignore(tmp_path, ["*.html"])
    assert (tmp_path / ".bidsignore").read_text() == "extra/\n*.html\n**/figures\n"


def test_integrity_check_reads_every_image_in_full(tmp_path):
    """Truncated gzip (header intact), truncated .nii, NaN, a magnitude with no signal: each named with the problem."""
    from metaqsm_bids.io.integrity import check_image

    data = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32) + 0.5
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), good)
    check_image(good, magnitude=True)
    cases = {}
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:-40])
    cases[truncated] = "gzip stream is truncated or corrupt"
    plain = tmp_path / "plain.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), plain)
    short = tmp_path / "short.nii"
    short.write_bytes(plain.read_bytes()[:600])
    cases[short] = "not a readable NIfTI image"
    nan = data.copy()
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    cases[tmp_path / "nan.nii.gz"] = "1 voxels are NaN or infinite"
    nib.save(nib.Nifti1Image(np.zeros_like(data), np.eye(4)), tmp_path / "zero.nii.gz")
    cases[tmp_path / "zero.nii.gz"] = "zero in every voxel"
    for path, words in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(words)):
            check_image(path, magnitude=True)
    check_image(tmp_path / "zero.nii.gz", magnitude=False)  # a phase may be zero


def test_header_check_names_the_broken_geometry(tmp_path, capfd):
    """Zero or NaN voxel size, non-finite or singular affine: refused, naming the file, before nibabel fixes (and
    prints) anything; a qform that disagrees with the sform: a warning saying which one is used."""
    from metaqsm_bids.io.integrity import check_header

    data = np.ones((8, 8, 4), np.float32)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])

    def save(name, change=None):  # the header edited in the file's bytes (nibabel's save would rewrite it)
        path = tmp_path / name
        nib.Nifti1Image(data, affine).to_filename(path)
        raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
        if change:
            change(header)
        raw = header.binaryblock + raw[348:]
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
        return path

    good, warning = check_header(save("good.nii.gz"))
    assert np.allclose(good, affine) and warning is None

    def zero(h):
        h["pixdim"][3] = 0

    def nan_voxel(h):
        h["pixdim"][1] = np.nan

    def nan_sform(h):
        h["srow_y"][1] = np.inf

    def singular(h):
        h["srow_z"] = h["srow_y"]

    def qform_off(h):
        h["qform_code"] = 1
        h["qoffset_x"] = 5.0
    cases = {"zero.nii.gz": (zero, "voxel size 2 x 2 x 0 mm in the header (pixdim[1:4])"),
             "nan_voxel.nii": (nan_voxel, "voxel size nan x 2 x 3 mm"),
             "nan_sform.nii.gz": (nan_sform,
                                  "the voxel-to-world affine from the sform (code 2) holds NaN or infinite values"),
             "singular.nii.gz": (singular, "the voxel-to-world affine from the sform (code 2) is singular")}
    for name, (change, words) in cases.items():
        path = save(name, change)
        with pytest.raises(ValueError, match=re.escape(f"{path}: {words}")):
            check_header(path)
    path = save("qform_off.nii.gz", qform_off)
    used, warning = check_header(path)
    assert np.allclose(used, affine)
    assert warning.startswith(f"{path}: the sform and qform of the header disagree")
    assert "uses the sform (code 2)" in warning

    def qform_only(h):
        h["sform_code"], h["qform_code"] = 0, 1
        h["qoffset_x"] = 5.0
    used, warning = check_header(save("qform_only.nii.gz", qform_only))
    assert used[0, 3] == 5.0 and warning is None  # nibabel's choice: the qform when the sform has no code
    assert "pixdim" not in capfd.readouterr().err  # nibabel's fixes were not printed
