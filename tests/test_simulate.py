"""The head phantom, the MEGRE simulation and the ``metaqsm-simulate`` BIDS writer."""
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from metaqsm_bids.cli.simulate import main
from metaqsm_bids.qsm.core import dipole, physics
from metaqsm_bids.sim import phantom as P
from metaqsm_bids.sim.dataset import phase_to_arbitrary, rotation_about_i, simulate_dataset, write_megre_run

TES = (0.004, 0.008, 0.012)


def _validate(path):
    """Errors reported by the official BIDS validator (raw dataset and, recursively, its derivatives)."""
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        print("bids-validator-deno is not installed: skipping the BIDS validation")
        pytest.skip("bids-validator-deno executable not found")
    out = subprocess.run([exe, "-r", "--format", "json", str(path)], capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)
    errors = []
    for name, part in [("raw", report)] + list(report.get("derivativesSummary", {}).items()):
        errors += [(name, i["code"], i.get("subCode"), i.get("location"))
                   for i in part["issues"]["issues"] if i["severity"] == "error"]
    return errors


def test_cli_writes_a_valid_bids_dataset_with_sidecars(tmp_path, capsys):
    out = tmp_path / "bids"
    argv = [str(out), "--participants", "01", "sub-02", "--sessions", "pre", "--shape", "40", "40", "20",
            "--voxel-size", "2", "2", "4", "--echo-times", *map(str, TES), "--field-strength", "7",
            "--oblique-deg", "0", "20", "--phase-units", "arbitrary", "--peak-snr", "50"]
    assert main(argv) == 0
    assert "sub-02 ses-pre" in capsys.readouterr().out
    assert _validate(out) == []

    anat = out / "sub-02" / "ses-pre" / "anat"
    for n, te in enumerate(TES, start=1):
        for part in ("mag", "phase"):
            meta = json.loads((anat / f"sub-02_ses-pre_echo-{n}_part-{part}_MEGRE.json").read_text())
            assert meta["EchoTime"] == te and meta["EchoNumber"] == n
            assert meta["MagneticFieldStrength"] == 7.0
            assert meta["ImagingFrequency"] == pytest.approx(298.04, abs=0.01)  # MHz at 7 T
            assert meta["RepetitionTime"] > max(TES) and meta["FlipAngle"] > 0 and meta["Manufacturer"]
            assert ("Units" in meta) == (part == "phase")
        phase = nib.load(anat / f"sub-02_ses-pre_echo-{n}_part-phase_MEGRE.nii.gz")
        assert json.loads((anat / f"sub-02_ses-pre_echo-{n}_part-phase_MEGRE.json").read_text())["Units"] == "arbitrary"
        data = np.asanyarray(phase.dataobj)
        assert data.dtype == np.int16 and data.min() >= -4096 and data.max() <= 4095 and data.max() > 4000
    # sub-02 is the oblique one: its affine holds the 20 degree rotation about i
    affine = phase.affine
    np.testing.assert_allclose(affine[:3, :3], rotation_about_i(20) @ np.diag([2.0, 2.0, 4.0]), atol=1e-5)
    truth = out / "derivatives" / "metaqsm-simulate" / "sub-02" / "ses-pre"
    for name in ("anat/sub-02_ses-pre_Chimap", "anat/sub-02_ses-pre_dseg", "anat/sub-02_ses-pre_desc-brain_mask",
                 "fmap/sub-02_ses-pre_desc-total_fieldmap"):
        np.testing.assert_allclose(nib.load(truth / f"{name}.nii.gz").affine, affine, atol=1e-5)
    assert json.loads((truth / "anat/sub-02_ses-pre_Chimap.json").read_text())["Units"] == "ppm"
    assert (out / "participants.tsv").read_text().split() == ["participant_id", "sub-01", "sub-02"]

    # a second call adds runs to the dataset; a folder that is not BIDS is refused
    assert main([str(out), "--participants", "03", "--shape", "24", "24", "12", "--voxel-size", "3", "3", "6"]) == 0
    assert (out / "participants.tsv").read_text().split()[-1] == "sub-03"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as err:
        main([str(other)])
    assert err.value.code == 2 and "not a BIDS dataset" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def _at(phantom, xyz):
    """Value index of the voxel whose centre is at world point ``xyz`` (mm)."""
    ijk = np.linalg.solve(phantom.affine[:3, :3], np.asarray(xyz, float) - phantom.affine[:3, 3])
    assert np.allclose(ijk, np.rint(ijk), atol=1e-6), "test points must be voxel centres"
    idx = tuple(np.rint(ijk).astype(int))
    assert all(0 <= i < n for i, n in zip(idx, phantom.seg.shape)), f"{xyz} is outside the grid"
    return idx


def test_ground_truth_labels_and_values_where_the_anatomy_puts_them():
    # 1 mm voxels of an odd grid centred on 0: voxel centres at integer mm, where the structures are centred
    head = P.sample_head((97, 113, 99), (1.0, 1.0, 1.0), scale=1.0)
    points = {  # world mm -> tissue; every point is at least 1.7 mm inside its structure
        (19, 13, -8): "globus_pallidus", (-19, 13, -8): "globus_pallidus", (25, 19, -6): "putamen",
        (-15, 31, 1): "caudate", (11, -2, 1): "thalamus", (-5, -3, -16): "red_nucleus",
        (11, 1, -19): "substantia_nigra", (-15, -40, -42): "dentate", (-40, 0, 20): "white_matter",
        (35, -50, -42): "grey_matter", (0, -30, -38): "csf", (0, -30, 9): "blood", (30, -22, 26): "calcification",
    }
    for xyz, name in points.items():
        idx = _at(head, xyz)
        tissue = P.TISSUES[name]
        assert head.seg[idx] == tissue.label, (xyz, name)
        assert head.chi_ppm[idx] == pytest.approx(tissue.chi_ppm, abs=1e-5), (xyz, name)
        assert head.brain_mask[idx], (xyz, name)
    for xyz, name in {(0, 40, -48): "sinus_air", (30, 48, -45): "bone"}.items():
        idx = _at(head, xyz)
        assert head.seg[idx] == P.TISSUES[name].label and not head.brain_mask[idx], (xyz, name)
        assert head.chi_ppm[idx] == pytest.approx(P.TISSUES[name].chi_ppm, abs=1e-5)
    # partial volume: a voxel centred on the calcification's surface is half calcification, half white matter
    assert head.chi_ppm[_at(head, (27, -22, 26))] == pytest.approx((-0.30 - 0.03) / 2, abs=0.03)

    # qsm-ci scores a reconstruction against this truth: perfect for the truth itself, and a map
    # with half the contrast has a deep-grey-matter slope of 0.5
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    truth = head.chi_ppm * head.brain_mask
    perfect = qsm_eval.challenge_metrics(truth, truth, head.brain_mask, head.seg)
    assert perfect["nrmse"] == pytest.approx(0.0, abs=1e-6) and perfect["dgm_linearity"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(perfect["calc_moment_dev"]) and np.isfinite(perfect["nrmse_blood"])
    halved = qsm_eval.challenge_metrics(0.5 * truth, truth, head.brain_mask, head.seg)
    assert halved["dgm_linearity"] == pytest.approx(0.5, abs=1e-3)


def test_head_is_shrunk_to_fit_the_in_plane_field_of_view():
    small = P.sample_head((40, 40, 20), (2.0, 2.0, 4.0), rotation_about_i(20))
    assert 0.3 < small.scale < 0.5
    for axis in (0, 1):  # no tissue on the in-plane edges
        assert not small.seg.take([0, -1], axis=axis).any()
    assert small.brain_mask.sum() > 0.1 * small.brain_mask.size
    cropped = P.sample_head((40, 40, 20), (2.0, 2.0, 4.0), scale=1.0)
    assert cropped.seg.take([0, -1], axis=1).any()


def test_noise_free_phase_is_offset_plus_field_times_echo_time():
    head = P.sample_head((48, 56, 40), (3.0, 3.0, 3.0))
    tes = np.array(TES)
    mag, phase, truth = P.simulate_megre(head, tes, 3.0, None, np.random.default_rng(1), oversample=1,
                                         return_truth=True)
    tissue = head.m0 > 0
    model = truth.phase_offset_rad[..., None] + 2 * np.pi * truth.field_hz[..., None] * tes
    residual = np.angle(np.exp(1j * (phase - model)))
    assert np.abs(residual[tissue]).max() < 1e-4  # rad, float32 round-off
    np.testing.assert_allclose(mag, head.m0[..., None] * np.exp(-tes * head.r2star_hz[..., None]), rtol=1e-4, atol=1e-5)
    # the offset is smooth and of a few rad; the shimmed field in the brain is a few tenths of a ppm
    offset = truth.phase_offset_rad[head.brain_mask]
    assert 0.3 < np.ptp(offset) < 4 * np.pi
    field_ppm = physics.field_hz_to_ppm(truth.field_hz[head.brain_mask], 3.0)
    assert 0.05 < field_ppm.std() < 0.5 and abs(field_ppm.mean()) < 0.01

    # with 2x2 sub-voxels the phase still follows the (voxel-mean) field, up to intra-voxel dephasing
    mag2, phase2, truth2 = P.simulate_megre(head, tes, 3.0, None, np.random.default_rng(1), return_truth=True)
    model2 = truth2.phase_offset_rad[..., None] + 2 * np.pi * truth2.field_hz[..., None] * tes
    error_hz = np.angle(np.exp(1j * (phase2 - model2))) / (2 * np.pi * tes)
    assert np.median(np.abs(error_hz[head.brain_mask])) < 0.01
    assert np.percentile(np.abs(error_hz[head.brain_mask]), 95) < 0.5
    assert np.abs(truth2.field_hz - truth.field_hz)[head.brain_mask].mean() < 1.0  # Hz, of a 17 Hz spread

    # noise: Rayleigh in the air around the head, sigma = peak first-echo magnitude / peak SNR
    noisy, _ = P.simulate_megre(head, tes, 3.0, 40.0, np.random.default_rng(2))
    sigma = mag2[..., 0].max() / 40.0
    air = ~ndimage.binary_dilation(head.m0 > 0)  # no tissue in or next to the voxel
    assert noisy[air].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)


def _harmonic_residual(field, head, select):
    """``field`` minus its least-squares fit by the 9 shim harmonics over ``select``."""
    ijk = np.stack(np.nonzero(select)).astype(float)
    world = head.affine[:3, :3] @ ijk + head.affine[:3, 3:]
    basis = np.stack(list(P.harmonic_basis(*world)), 1)
    values = field[select]
    return values - basis @ np.linalg.lstsq(basis, values, rcond=None)[0]


def test_oblique_field_uses_the_rotated_b0():
    angle, vox = 30.0, (3.0, 3.0, 3.0)
    straight = P.sample_head((64, 64, 64), vox, scale=0.7)
    oblique = P.sample_head((64, 64, 64), vox, rotation_about_i(angle), scale=0.7)
    np.testing.assert_allclose(oblique.affine[:3, :3], rotation_about_i(angle) * 3.0, atol=1e-12)
    b0 = physics.b0_direction_voxel(oblique.affine)
    np.testing.assert_allclose(b0, [0.0, np.sin(np.deg2rad(angle)), np.cos(np.deg2rad(angle))], atol=1e-12)
    field = {}
    for name, head in (("straight", straight), ("oblique", oblique)):
        _, _, truth = P.simulate_megre(head, [0.01], 3.0, None, np.random.default_rng(0), oversample=1,
                                       return_truth=True)
        field[name] = truth.field_hz
    inner = ndimage.binary_erosion(oblique.brain_mask, iterations=2)
    # shims differ with the grid, so compare what the 2nd-order harmonics leave (tissue and air sources)
    sim = _harmonic_residual(field["oblique"], oblique, inner)

    def mismatch(b0_dir):
        chi = oblique.chi_ppm - P.AIR_CHI_PPM  # the head fits the FOV: the padding is air
        direct = physics.field_ppm_to_hz(dipole.forward_field_ppm(chi, vox, b0_dir), 3.0)
        ref = _harmonic_residual(direct, oblique, inner)
        return np.sqrt(np.mean((sim - ref) ** 2)) / ref.std()

    assert mismatch(b0) < 0.06
    assert mismatch((0.0, 0.0, 1.0)) > 0.5  # B0 along the slice axis: wrong for an oblique slab
    assert mismatch((0.0, -b0[1], b0[2])) > 0.5  # the transposed rotation

    # the same world point sees the same field whether the slab is oblique or not
    to_straight = np.linalg.solve(straight.affine, oblique.affine)
    ijk = np.stack(np.nonzero(inner)).astype(float)
    resampled = np.zeros_like(field["straight"])
    resampled[inner] = ndimage.map_coordinates(field["straight"], to_straight[:3, :3] @ ijk + to_straight[:3, 3:],
                                               order=1)
    ref = _harmonic_residual(resampled, oblique, inner)
    assert np.sqrt(np.mean((sim - ref) ** 2)) / ref.std() < 0.25


def test_arbitrary_phase_units_and_writer_errors(tmp_path):
    np.testing.assert_array_equal(phase_to_arbitrary([0.0, np.pi / 2, -np.pi, np.pi, np.pi - 1e-3, -1e-9]),
                                  [0, 2048, -4096, -4096, 4096 - 1, 0])
    mag = np.ones((4, 4, 4, 2), np.float32)
    affine = np.eye(4)
    with pytest.raises(ValueError, match="one volume per echo"):
        write_megre_run(tmp_path, {"subject": "01"}, mag, mag[..., :1], affine, [0.01, 0.02], 3.0)
    with pytest.raises(ValueError, match="letters and digits"):
        write_megre_run(tmp_path, {"subject": "0_1"}, mag, mag, affine, [0.01, 0.02], 3.0)
    with pytest.raises(ValueError, match="phase_units"):
        write_megre_run(tmp_path, {"subject": "01"}, mag, mag, affine, [0.01, 0.02], 3.0, phase_units="deg")
    with pytest.raises(ValueError, match="NaN"):
        write_megre_run(tmp_path, {"subject": "01"}, mag, mag * np.nan, affine, [0.01, 0.02], 3.0)
    with pytest.raises(ValueError, match="brain is outside"):
        P.simulate_megre(P.sample_head((8, 8, 8), (1.0, 1.0, 1.0), scale=0.001), [0.01], 3.0, None,
                         np.random.default_rng(0))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="run must be"):
        simulate_dataset(tmp_path / "new", [{"subject": "01", "run": "a"}])
    assert not (tmp_path / "new").exists()
