"""The output spec (metaqsm_bids.io.outputs): every kind's file name, the name builder and its inverse, and the
writers that name files through it (the sink, the template spaces, the group summary)."""
import errno
import json
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from metaqsm_bids.io.derivatives import group_summary, write_json
from metaqsm_bids.io.outputs import (ENTITY_ORDER, OUTPUTS, TEMPLATE_OUTPUTS, output_name, output_path,
                                     parse_output_name, run_name, sidecar_path)

RUN = {"subject": "01", "session": "2", "acquisition": None, "run": 3}
#: Every kind's file name for RUN, written out: the names the e2e tests and the BIDS validator check.
NAMES = {
    "brain_mask": "anat/sub-01_ses-2_run-3_desc-brain_mask.nii.gz",
    "magnitude": "fmap/sub-01_ses-2_run-3_desc-total_magnitude.nii.gz",
    "total_field": "fmap/sub-01_ses-2_run-3_desc-total_fieldmap.nii.gz",
    "fit_residual": "fmap/sub-01_ses-2_run-3_desc-echofit_residual.nii.gz",
    "reliable_mask": "anat/sub-01_ses-2_run-3_desc-reliable_mask.nii.gz",
    "local_magnitude": "fmap/sub-01_ses-2_run-3_desc-local_magnitude.nii.gz",
    "local_field": "fmap/sub-01_ses-2_run-3_desc-local_fieldmap.nii.gz",
    "qsm_mask": "anat/sub-01_ses-2_run-3_desc-qsm_mask.nii.gz",
    "chimap": "anat/sub-01_ses-2_run-3_Chimap.nii.gz",
    "swi": "anat/sub-01_ses-2_run-3_desc-swi_T2starw.nii.gz",
    "mip": "anat/sub-01_ses-2_run-3_desc-mip_T2starw.nii.gz",
    "reference_mask": "anat/sub-01_ses-2_run-3_desc-reference_mask.nii.gz",
    "r2star": "anat/sub-01_ses-2_run-3_R2starmap.nii.gz",
    "t2star": "anat/sub-01_ses-2_run-3_T2starmap.nii.gz",
    "transform": "anat/sub-01_ses-2_run-3_from-orig_to-MNI152NLin2009cAsym_mode-image_xfm.mat",
}
#: BIDS's entity order (the specification's entity table), for the entities a derivative name can hold.
BIDS_ORDER = ["sub", "ses", "acq", "ce", "rec", "run", "flip", "inv", "mt", "space", "chunk", "res", "from", "to",
              "mode", "desc"]


def _entities(kind):
    return {**RUN, "to": "MNI152NLin2009cAsym"} if kind == "transform" else RUN


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_every_kind_is_named_as_before(kind, tmp_path):
    datatype, name = NAMES[kind].split("/")
    assert output_name(kind, _entities(kind)) == name
    assert output_path(tmp_path, kind, _entities(kind)) == tmp_path / "sub-01" / "ses-2" / datatype / name
    assert sidecar_path(tmp_path / name) == tmp_path / (name[: -len(OUTPUTS[kind].extension)] + ".json")
    assert output_name(kind, _entities(kind), ".json") == sidecar_path(tmp_path / name).name
    assert parse_output_name(name) == (kind, {k: str(v) for k, v in _entities(kind).items() if v is not None})


@pytest.mark.parametrize("kind", TEMPLATE_OUTPUTS)
def test_template_space_names(kind):
    entities = {**RUN, "space": "MNI152NLin2009cAsym", "res": 2}
    name = output_name(kind, entities)
    before = NAMES[kind].split("/")[1].replace("run-3_", "run-3_space-MNI152NLin2009cAsym_res-2_")
    assert name == before
    assert parse_output_name(name) == (kind, {k: str(v) for k, v in entities.items() if v is not None})


def test_spec_covers_every_name_entry():
    assert set(NAMES) == set(OUTPUTS)
    assert TEMPLATE_OUTPUTS == ("brain_mask", "magnitude", "qsm_mask", "chimap")


def test_entities_in_bids_order():
    assert list(ENTITY_ORDER.values()) == BIDS_ORDER
    every = {key: f"x{n}" for n, key in enumerate(ENTITY_ORDER) if key not in ("desc", "from", "mode")}
    for kind in OUTPUTS:
        entities = {k: v for k, v in every.items() if kind == "transform" or k != "to"}
        parts = output_name(kind, entities).split("_")[:-1]
        shorts = [part.split("-")[0] for part in parts]
        assert shorts == [short for short in BIDS_ORDER if short in shorts], kind
        assert ("desc" in shorts) == (OUTPUTS[kind].desc is not None)
        if OUTPUTS[kind].desc:
            assert parts[-1] == f"desc-{OUTPUTS[kind].desc}"
        assert parse_output_name(output_name(kind, entities))[0] == kind


def test_spec_facts():
    for kind, output in OUTPUTS.items():
        assert output.key == kind and output.description and output.datatype in ("anat", "fmap")
        assert output.interpolation == ("nearest" if output.mask else "linear"), kind
        assert output.written in ("always", "two echoes or more", "reference csf", "template spaces"), kind
    assert len({output.tail for output in OUTPUTS.values()}) == len(OUTPUTS)  # no two kinds share a name


def test_builder_refuses_what_has_no_name():
    with pytest.raises(ValueError, match="unknown derivative kind"):
        output_name("chi", RUN)
    with pytest.raises(ValueError, match="desc- label comes from the output spec"):
        output_name("qsm_mask", {**RUN, "desc": "other"})
    with pytest.raises(ValueError, match="no place"):
        output_name("chimap", {**RUN, "echo": 1})
    with pytest.raises(ValueError, match="subject"):
        output_name("chimap", {"session": "1"})
    with pytest.raises(ValueError, match="extension"):
        output_name("chimap", RUN, ".mat")


@pytest.mark.parametrize("name", [
    "sub-01_run-3_ses-2_Chimap.nii.gz",  # entities out of order
    "sub-01_desc-other_mask.nii.gz",  # a desc the spec has no kind for
    "sub-01_desc-qsm_mask.nii",  # another extension
    "sub-01_echo-1_Chimap.nii.gz",  # an entity a derivative does not hold
    "sub-01_ses-1_echo-1_part-mag_MEGRE.nii.gz", "sub-01.html", "sub-01_desc-overview_qsm.png",
    "sub-01_from-orig_to-X_xfm.h5",  # no mode-image
])
def test_parse_refuses_other_files(name):
    assert parse_output_name(name) is None


def test_run_name():
    assert run_name({**RUN, "space": "X", "res": "2"}) == "sub-01_ses-2_run-3"


# --- the writers name their files through the spec --------------------------------------------------

def _image(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return str(path)


def _sink_inputs(tmp_path, optional):
    """The sink's inputs on a 6x5x4 grid: every float image 0.5 in a box, every mask 1 there; and that mask."""
    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    raw = bids / "sub-01" / "ses-2" / "anat"
    raw.mkdir(parents=True)
    work.mkdir()
    mask = np.zeros((6, 5, 4))
    mask[1:5, 1:4, 1:3] = 1
    sources = [_image(raw / f"sub-01_ses-2_run-3_echo-1_part-{part}_MEGRE.nii.gz", mask) for part in ("mag", "phase")]
    image = _image(work / "image.nii.gz", mask * 0.5)
    binary = _image(work / "mask.nii.gz", mask)
    inputs = dict(
        output_dir=str(out), bids_dir=str(bids), entities=RUN, source_files=sources, brain_mask_file=binary,
        magnitude_rss_file=image, total_field_file=image, fit_residual_file=image, reliable_mask_file=binary,
        local_field_file=image, qsm_mask_file=binary, chimap_file=image, swi_file=image, mip_file=image,
        mask_provenance={}, phase_provenance={}, field_provenance={}, bfr_provenance={}, inversion_provenance={},
        reference_provenance={"Region": "csf" if optional else "brain"}, swi_provenance={}, mip_parameters={},
        acquisition={"EchoTime": [0.01], "MagneticFieldStrength": 3.0}, num_threads=3 if optional else 1)
    if optional:
        inputs.update(r2star_file=image, t2star_file=image, r2star_provenance={}, reference_mask_file=binary)
    return inputs, mask


@pytest.mark.parametrize("optional", [False, True], ids=["one echo", "csf reference, three writer threads"])
def test_sink_writes_only_spec_kinds(tmp_path, optional):
    from metaqsm_bids.interfaces.sink import WriteRunDerivatives

    inputs, mask = _sink_inputs(tmp_path, optional)
    out = tmp_path / "out"
    result = WriteRunDerivatives(**inputs).run(cwd=str(tmp_path / "work"))
    written = result.outputs.out_files
    expected = {kind for kind, output in OUTPUTS.items() if output.written == "always"
                or optional and output.written in ("two echoes or more", "reference csf")}
    assert set(written) == expected and set(written) <= set(OUTPUTS)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert on_disk == sorted(f"sub-01/ses-2/{NAMES[kind]}" for kind in expected)
    for kind, path in written.items():
        assert parse_output_name(path.rsplit("/", 1)[1]) == (kind, {"subject": "01", "session": "2", "run": "3"})
        assert nib.load(path).get_data_dtype() == (np.uint8 if OUTPUTS[kind].mask else np.float32)
        assert np.array_equal(nib.load(path).get_fdata(), mask if OUTPUTS[kind].mask else 0.5 * mask)
        sidecar = json.loads(sidecar_path(path).read_text())
        if kind != "chimap":  # worded for the reference region
            assert sidecar["Description"] == OUTPUTS[kind].description
    assert (out / ".bidsignore").read_text().splitlines() == list(OUTPUTS["fit_residual"].bidsignore)


def test_a_sink_that_cannot_finish_leaves_none_of_the_runs_files(tmp_path, monkeypatch):
    from metaqsm_bids.interfaces import sink

    inputs, _ = _sink_inputs(tmp_path, True)
    calls = []

    def full_disk_at_the_fourth_sidecar(path, data):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_json(path, data)
    monkeypatch.setattr(sink, "write_json", full_disk_at_the_fourth_sidecar)
    with pytest.raises(OSError, match="No space left"):
        sink.WriteRunDerivatives(**inputs).run(cwd=str(tmp_path / "work"))
    left = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".bidsignore"]
    assert len(calls) >= 4 and left == []


def test_group_summary_finds_runs_by_the_spec(tmp_path):
    out, bids = tmp_path / "out", tmp_path / "bids"
    (bids / "sub-01").mkdir(parents=True)
    (bids / "sub-02").mkdir(parents=True)
    chi = np.zeros((4, 4, 4))
    chi[1:3, 1:3, 1:3] = [[[0.1, -0.1], [0.2, 0.0]], [[0.0, 0.1], [0.1, 0.0]]]
    for kind, entities, data in (("chimap", RUN, chi), ("qsm_mask", RUN, chi != 0),
                                 ("chimap", {**RUN, "space": "X", "res": 2}, chi)):
        path = output_path(out, kind, entities)
        path.parent.mkdir(parents=True, exist_ok=True)
        _image(path, data)
        sidecar_path(path).write_text(json.dumps({"DipoleInversion": {"Method": "TKD"}}))
    _, rows = group_summary(out, bids)
    assert [(r["participant_id"], r["run"], r["status"]) for r in rows] == [
        ("sub-01", "sub-01_ses-2_run-3", "processed"), ("sub-02", "n/a", "no output")]
    assert rows[0]["mask_voxels"] == int((chi != 0).sum()) and rows[0]["inversion"] == "TKD"
    assert rows[0]["chimap"] == "sub-01/ses-2/" + NAMES["chimap"]


def test_template_outputs_are_named_by_the_spec(tmp_path, monkeypatch):
    """write_template_outputs without ANTs (a stand-in resampler): its names, folders and interpolations."""
    from metaqsm_bids.spatial import template as tpl

    t1w = tmp_path / "tpl-X_res-2_T1w.nii.gz"
    _image(t1w, np.ones((5, 5, 5)))
    calls = []
    fake = types.SimpleNamespace(
        image_read=lambda path, pixeltype=None: path,
        apply_transforms=lambda fixed, moving, transforms, interpolator: calls.append(interpolator) or
        types.SimpleNamespace(numpy=lambda: np.ones((5, 5, 5))))
    monkeypatch.setitem(sys.modules, "ants", fake)
    monkeypatch.setattr(tpl, "template_files", lambda template, resolution: {"T1w": t1w, "brain_mask": None})
    out = tmp_path / "out"
    images = {}
    for kind in TEMPLATE_OUTPUTS:
        path = output_path(out, kind, RUN)
        path.parent.mkdir(parents=True, exist_ok=True)
        images[kind] = _image(path, np.ones((6, 5, 4)))
        sidecar_path(path).write_text(json.dumps({"Units": "x", "Description": OUTPUTS[kind].description}))
    transform = tmp_path / "reg_0GenericAffine.mat"
    transform.write_text("affine")
    xfm, written = tpl.write_template_outputs(transform, {"Type": "a", "ElapsedSeconds": 1.0}, images["magnitude"],
                                              images, out, RUN, template="MNI152NLin2009cAsym", resolutions=[2])
    assert xfm == out / "sub-01/ses-2" / NAMES["transform"]
    assert calls == [tpl.INTERPOLATIONS[OUTPUTS[kind].interpolation] for kind in TEMPLATE_OUTPUTS]
    for kind, path in written[2].items():
        datatype, name = NAMES[kind].split("/")
        assert path == out / "sub-01/ses-2" / datatype / name.replace("run-3_", "run-3_space-MNI152NLin2009cAsym_res-2_")
        sidecar = json.loads(sidecar_path(path).read_text())
        assert sidecar["Interpolation"] == OUTPUTS[kind].interpolation
        assert sidecar["Description"] == OUTPUTS[kind].description
    assert json.loads(sidecar_path(xfm).read_text())["ToSpace"] == "MNI152NLin2009cAsym"
    assert "*_xfm.*" in (out / ".bidsignore").read_text().splitlines()
