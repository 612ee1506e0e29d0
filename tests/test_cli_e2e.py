"""End-to-end runs of the real ``metaqsm`` CLI on small simulated BIDS datasets."""
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from metaqsm_bids import __version__
from metaqsm_bids.io.outputs import OUTPUTS, output_path
from metaqsm_bids.qsm.network.deepqsm import model_sha256
from metaqsm_bids.qsm.network.models import METAQSM_MODEL
from metaqsm_bids.qsm.core.physics import b0_direction_voxel, voxel_size_mm
from metaqsm_bids.qsm.core.smv import erode_mask
from metaqsm_bids.sim.dataset import RunSpec, simulate_dataset

from .conftest import run_cli

pytestmark = pytest.mark.slow

TRUTH = Path("derivatives") / "metaqsm-simulate"
RUNS = [
    # anisotropic voxels everywhere; ses-2 is oblique and stores Siemens-style integer phase
    RunSpec("01", session="1", shape=(64, 64, 32), voxel_size_mm=(1.0, 1.0, 2.0), seed=1),
    RunSpec("01", session="2", shape=(64, 64, 32), voxel_size_mm=(1.0, 1.0, 2.0), oblique_deg=20.0,
            phase_units="arbitrary", seed=2),
    RunSpec("02", shape=(64, 60, 36), voxel_size_mm=(1.1, 1.1, 1.8), echo_times_s=(0.005, 0.010, 0.015), seed=3),
]
PREFIXES = ["sub-01/ses-1/{dt}/sub-01_ses-1", "sub-01/ses-2/{dt}/sub-01_ses-2", "sub-02/{dt}/sub-02"]
#: Every derivative of these (multi-echo, brain-referenced) runs, from the output spec (tests/test_outputs.py
#: checks each kind's name letter by letter).
RUN_KINDS = [kind for kind, output in OUTPUTS.items() if output.written in ("always", "two echoes or more")]


def _path(root, prefix, kind, ext=None):
    """The derivative of ``kind`` of the run named at the end of ``prefix`` (one of PREFIXES), by the output spec."""
    short = dict(part.split("-", 1) for part in prefix.rsplit("/", 1)[1].split("_"))
    return output_path(root, kind, {"subject": short["sub"], "session": short.get("ses")}, ext)


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    bids_dir, out, work = root / "bids", root / "out", root / "work"
    simulate_dataset(bids_dir, RUNS)
    result = run_cli("metaqsm", bids_dir, out, "participant", "-w", work, "--nprocs", "2", "--omp-nthreads", "1")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return bids_dir, out, work, result


def test_every_derivative_and_sidecar(processed):
    bids_dir, out, _, result = processed
    assert "sub-01: OK (2 run(s))" in result.stdout and "sub-02: OK (1 run(s))" in result.stdout
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    generated = description["GeneratedBy"][0]
    assert generated["Name"] == "metaqsm" and generated["Version"] == __version__ and generated["CodeURL"]
    assert Path(description["DatasetLinks"]["raw"].removeprefix("file://")) == bids_dir.resolve()

    for prefix in PREFIXES:
        for kind in RUN_KINDS:
            image, sidecar_path = _path(out, prefix, kind), _path(out, prefix, kind, ".json")
            assert image.exists() and sidecar_path.exists(), image
            sidecar = json.loads(sidecar_path.read_text())
            assert isinstance(sidecar["SkullStripped"], bool)
            assert sidecar["SoftwareVersions"].startswith(f"metaqsm {__version__}, ")
            assert sidecar["MagneticFieldStrength"] == 3.0 and len(sidecar["EchoTime"]) in (3, 4)
            for uri in sidecar["Sources"]:  # every Source resolves to a file that exists
                dataset, _, relative = uri.removeprefix("bids:").partition(":")
                assert (bids_dir if dataset == "raw" else out).joinpath(relative).exists(), uri
        chimap = json.loads(_path(out, prefix, "chimap", ".json").read_text())
        assert chimap["Units"] == "ppm"
        assert chimap["DipoleInversion"]["Method"] == "Meta-QSM" and chimap["DipoleInversion"]["Model"] == METAQSM_MODEL
        bfr = chimap["BackgroundFieldRemoval"]
        # TFI, the default: 6 steps on the coarse grid (these voxels are at most 1.1 mm in plane), 3 on the image's
        assert bfr["Method"] == "TFI" and bfr["PolynomialOrder"] == 2 and bfr["CoarseFactors"] == [2, 2, 1]
        assert bfr["Iterations"] == (60 + 5 * 30) + 3 * 30
        assert any(s.startswith("bids:raw:") and "part-phase" in s for s in chimap["Sources"])
        for kind in ("total_field", "local_field"):
            assert json.loads(_path(out, prefix, kind, ".json").read_text())["Units"] == "Hz"
        for kind, units in (("r2star", "1/s"), ("t2star", "s")):
            sidecar = json.loads(_path(out, prefix, kind, ".json").read_text())
            fit = sidecar["R2starFit"]
            assert sidecar["Units"] == units and sidecar["SkullStripped"] is True
            assert fit["Method"] == "weighted log-linear fit" and fit["EchoTime"] == sidecar["EchoTime"]
            assert fit["R2starRangeHz"] == [0.0, 1000.0] and fit["T2starMaxSeconds"] == 1.0
            assert fit["ElapsedSeconds"] >= 0 and sidecar["BrainMask"]["Voxels"] > 0
            raw = [uri for uri in sidecar["Sources"] if uri.startswith("bids:raw:")]
            assert raw and all("_part-mag_" in uri for uri in raw)  # the decay is the magnitude's
            assert any(uri.endswith("_desc-brain_mask.nii.gz") for uri in sidecar["Sources"])
        # the default reference, the whole brain, is what the inversion gives: its mean there was ~0 already
        reference = chimap["SusceptibilityReference"]
        assert reference["Region"] == "brain" and reference["Mask"].endswith("_desc-qsm_mask.nii.gz")
        assert abs(reference["MeanBeforeReferencingPpm"]) < 1e-6 and reference["Voxels"] > 0
        assert not _path(out, prefix, "reference_mask").exists()
        swi, mip = (json.loads(_path(out, prefix, kind, ".json").read_text()) for kind in ("swi", "mip"))
        for sidecar in (swi, mip):
            assert sidecar["Units"] == "arbitrary" and sidecar["SWI"]["PhaseMaskPower"] == 4
            assert sidecar["SWI"]["PhaseMaskSign"] == "negative" and sidecar["SWI"]["EchoTimeUsed"] in sidecar["EchoTime"]
        assert swi["Sources"][0].endswith("_desc-total_magnitude.nii.gz")
        assert swi["Sources"][1].endswith("_desc-local_fieldmap.nii.gz")
        assert len(mip["Sources"]) == 1 and mip["Sources"][0].endswith("_desc-swi_T2starw.nii.gz")
        slab = mip["MinimumIntensityProjection"]
        assert slab["SlabSlices"] == 5 and slab["SlabAxis"] == 2 and slab["SlabThicknessRequestedMm"] == 8.0


def test_chimap_matches_truth(processed):
    bids_dir, out, _, _ = processed
    for spec, prefix in zip(RUNS, PREFIXES):
        chimap = nib.load(_path(out, prefix, "chimap"))
        mask = np.asarray(nib.load(_path(out, prefix, "qsm_mask")).dataobj) > 0
        truth_img = nib.load(bids_dir / TRUTH / (prefix.format(dt="anat") + "_Chimap.nii.gz"))
        raw = nib.load(bids_dir / (prefix.format(dt="anat") + "_echo-1_part-phase_MEGRE.nii.gz"))
        assert np.allclose(chimap.affine, raw.affine, atol=1e-4) and chimap.shape == raw.shape
        brain = nib.load(bids_dir / TRUTH / (prefix.format(dt="anat") + "_desc-brain_mask.nii.gz")).get_fdata() > 0
        # TFI (the default), as PDF, keeps the brain whole: measured 0.99 of it in each run
        assert np.count_nonzero(mask & brain) > 0.95 * brain.sum()
        # deeper than 6 mm (where RESHARP, the default before, kept its mask, and scored > 0.6) measured with
        # metaqsm-v4 0.74 / 0.64 / 0.69 (TKD 0.74 / 0.67 / 0.71); in the whole mask of these 64 mm heads, over half
        # of it within 6 mm of the edge, 0.31 / 0.27 / 0.33 (TKD 0.34 / 0.30 / 0.37; metaqsm-v3 0.34 / 0.31 /
        # 0.37). Heads this small are smaller than what metaqsm-v4 sees around a voxel (it was trained on
        # 128x128x64 crops); on the qsm-forward heads and on their slabs down to 32 mm it beats TKD
        # (BENCHMARKS.md, "metaqsm-v4"). metaqsm-v5 (its recipe with a share of 64x64x32 crops) with the default
        # edge-weighted data consistency (4 mm, one majorize-minimize step): 0.74 / 0.64 / 0.69 deep, 0.31 / 0.26 /
        # 0.32 in the whole mask (the closed form: within 0.01 of these). metaqsm-v9 with the 6 mm edge: 0.85 / 0.78 /
        # 0.82 deep, 0.35 / 0.31 / 0.38 in the whole mask; metaqsm-v10 passes (its values not recorded). metaqsm-v11
        # with PDF 0.89 / 0.82 / 0.87 deep, 0.44 / 0.39 / 0.47 in the whole mask; with TFI (the default since the
        # twenty-fourth session) 0.91 / 0.85 / 0.89 and 0.50 / 0.42 / 0.53 (TKD 0.77 / 0.70 / 0.73 and 0.44 / 0.36 /
        # 0.44): the bounds raised to 0.75 and 0.35.
        deep = mask & erode_mask(brain, voxel_size_mm(chimap.affine), 6.0)
        chi, truth = chimap.get_fdata(), truth_img.get_fdata()
        assert np.corrcoef(chi[deep], truth[deep])[0, 1] > 0.75, prefix
        assert np.corrcoef(chi[mask], truth[mask])[0, 1] > 0.35, prefix
        sidecar = json.loads(_path(out, prefix, "chimap", ".json").read_text())
        # the default inversion is the shipped Meta-QSM, named by its sha256
        assert sidecar["DipoleInversion"]["Method"] == "Meta-QSM"
        assert sidecar["DipoleInversion"]["ModelSHA256"] == model_sha256(METAQSM_MODEL)
        b0 = sidecar["DipoleInversion"]["B0DirectionVoxel"]
        assert np.allclose(b0, b0_direction_voxel(raw.affine), atol=1e-5)
        if spec.oblique_deg:
            assert abs(b0[2]) < 0.95  # the oblique run really has B0 off the slice axis


def test_r2star_matches_truth(processed):
    """R2* and T2* of each run against the simulator's R2* (tissue 18-40 s^-1 at 3 T; phase and magnitude at peak
    SNR 100), away from the brain's edge (partial volume with CSF and skull, field gradients)."""
    bids_dir, out, _, _ = processed
    for prefix in PREFIXES:
        r2star_img = nib.load(_path(out, prefix, "r2star"))
        r2star, t2star = r2star_img.get_fdata(), nib.load(_path(out, prefix, "t2star")).get_fdata()
        mask = np.asarray(nib.load(_path(out, prefix, "brain_mask")).dataobj) > 0
        truth = nib.load(bids_dir / TRUTH / (prefix.format(dt="anat") + "_R2starmap.nii.gz")).get_fdata()
        deep = mask & erode_mask(mask, voxel_size_mm(r2star_img.affine), 6.0) & (truth > 10)
        assert deep.sum() > 1000
        error = r2star[deep] / truth[deep] - 1
        assert abs(np.median(error)) < 0.1, (prefix, np.median(error))
        assert np.all(r2star[~mask] == 0) and np.all(t2star[~mask] == 0)
        assert np.allclose(t2star[deep], 1 / np.maximum(r2star[deep], 1.0), rtol=1e-5)


def test_swi_darkens_the_veins_and_its_mip_is_the_slab_minimum(processed):
    """SWI = RSS magnitude x the phase mask of the local field: darker than the magnitude where the field is
    paramagnetic, equal to it elsewhere; the mIP is the minimum over 5 slices centred on each."""
    _, out, _, _ = processed
    for prefix in PREFIXES:
        swi_img = nib.load(_path(out, prefix, "swi"))
        swi, mip = swi_img.get_fdata(), nib.load(_path(out, prefix, "mip")).get_fdata()
        magnitude = nib.load(_path(out, prefix, "magnitude")).get_fdata()
        field = nib.load(_path(out, prefix, "local_field")).get_fdata()
        te = json.loads(_path(out, prefix, "swi", ".json").read_text())["SWI"]["EchoTimeUsed"]
        expected = magnitude * np.clip(1 - 2 * field * te, 0, 1) ** 4
        assert np.allclose(swi, expected, rtol=1e-4, atol=1e-4 * magnitude.max())
        assert np.all(swi[field <= 0] == magnitude[field <= 0])
        # measured 721 and 653 voxels (the simulated veins' field is mostly that of cylinders across B0, negative
        # inside: their darkening in SWI is that of their magnitude; a Lorentz sphere's field is 0 inside)
        assert (swi < 0.8 * magnitude).sum() > 200
        k = swi.shape[2] // 2
        assert np.allclose(mip[..., k], swi[..., k - 2:k + 3].min(axis=2))


@pytest.fixture(scope="module")
def csf_referenced(processed, tmp_path_factory):
    """sub-02 again with --reference csf, from a copy of the work folder (the original's cache stays as the
    idempotence test expects it)."""
    bids_dir, _, work, _ = processed
    root = tmp_path_factory.mktemp("csf")
    shutil.copytree(work, root / "work")
    out = root / "out"
    result = run_cli("metaqsm", bids_dir, out, "participant", "-w", root / "work", "--participant-label", "02",
                     "--reference", "csf", "--nprocs", "1")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return bids_dir, out


def test_csf_reference_is_the_ventricles_and_its_mean_is_recorded(processed, csf_referenced):
    bids_dir, out = csf_referenced
    brain_out, prefix = processed[1], PREFIXES[2]
    region = np.asarray(nib.load(_path(out, prefix, "reference_mask")).dataobj) > 0
    labels = np.asarray(nib.load(bids_dir / TRUTH / "sub-02/anat/sub-02_dseg.nii.gz").dataobj)
    assert region.sum() >= 20 and np.all(labels[region] == 10)  # the simulator's CSF label, nothing else
    sidecar = json.loads(_path(out, prefix, "chimap", ".json").read_text())
    reference = sidecar["SusceptibilityReference"]
    assert reference["Region"] == "csf" and reference["Voxels"] == region.sum()
    assert reference["Mask"] == "bids::sub-02/anat/sub-02_desc-reference_mask.nii.gz"
    assert reference["Mask"] in sidecar["Sources"] and "ventricular CSF" in sidecar["Description"]
    mask_sidecar = json.loads(_path(out, prefix, "reference_mask", ".json").read_text())
    assert mask_sidecar["Type"] == "ROI" and any(uri.endswith("_R2starmap.nii.gz") for uri in mask_sidecar["Sources"])
    # the Chimap is the brain-referenced one less the CSF's mean, recorded before subtracting
    chi, brain_chi = (nib.load(_path(root, prefix, "chimap")).get_fdata() for root in (out, brain_out))
    qsm = np.asarray(nib.load(_path(out, prefix, "qsm_mask")).dataobj) > 0
    assert np.isclose(reference["MeanBeforeReferencingPpm"], brain_chi[region].mean(), atol=1e-6)
    assert np.allclose(chi[qsm], brain_chi[qsm] - reference["MeanBeforeReferencingPpm"], atol=1e-6)
    assert abs(chi[region].mean()) < 1e-6


def test_outputs_pass_bids_validator(processed, csf_referenced, bids_validator):
    bids_dir, out, _, _ = processed
    for dataset in (bids_dir, out, csf_referenced[1]):
        result = subprocess.run([bids_validator, str(dataset)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:]
        assert "[ERROR]" not in result.stdout


def test_rerun_is_idempotent_and_group_summary(processed):
    bids_dir, out, work, _ = processed
    before = _digest(out)
    result = run_cli("metaqsm", bids_dir, out, "participant", "-w", work, "--nprocs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _digest(out) == before

    # the output folder deleted, the work folder kept: nipype's cache must not stop the rewrite
    shutil.rmtree(out)
    result = run_cli("metaqsm", bids_dir, out, "participant", "-w", work, "--nprocs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _digest(out) == before

    result = run_cli("metaqsm", bids_dir, out, "group")
    assert result.returncode == 0, result.stderr
    rows = (out / "group_summary.tsv").read_text().splitlines()
    assert rows[0].startswith("participant_id\trun\tstatus")
    assert len(rows) == 1 + len(RUNS) and all("\tprocessed\tMeta-QSM\t" in r for r in rows[1:])


# --- bad input: one clear message naming the file, non-zero exit, nothing partial written -------------------


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    simulate_dataset(root / "bids", [RunSpec("01", shape=(48, 48, 24), voxel_size_mm=(1.2, 1.2, 2.4), seed=5),
                                     RunSpec("02", shape=(48, 48, 24), voxel_size_mm=(1.2, 1.2, 2.4), seed=6)])
    return root / "bids"


def _broken_copy(small_dataset, tmp_path, breaker):
    bids_dir = tmp_path / "bids"
    shutil.copytree(small_dataset, bids_dir)
    anat = bids_dir / "sub-02" / "anat"
    culprit = breaker(anat)
    return bids_dir, culprit


def _remove_echo_2_phase(anat):
    for path in anat.glob("*echo-2_part-phase*"):
        path.unlink()
    return anat / "sub-02_echo-2_part-mag_MEGRE.nii.gz"


# one broken participant at a time, case by case: tests/test_bad_inputs.py


def test_stop_on_first_crash_and_unknown_label(small_dataset, tmp_path):
    bids_dir, _ = _broken_copy(small_dataset, tmp_path, _remove_echo_2_phase)
    out = tmp_path / "out"
    result = run_cli("metaqsm", bids_dir, out, "participant", "-w", tmp_path / "work", "--participant-label",
                     "02", "01", "--stop-on-first-crash")
    assert result.returncode == 1 and "no matching part-phase file" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(out.glob("sub-*"))

    result = run_cli("metaqsm", bids_dir, out, "participant", "--participant-label", "sub-07")
    assert result.returncode == 1
    assert "['07'] not found" in result.stderr and "['01', '02']" in result.stderr


def test_empty_user_mask(small_dataset, tmp_path):
    masks = tmp_path / "masks" / "sub-01" / "anat"
    masks.mkdir(parents=True)
    ref = nib.load(small_dataset / "sub-01" / "anat" / "sub-01_echo-1_part-mag_MEGRE.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine), masks / "sub-01_desc-brain_mask.nii.gz")
    out = tmp_path / "out"
    result = run_cli("metaqsm", small_dataset, out, "participant", "--participant-label", "01",
                     "--brain-mask-dir", tmp_path / "masks", "-w", tmp_path / "work", "--nprocs", "1")
    assert result.returncode == 1
    assert "sub-01: FAILED" in result.stderr and "brain mask is empty" in result.stderr
    assert not (out / "sub-01").exists()


def test_single_echo_run(tmp_path):
    bids_dir, out = tmp_path / "bids", tmp_path / "out"
    simulate_dataset(bids_dir, [RunSpec("01", shape=(48, 48, 24), voxel_size_mm=(1.2, 1.2, 2.4),
                                        echo_times_s=(0.015,), seed=8)])
    result = run_cli("metaqsm", bids_dir, out, "participant", "-w", tmp_path / "work", "--nprocs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = "sub-01/{dt}/sub-01"
    sidecar = json.loads(_path(out, prefix, "total_field", ".json").read_text())
    assert sidecar["EchoTime"] == [0.015] and "single echo" in sidecar["TotalField"]["Method"]
    chi = nib.load(_path(out, prefix, "chimap")).get_fdata()
    mask = np.asarray(nib.load(_path(out, prefix, "qsm_mask")).dataobj) > 0
    truth = nib.load(bids_dir / TRUTH / "sub-01/anat/sub-01_Chimap.nii.gz").get_fdata()
    brain = nib.load(bids_dir / TRUTH / "sub-01/anat/sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    deep = mask & erode_mask(brain, voxel_size_mm(nib.load(_path(out, prefix, "chimap")).affine), 6.0)
    # one echo: no echo-fit residual flags the rim's bad voxels, and the background removal keeps them. Measured
    # on this 58 mm head: correlation 0.55 deeper than 6 mm and 0.19 in the whole mask (97 % of the brain) with
    # PDF and metaqsm-v4; RESHARP 0.76 in its 34 %. With metaqsm-v11: PDF 0.74 / 0.195, TFI (the default since the
    # twenty-fourth session) 0.81 / 0.150: deeper better, the whole mask worse, as TFI's sources outside no longer
    # absorb the rim's bad field (the tissue inside competes for it, so it stays in the local field); the whole-mask
    # bound lowered from 0.15 to 0.1 for that, the deep one raised from 0.45 to 0.7. On the benchmark's 0.76x0.76x3
    # head with its first echo only, PDF and RESHARP are level (TKD NRMSE 141 and 142 %, BENCHMARKS.md)
    assert np.corrcoef(chi[deep], truth[deep])[0, 1] > 0.7
    assert np.corrcoef(chi[mask], truth[mask])[0, 1] > 0.1


def test_session_label_and_bids_filter_file(processed, tmp_path):
    bids_dir, _, _, _ = processed
    out = tmp_path / "out"
    result = run_cli("metaqsm", bids_dir, out, "participant", "--participant-label", "01", "--session-label", "2",
                     "-w", tmp_path / "work", "--nprocs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.rglob("*_Chimap.nii.gz")) == ["sub-01_ses-2_Chimap.nii.gz"]

    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"megre": {"session": "1"}}))
    out = tmp_path / "out_filtered"
    result = run_cli("metaqsm", bids_dir, out, "participant", "--participant-label", "01", "--bids-filter-file",
                     filters, "-w", tmp_path / "work", "--nprocs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.rglob("*_Chimap.nii.gz")) == ["sub-01_ses-1_Chimap.nii.gz"]


# measured correlations with the truth on this subject: l2+vsharp 0.355, ilsqr+pdf 0.387, medi+resharp 0.849,
# tkd+resharp 0.706, tkd+tfi 0.409 (0.401 with its 6 steps on its own grid before the coarse start; tkd+pdf 0.326).
# V-SHARP and PDF trail RESHARP on the head phantom (most of its
# small brain is near the edge, which RESHARP erodes); see issue 4's notes.
@pytest.mark.parametrize("inversion, bfr, min_corr", [("l2", "vsharp", 0.25), ("ilsqr", "pdf", 0.25),
                                                      ("medi", "resharp", 0.75), ("tkd", "resharp", 0.6),
                                                      ("tkd", "tfi", 0.35)])
def test_other_methods_through_cli(inversion, bfr, min_corr, small_dataset, tmp_path):
    out = tmp_path / "out"
    result = run_cli("metaqsm", small_dataset, out, "participant", "--participant-label", "01", "--inversion",
                     inversion, "--bfr", bfr, "-w", tmp_path / "work", "--nprocs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = "sub-01/{dt}/sub-01"
    sidecar = json.loads(_path(out, prefix, "chimap", ".json").read_text())
    # the methods' display names (their specs')
    names = {"l2": "L2", "ilsqr": "iLSQR", "medi": "MEDI", "tkd": "TKD", "vsharp": "V-SHARP", "pdf": "PDF",
             "resharp": "RESHARP", "tfi": "TFI"}
    assert sidecar["DipoleInversion"]["Method"] == names[inversion]
    assert sidecar["BackgroundFieldRemoval"]["Method"] == names[bfr]
    if inversion == "medi":
        assert sidecar["DipoleInversion"]["Lambda"] == 1000.0 and "lambda_" not in sidecar["DipoleInversion"]
    if inversion == "tkd":
        assert sidecar["DipoleInversion"]["Threshold"] == 0.2 and "threshold" not in sidecar["DipoleInversion"]
    if bfr == "tfi":  # its settings, and its CG iterations over all steps (on the coarse grid too, where there is one)
        bfr_sidecar = sidecar["BackgroundFieldRemoval"]
        assert (bfr_sidecar["Alpha"], bfr_sidecar["Steps"], bfr_sidecar["CoarseSteps"]) == (1e-3, 3, 6)
        assert bfr_sidecar["CoarseFactors"] == [2, 2, 1] and bfr_sidecar["Iterations"] == (60 + 5 * 30) + 3 * 30
    chi = nib.load(_path(out, prefix, "chimap")).get_fdata()
    mask = np.asarray(nib.load(_path(out, prefix, "qsm_mask")).dataobj) > 0
    truth = nib.load(small_dataset / TRUTH / "sub-01/anat/sub-01_Chimap.nii.gz").get_fdata()
    mask &= np.asarray(nib.load(small_dataset / TRUTH / "sub-01/anat/sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    corr = np.corrcoef(chi[mask], truth[mask])[0, 1]
    assert corr > min_corr, corr
    assert (out / "sub-01.html").exists()
