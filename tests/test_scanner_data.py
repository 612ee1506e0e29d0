"""Data as scanners write it: vendor phase sign, true B0, integer phase ranges, bipolar readouts, input forms.

The sidecar-level rules are unit tests; the end-to-end tests run the real ``metaqsm`` CLI
(``--inversion tkd``: the inversion is not the point) on one simulated run stored in every
form below, one participant per form, and compare each Chimap with the reference's.
"""
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from metaqsm_bids.io.inputs import BIDSInputError, field_strength
from metaqsm_bids.qsm.field.bipolar import BipolarError
from metaqsm_bids.qsm.field.phase import echoes_to_rad
from metaqsm_bids.qsm.field.phase_sign import apply_phase_sign, resolve_phase_sign
from metaqsm_bids.qsm.core.physics import GAMMA_HZ_PER_T, voxel_size_mm
from metaqsm_bids.reports.content import methods_paragraph
from metaqsm_bids.sim.dataset import RunSpec, simulate_dataset

from .conftest import run_cli

TRUTH = Path("derivatives") / "metaqsm-simulate"
#: QSM challenge labels: caudate, globus pallidus, putamen (deep grey matter), blood (veins), white matter.
DEEP_GREY, VEINS, WHITE_MATTER = (1, 2, 3), (11,), 8


# ---------------------------------------------------------------- field strength

def test_imaging_frequency_gives_the_true_field_strength():
    b0 = field_strength({"ImagingFrequency": 123.2, "MagneticFieldStrength": 3}, "x.json")
    assert b0.tesla == pytest.approx(123.2e6 / GAMMA_HZ_PER_T, rel=1e-6) == pytest.approx(2.8935, abs=1e-4)
    assert b0.source.startswith("ImagingFrequency 123.2 MHz") and b0.nominal_tesla == 3.0
    assert re.search(r"x\.json: .*-3\.5% from the nominal", b0.warning)
    agree = field_strength({"ImagingFrequency": 127.7, "MagneticFieldStrength": 3}, "x.json")
    assert agree.warning is None  # 0.03% apart


@pytest.mark.parametrize("meta, tesla, source, warning", [
    ({"MagneticFieldStrength": 3.0}, 3.0, "nominal", "no ImagingFrequency"),
    ({"ImagingFrequency": 297.2}, 297.2e6 / GAMMA_HZ_PER_T, "ImagingFrequency", "no MagneticFieldStrength"),
])
def test_one_source_only_warns(meta, tesla, source, warning):
    b0 = field_strength(meta, "y.json")
    assert b0.tesla == pytest.approx(tesla, rel=1e-6) and source in b0.source and warning in b0.warning


@pytest.mark.parametrize("meta, message", [
    ({}, "neither MagneticFieldStrength nor ImagingFrequency"),
    ({"ImagingFrequency": 123200000.0}, "must be the proton Larmor frequency in MHz"),
    ({"MagneticFieldStrength": "3T"}, "is not a number"),
])
def test_unusable_field_strength_names_the_file(meta, message):
    with pytest.raises(BIDSInputError, match=rf"^z\.json: .*{message}"):
        field_strength(meta, "z.json")


# ---------------------------------------------------------------- phase sign

@pytest.mark.parametrize("manufacturer, factor", [
    ("Siemens", -1), ("SIEMENS", -1), ("Siemens Healthineers", -1), ("Philips Medical Systems", -1),
    ("Philips", -1), ("GE MEDICAL SYSTEMS", 1), ("GE HealthCare", 1), ("metaqsm-simulate", 1),
])
def test_auto_phase_sign_follows_the_vendor_table(manufacturer, factor):
    sign = resolve_phase_sign("auto", manufacturer)
    assert sign.factor == factor and sign.warning is None and manufacturer in sign.reason
    assert sign.provenance()["PhaseSignFactor"] == factor


@pytest.mark.parametrize("manufacturer", [None, "Canon Medical Systems", "Bruker BioSpin", "Agelity"])
def test_unknown_vendor_keeps_the_phase_and_warns(manufacturer):
    sign = resolve_phase_sign("auto", manufacturer, where="p.nii.gz")
    assert sign.factor == 1 and sign.warning.startswith("p.nii.gz: Manufacturer")
    assert "--phase-sign" in sign.warning and "Warnings" not in sign.provenance()


def test_explicit_choices_override_the_vendor():
    assert resolve_phase_sign("as-is", "Siemens").factor == 1
    assert resolve_phase_sign("invert", "GE MEDICAL SYSTEMS").factor == -1
    with pytest.raises(ValueError, match="phase sign"):
        resolve_phase_sign("flip", "GE")
    phase = np.array([-np.pi, -1.0, 0.0, 2.0], np.float32)
    np.testing.assert_array_equal(apply_phase_sign(phase, -1), np.array([-np.pi, 1.0, 0.0, -2.0], np.float32))


# ---------------------------------------------------------------- phase scaling

def _wrapped(rng, shape, turns):
    return np.angle(np.exp(1j * rng.uniform(-turns * np.pi, turns * np.pi, shape)))


@pytest.mark.parametrize("stored, units, expected", [
    (lambda p: np.rint(p * 2048 / np.pi).astype(np.int16), "arbitrary", "12-bit signed"),
    (lambda p: ((np.rint(p * 4096 / np.pi) + 4096) % 8192 - 4096).astype(np.int16), "arbitrary", "Siemens [-4096"),
    (lambda p: np.rint(p * 1000).astype(np.int16), None, "milliradians"),
    (lambda p: (np.rint(np.mod(p, 2 * np.pi) * 4096 / (2 * np.pi)) % 4096).astype(np.uint16), None, "12-bit un"),
    (lambda p: np.degrees(p), "arbitrary", "degrees [-180"),
])
def test_one_known_convention_for_all_echoes(stored, units, expected):
    """An early echo that does not wrap (and a zeroed background) gets the scale of the run, not its own range."""
    rng = np.random.default_rng(0)
    early = np.zeros((20, 20, 20))
    early[5:15, 5:15, 5:15] = rng.uniform(-0.6, 0.6, (10, 10, 10))  # no wrap yet, background zero
    echoes = [early, _wrapped(rng, (20, 20, 20), 4), _wrapped(rng, (20, 20, 20), 8)]
    rad, info = echoes_to_rad([stored(e) for e in echoes], units)
    assert info["PhaseConvention"].startswith(expected), info
    for truth, got in zip(echoes, rad):
        step = info["RadiansPerUnit"]
        assert np.abs(np.angle(np.exp(1j * (got - truth)))).max() <= step / 2 + 1e-6


def test_minus_2048_to_2048_is_scaled_by_pi_over_2048():
    raw = np.arange(-2048, 2049, dtype=np.int16).reshape(1, 1, -1)
    rad, info = echoes_to_rad([raw, raw[..., ::-1]], "arbitrary")
    assert info["RadiansPerUnit"] == pytest.approx(np.pi / 2048)
    np.testing.assert_allclose(np.exp(1j * rad[0]), np.exp(1j * raw * np.pi / 2048), atol=1e-6)


@pytest.mark.parametrize("values", [np.arange(-1000, 1001), np.arange(0, 9001), np.linspace(-0.5, 0.5, 11)])
def test_a_range_that_fits_no_convention_is_refused_naming_the_file(values):
    with pytest.raises(ValueError, match=r"^echo-2\.nii\.gz: the phase of this run ranges over .* no known phase"):
        echoes_to_rad([values * 0.5, values], "arbitrary", ["echo-1.nii.gz", "echo-2.nii.gz"])


# ---------------------------------------------------------------- end to end

def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _copy_subject(bids, source, target, transform=None):
    """Copy ``sub-<source>``'s MEGRE files (and truth) to ``sub-<target>``; ``transform(part, echo, data, meta)``
    may change each image and sidecar."""
    for path in sorted((bids / f"sub-{source}" / "anat").glob("*_MEGRE.nii.gz")):
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        part = re.search(r"part-(\w+?)_", path.name).group(1)
        echo = int(re.search(r"echo-(\d+)", path.name).group(1))
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        if transform is not None:
            data, meta = transform(part, echo, data, meta)
        stem = bids / f"sub-{target}" / "anat" / path.name.replace(f"sub-{source}", f"sub-{target}")
        stem.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, img.affine), str(stem))
        stem.with_name(stem.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))
    shutil.copytree(bids / TRUTH / f"sub-{source}", bids / TRUTH / f"sub-{target}", dirs_exist_ok=True)
    for path in (bids / TRUTH / f"sub-{target}").rglob(f"sub-{source}_*"):
        path.rename(path.with_name(path.name.replace(f"sub-{source}", f"sub-{target}")))


def _negated(manufacturer):
    def transform(part, echo, data, meta):
        meta = {**meta, "Manufacturer": manufacturer}
        return (apply_phase_sign(data, -1) if part == "phase" else data), meta
    return transform


def _frequency(part, echo, data, meta):
    return data, {**meta, "ImagingFrequency": 123.2}


def _int2048(part, echo, data, meta):
    if part != "phase":
        return data, meta
    return np.rint(data * 2048 / np.pi).astype(np.int16), {**meta, "Units": "arbitrary"}


def _bipolar(affine):
    error = BipolarError(0.4, (0.01, 0.0, 0.0), 0.0)  # 0.4 rad + 0.01 rad/mm along the readout (i)

    def transform(part, echo, data, meta):
        if part != "phase" or echo % 2:
            return data, meta
        e = error.map(data.shape, voxel_size_mm(affine))
        return np.angle(np.exp(1j * (data + e))).astype(np.float32), meta
    return transform


def _write_real_imag(bids, source, target):
    anat = bids / f"sub-{target}" / "anat"
    anat.mkdir(parents=True)
    for mag_path in sorted((bids / f"sub-{source}" / "anat").glob("*_part-mag_MEGRE.nii.gz")):
        phase_path = Path(str(mag_path).replace("part-mag", "part-phase"))
        img = nib.load(str(mag_path))
        signal = _load(mag_path) * np.exp(1j * _load(phase_path).astype(np.float64))
        meta = json.loads(phase_path.with_name(phase_path.name.replace(".nii.gz", ".json")).read_text())
        meta.pop("Units")
        for part, values in (("real", signal.real), ("imag", signal.imag)):
            name = mag_path.name.replace(f"sub-{source}", f"sub-{target}").replace("part-mag", f"part-{part}")
            nib.save(nib.Nifti1Image(values.astype(np.float32), img.affine), str(anat / name))
            (anat / name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))
    shutil.copytree(bids / TRUTH / f"sub-{source}", bids / TRUTH / f"sub-{target}")


def _write_4d(bids, source, target):
    anat = bids / f"sub-{target}" / "anat"
    anat.mkdir(parents=True)
    for part in ("mag", "phase"):
        paths = sorted((bids / f"sub-{source}" / "anat").glob(f"*_part-{part}_MEGRE.nii.gz"))
        metas = [json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text()) for p in paths]
        data = np.stack([_load(p) for p in paths], axis=-1)
        meta = {**metas[0], "EchoTime": [m["EchoTime"] for m in metas]}
        meta.pop("EchoNumber")
        nib.save(nib.Nifti1Image(data, nib.load(str(paths[0])).affine), str(anat / f"sub-{target}_part-{part}_MEGRE.nii.gz"))
        (anat / f"sub-{target}_part-{part}_MEGRE.json").write_text(json.dumps(meta))


def _write_contrast_runs(bids, source, target):
    for ce in ("pre", "post"):
        _copy_subject(bids, source, target)
        for path in sorted((bids / f"sub-{target}" / "anat").glob(f"sub-{target}_echo-*")):
            path.rename(path.with_name(path.name.replace(f"sub-{target}_", f"sub-{target}_ce-{ce}_")))


def _write_one_echo(bids, source, target):
    _copy_subject(bids, source, target)
    for path in (bids / f"sub-{target}" / "anat").glob("*_echo-[234]_*"):
        path.unlink()


@pytest.fixture(scope="module")
def scanner_forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("scanner")
    bids, out, work = root / "bids", root / "out", root / "work"
    simulate_dataset(bids, [RunSpec("ref", shape=(64, 64, 32), voxel_size_mm=(1.0, 1.0, 2.0), seed=7)])
    affine = nib.load(str(next((bids / "sub-ref" / "anat").glob("*_echo-1_part-mag_MEGRE.nii.gz")))).affine
    _copy_subject(bids, "ref", "siemens", _negated("Siemens"))
    _copy_subject(bids, "ref", "unknown", _negated("Acme Imaging"))
    _copy_subject(bids, "ref", "negated", _negated("Acme Imaging"))  # for --phase-sign invert below
    _copy_subject(bids, "ref", "freq", _frequency)
    _copy_subject(bids, "ref", "int", _int2048)
    _copy_subject(bids, "ref", "bipolar", _bipolar(affine))
    _write_real_imag(bids, "ref", "realimag")
    _write_4d(bids, "ref", "fourd")
    _write_contrast_runs(bids, "ref", "ce")
    _write_one_echo(bids, "ref", "one")
    # TKD and PDF, linear in the field, so that the inputs' forms compare exactly (TFI, the default background
    # removal, is not: its TV weight is on the field in ppm, so a different B0 is not a mere scale of its result)
    common = ["-w", work, "--inversion", "tkd", "--bfr", "pdf", "--nprocs", "2", "--omp-nthreads", "1",
              "--skip-bids-validation"]
    auto = run_cli("metaqsm", bids, out, "participant", *common, "--participant-label",
                   "ref", "siemens", "unknown", "freq", "int", "bipolar", "realimag", "fourd", "ce", "one")
    assert auto.returncode == 0, auto.stdout + auto.stderr[-4000:]
    inverted = run_cli("metaqsm", bids, root / "out_invert", "participant", *common,
                       "--participant-label", "negated", "--phase-sign", "invert")
    assert inverted.returncode == 0, inverted.stdout + inverted.stderr[-4000:]
    as_is = run_cli("metaqsm", bids, root / "out_asis", "participant", *common,
                    "--participant-label", "siemens", "ref", "--phase-sign", "as-is")
    assert as_is.returncode == 0, as_is.stdout + as_is.stderr[-4000:]
    return bids, {"auto": out, "invert": root / "out_invert", "as-is": root / "out_asis"}, auto


def _chi(out, subject, run=""):
    return _load(out / f"sub-{subject}" / "anat" / f"sub-{subject}{run}_Chimap.nii.gz").astype(np.float64)


def _sidecar(out, subject, run=""):
    return json.loads((out / f"sub-{subject}" / "anat" / f"sub-{subject}{run}_Chimap.json").read_text())


def _signs(bids, chi, subject):
    """Mean chi (ppm) in deep grey matter, veins and white matter, from the simulation's labels."""
    seg = _load(bids / TRUTH / f"sub-{subject}" / "anat" / f"sub-{subject}_dseg.nii.gz")
    inside = chi != 0

    def mean(labels):
        return float(chi[np.isin(seg, labels) & inside].mean())
    return mean(DEEP_GREY), mean(VEINS), mean((WHITE_MATTER,))


pytestmark_slow = pytest.mark.slow  # the unit tests above are not slow


@pytestmark_slow
@pytest.mark.parametrize("choice, subject, factor", [("auto", "siemens", -1), ("invert", "negated", -1),
                                                     ("as-is", "ref", 1), ("auto", "ref", 1)])
def test_each_phase_sign_choice_gives_positive_deep_grey_matter_and_veins(scanner_forms, choice, subject, factor):
    """Negated (Siemens-like) phase with auto (Manufacturer Siemens) or --phase-sign invert, and phase in
    metaqsm's convention as-is, all give the reference map: deep grey matter and veins above white matter."""
    bids, outs, _ = scanner_forms
    chi = _chi(outs[choice], subject)
    grey, veins, white = _signs(bids, chi, subject)
    assert grey > 0.02 and veins > 0.05 and white < 0, (grey, veins, white)
    np.testing.assert_allclose(chi, _chi(outs["auto"], "ref"), atol=1e-5)
    scaling = _sidecar(outs[choice], subject)["PhaseScaling"]
    assert scaling["PhaseSignFactor"] == factor and scaling["PhaseSignChoice"] == choice


@pytestmark_slow
def test_wrong_sign_is_inverted_warned_and_flagged(scanner_forms):
    bids, outs, auto = scanner_forms
    for out, subject in ((outs["auto"], "unknown"), (outs["as-is"], "siemens")):
        chi = _chi(out, subject)
        grey, veins, _ = _signs(bids, chi, subject)
        assert grey < 0 and veins < 0
        np.testing.assert_allclose(chi, -_chi(outs["auto"], "ref"), atol=2e-3)
    assert "Manufacturer 'Acme Imaging' is not in metaqsm's phase-sign table" in auto.stderr
    sidecar = _sidecar(outs["auto"], "unknown")
    assert [w for w in sidecar["Warnings"] if "not in metaqsm's phase-sign table" in w] and \
        "Warnings" not in sidecar["PhaseScaling"]  # said once, for the run
    report = (outs["auto"] / "sub-unknown.html").read_text()
    assert "the Chimap looks inverted" in report
    assert "the Chimap looks inverted" not in (outs["auto"] / "sub-ref.html").read_text()


@pytestmark_slow
def test_imaging_frequency_scales_chi(scanner_forms):
    """123.2 MHz is 2.8935 T: chi is 3/2.8935 of the reference's (which ran at 127.73 MHz = 3 T)."""
    _, outs, auto = scanner_forms
    ref, freq = _chi(outs["auto"], "ref"), _chi(outs["auto"], "freq")
    sidecar = _sidecar(outs["auto"], "freq")
    assert sidecar["B0Tesla"] == pytest.approx(2.8935, abs=1e-4) and sidecar["MagneticFieldStrength"] == 3.0
    assert sidecar["B0Source"].startswith("ImagingFrequency 123.2 MHz")
    assert sidecar["DipoleInversion"]["MagneticFieldStrength"] == sidecar["B0Tesla"]
    ratio = _sidecar(outs["auto"], "ref")["B0Tesla"] / sidecar["B0Tesla"]
    assert ratio == pytest.approx(3 / 2.8935, rel=1e-4)
    np.testing.assert_allclose(freq, ref * ratio, rtol=1e-4, atol=1e-6)
    assert "-3.5% from the nominal MagneticFieldStrength" in auto.stderr
    assert "B0 = 2.8935 T from the imaging frequency" in methods_paragraph(sidecar)[0]


@pytestmark_slow
def test_integer_phase_minus_2048_to_2048(scanner_forms):
    _, outs, _ = scanner_forms
    scaling = _sidecar(outs["auto"], "int")["PhaseScaling"]
    assert scaling["PhaseConvention"].startswith("12-bit signed") and scaling["RadiansPerUnit"] == pytest.approx(
        np.pi / 2048)
    ref, chi = _chi(outs["auto"], "ref"), _chi(outs["auto"], "int")
    assert np.abs(chi - ref).max() < 0.005  # quantisation to pi/2048 rad only
    assert np.corrcoef(chi[ref != 0], ref[ref != 0])[0, 1] > 0.999


@pytestmark_slow
def test_planted_bipolar_error_is_removed(scanner_forms):
    _, outs, _ = scanner_forms
    record = _sidecar(outs["auto"], "bipolar")["TotalField"]["BipolarCorrection"]
    assert record["Applied"] and record["OffsetRad"] == pytest.approx(0.4, abs=0.01)
    assert record["GradientRadPerMm"][0] == pytest.approx(0.01, abs=5e-4)
    assert not _sidecar(outs["auto"], "ref")["TotalField"]["BipolarCorrection"]["Applied"]
    assert np.abs(_chi(outs["auto"], "bipolar") - _chi(outs["auto"], "ref")).max() < 0.005


@pytestmark_slow
# real/imag inputs reach the phase through float32 arctan2: rounding that PDF's ~190 CG iterations carry to at
# most 1.2e-4 ppm in 8 of 131072 voxels (measured; 1e-4 held with RESHARP, the default before)
@pytest.mark.parametrize("subject, atol", [("realimag", 3e-4), ("fourd", 0.0)])
def test_real_imag_and_4d_inputs_give_the_same_chimap(scanner_forms, subject, atol):
    _, outs, _ = scanner_forms
    np.testing.assert_allclose(_chi(outs["auto"], subject), _chi(outs["auto"], "ref"), atol=atol, rtol=0)
    sidecar = _sidecar(outs["auto"], subject)
    assert len(sidecar["EchoTime"]) == 4
    assert sidecar["PhaseScaling"]["Input"] == ("part-real, part-imag" if subject == "realimag" else
                                                "part-mag, part-phase")


@pytestmark_slow
def test_contrast_runs_are_told_apart(scanner_forms):
    _, outs, auto = scanner_forms
    assert "sub-ce: OK (2 run(s))" in auto.stdout
    for ce in ("pre", "post"):
        np.testing.assert_array_equal(_chi(outs["auto"], "ce", f"_ce-{ce}"), _chi(outs["auto"], "ref"))


@pytestmark_slow
def test_one_echo_warns_and_says_so(scanner_forms):
    _, outs, auto = scanner_forms
    assert "one echo only: the phase offset at TE = 0" in auto.stderr
    sidecar = _sidecar(outs["auto"], "one")
    assert any("one echo" in w for w in sidecar["Warnings"])
    text = methods_paragraph(sidecar)[0]
    assert "from 1 echo (TE = 4 ms)" in text and "could not be separated from the field" in text


# ---------------------------------------------------------------- input forms that are refused, by name

def _tiny_dataset(root, files):
    """A BIDS dataset with ``{relative path: (shape, sidecar)}`` MEGRE images (random data)."""
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    rng = np.random.default_rng(0)
    for relative, (shape, meta) in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(rng.uniform(0.1, 1, shape).astype(np.float32), np.eye(4)), str(path))
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))
    from bids import BIDSLayout
    return BIDSLayout(str(root), validate=False)


META = {"MagneticFieldStrength": 3.0, "ImagingFrequency": 127.7, "Manufacturer": "GE MEDICAL SYSTEMS"}


@pytest.mark.parametrize("files, culprit, message", [
    ({"sub-1/anat/sub-1_echo-1_MEGRE.nii.gz": ((4, 4, 4), {**META, "EchoTime": 0.004})},
     "sub-1_echo-1_MEGRE.nii.gz", "without a part- entity"),
    ({"sub-1/anat/sub-1_part-mag_MEGRE.nii.gz": ((4, 4, 4, 3), {**META, "EchoTime": 0.004}),
      "sub-1/anat/sub-1_part-phase_MEGRE.nii.gz": ((4, 4, 4, 3), {**META, "EchoTime": 0.004})},
     "sub-1_part-mag_MEGRE.nii.gz", "3 volume(s) on the 4th axis but the sidecar gives 1 EchoTime"),
    ({"sub-1/anat/sub-1_part-mag_MEGRE.nii.gz": ((4, 4, 4, 2), {**META, "EchoTime": [0.004, 0.008]}),
      "sub-1/anat/sub-1_echo-1_part-phase_MEGRE.nii.gz": ((4, 4, 4), {**META, "EchoTime": 0.004}),
      "sub-1/anat/sub-1_echo-2_part-phase_MEGRE.nii.gz": ((4, 4, 4), {**META, "EchoTime": 0.008})},
     "sub-1_echo-1_part-phase_MEGRE.nii.gz", "differ in layout"),
    ({"sub-1/anat/sub-1_echo-1_part-mag_MEGRE.nii.gz": ((4, 4, 4), {**META, "EchoTime": 0.004})},
     "sub-1_echo-1_part-phase_MEGRE.nii.gz",
     "no matching part-phase file for sub-1_echo-1_part-mag_MEGRE.nii.gz; QSM needs the phase"),
    ({"sub-1/anat/sub-1_echo-1_part-real_MEGRE.nii.gz": ((4, 4, 4), {**META, "EchoTime": 0.004})},
     "sub-1_echo-1_part-imag_MEGRE.nii.gz", "no matching part-imag file for sub-1_echo-1_part-real_MEGRE.nii.gz"),
    ({"sub-1/anat/sub-1_part-mag_MEGRE.nii.gz": ((4, 4, 4, 2), {**META, "EchoTime": [0.004, "x"]}),
      "sub-1/anat/sub-1_part-phase_MEGRE.nii.gz": ((4, 4, 4, 2), {**META, "EchoTime": [0.004, 0.008]})},
     "sub-1_part-mag_MEGRE.nii.gz", "is not a number or a list of numbers"),
], ids=["no-part", "4d-scalar-echotime", "mixed-layout", "magnitude-only", "real-only", "bad-echotime"])
def test_unsupported_forms_get_one_message_naming_the_file(tmp_path, files, culprit, message):
    from metaqsm_bids.io.inputs import find_megre_runs

    layout = _tiny_dataset(tmp_path, files)
    results = find_megre_runs(layout, "1")
    assert len(results) == 1
    error = results[0][1]
    assert isinstance(error, BIDSInputError), error
    assert str(error).split(":")[0].endswith(culprit) and message in str(error), str(error)


def test_every_run_entity_separates_runs(tmp_path):
    from metaqsm_bids.io.inputs import find_megre_runs

    files = {}
    for tail in ("ce-pre", "ce-post", "acq-a_chunk-1", "acq-a_chunk-2", "rec-x_inv-1", "flip-1_mt-on"):
        for part in ("mag", "phase"):
            files[f"sub-1/anat/sub-1_{tail}_echo-1_part-{part}_MEGRE.nii.gz"] = ((4, 4, 4), {**META, "EchoTime": 0.004})
    runs = find_megre_runs(_tiny_dataset(tmp_path, files), "1")
    names = sorted(run.name for _, run in runs)
    assert names == sorted(["sub-1_ce-pre", "sub-1_ce-post", "sub-1_acq-a_chunk-1", "sub-1_acq-a_chunk-2",
                            "sub-1_rec-x_inv-1", "sub-1_flip-1_mt-on"]), names
    assert all(run.warnings and "one echo only" in run.warnings[-1] for _, run in runs)
