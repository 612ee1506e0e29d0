"""Template-space outputs, offline, with a TEMPLATEFLOW_HOME built from nilearn's MNI152 2009a symmetric files.

The "subject" is the template itself moved by a known similarity transform (rotation, shift,
10% shrink) onto an oblique, anisotropic grid stored right-to-left: its magnitude is the template
T1w, its "Chimap" the grey-matter probability and its brain mask the template's. Registration
must bring all three back onto the template.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from metaqsm_bids.io.derivatives import ensure_dataset_description
from metaqsm_bids.io.outputs import output_name, output_path, sidecar_path
from metaqsm_bids.spatial.template import parse_output_space

from .conftest import OFFLINE_TEMPLATE as TEMPLATE
from .conftest import make_templateflow_home, require_templates

require_templates()


def _subject_grid():
    """Oblique (12 deg about x, 6 about z), 2.2 x 2.2 x 3.5 mm, i stored right to left."""
    def rotation(axis, degrees):
        c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r

    shape = (64, 76, 40)
    linear = rotation(0, 12) @ rotation(2, 6) @ np.diag([-2.2, 2.2, 3.5])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ (np.array(shape) / 2 - 0.5) + [4.0, -6.0, 8.0]
    return shape, affine


def _moved(path, grid, order):
    """The template image moved by the known transform (shrunk 10% about the origin) and sampled on ``grid``."""
    img = nib.load(path)
    shrink = np.diag([0.9, 0.9, 0.9, 1.0])
    moved = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), shrink @ img.affine)
    return resample_from_to(moved, grid, order=order)


SCRIPT = """
import json, sys
from metaqsm_bids.spatial.template import template_files, to_template
args = json.loads(sys.argv[1])
xfm, written = to_template(args["magnitude"], args["images"], args["out_dir"], {"subject": "01"},
                           template=args["template"], resolutions=[1, 2], brain_mask_file=args["mask"])
try:
    template_files("MNI152NLin6Asym", 2)
    missing = None
except ValueError as err:
    missing = str(err)
print(json.dumps({"xfm": str(xfm), "missing": missing,
                  "written": {r: {k: str(v) for k, v in files.items()} for r, files in written.items()}}))
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    templates = make_templateflow_home(root / "templateflow", resolutions=(1, 2))
    template = templates[2]
    out = root / "out"
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    ensure_dataset_description(out, root)
    grid = _subject_grid()
    inputs = {
        "magnitude": (_moved(template["T1w"], grid, 1), "magnitude", {}),
        "chimap": (_moved(template["label-GM_probseg"], grid, 1), "chimap", {"Units": "ppm"}),
        "mask": (_moved(template["desc-brain_mask"], grid, 0), "brain_mask", {"Type": "Brain"}),
    }
    paths = {}
    for key, (img, kind, sidecar) in inputs.items():
        path = output_path(out, kind, {"subject": "01"})
        path.parent.mkdir(parents=True, exist_ok=True)
        data = img.get_fdata().astype(np.uint8 if key == "mask" else np.float32)
        nib.save(nib.Nifti1Image(data, img.affine), path)
        sidecar_path(path).write_text(json.dumps({"SkullStripped": True, **sidecar}))
        paths[key] = path
    args = {"magnitude": str(paths["magnitude"]), "mask": str(paths["mask"]), "out_dir": str(out), "template": TEMPLATE,
            "images": {"chimap": str(paths["chimap"]), "brain_mask": str(paths["mask"]),
                       "magnitude": str(paths["magnitude"])}}
    env = dict(os.environ, TEMPLATEFLOW_HOME=str(root / "templateflow"), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="2")
    # a fresh process: templateflow reads TEMPLATEFLOW_HOME once, at import
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    written = {int(r): {k: Path(v) for k, v in files.items()} for r, files in report["written"].items()}
    # the res-2 outputs and the transform (what most tests look at), then the res-1 template and outputs
    return (template, paths, {**written[2], "xfm": Path(report["xfm"])}, report["missing"], out,
            (templates[1], written[1]))


def _correlation(a, b, mask):
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


def _dice(a, b):
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _oracle(path, template_img, order):
    """``path`` mapped back by the exact inverse of the known transform: the best any registration can do."""
    img = nib.load(path)
    grow = np.diag([1 / 0.9, 1 / 0.9, 1 / 0.9, 1.0])
    return resample_from_to(nib.Nifti1Image(img.get_fdata(), grow @ img.affine), template_img, order=order).get_fdata()


def test_registered_maps_match_the_template(registered):
    """Within 0.02 of the exact inverse transform (the 2.2 x 2.2 x 3.5 mm sampling caps what is reachable)."""
    template, paths, written, *_ = registered
    t1w = nib.load(template["T1w"])
    brain = nib.load(template["desc-brain_mask"]).get_fdata() > 0
    unregistered = resample_from_to(nib.load(paths["magnitude"]), t1w, order=1).get_fdata()
    before = _correlation(unregistered, t1w.get_fdata(), brain)
    after = _correlation(nib.load(written["magnitude"]).get_fdata(), t1w.get_fdata(), brain)
    best = _correlation(_oracle(paths["magnitude"], t1w, 1), t1w.get_fdata(), brain)
    assert after > before + 0.3 and after > best - 0.02, (before, after, best)
    gm = nib.load(template["label-GM_probseg"]).get_fdata()
    chi = _correlation(nib.load(written["chimap"]).get_fdata(), gm, brain)
    assert chi > _correlation(_oracle(paths["chimap"], t1w, 1), gm, brain) - 0.02
    mask_img = nib.load(written["brain_mask"])
    mask = np.asarray(mask_img.dataobj)
    assert mask_img.get_data_dtype() == np.uint8 and set(np.unique(mask)) == {0, 1}  # nearest: still binary
    best_mask = _oracle(paths["mask"], t1w, 0) > 0
    assert _dice(mask > 0, brain) > _dice(best_mask, brain) - 0.02 > 0.9
    for path in written.values():  # every output is on the template grid
        if path.name.endswith(".nii.gz"):
            assert np.allclose(nib.load(path).affine, t1w.affine) and nib.load(path).shape == t1w.shape


def test_names_sidecars_and_transform(registered):
    _, paths, written, _, out, _ = registered
    assert written["chimap"] == out / f"sub-01/anat/sub-01_space-{TEMPLATE}_res-2_Chimap.nii.gz"
    assert written["brain_mask"].name == f"sub-01_space-{TEMPLATE}_res-2_desc-brain_mask.nii.gz"
    assert written["magnitude"].parent.name == "fmap"
    assert written["xfm"] == out / f"sub-01/anat/sub-01_from-orig_to-{TEMPLATE}_mode-image_xfm.mat"
    sidecar = json.loads(written["chimap"].with_name(written["chimap"].name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Units"] == "ppm" and sidecar["Interpolation"] == "linear" and "2" in sidecar["Resolution"]
    assert sidecar["Registration"]["BrainMaskDice"] > 0.9 and "Warnings" not in sidecar
    for uri in sidecar["Sources"]:
        assert (out / uri.removeprefix("bids::")).exists(), uri
    xfm_sidecar = json.loads(written["xfm"].with_suffix(".json").read_text())
    assert xfm_sidecar["Registration"]["Stages"] == ["Rigid", "Affine"]
    assert "scale 1.1" in xfm_sidecar["Registration"]["Initialisation"]  # the subject was shrunk by 0.9
    assert xfm_sidecar["Resolutions"] == [1, 2] and xfm_sidecar["ElapsedSeconds"] > 0


def test_every_resolution_shares_one_registration(registered):
    """One registration on the coarsest grid (res-2); res-1 is resampled through the same transform, so its
    maps averaged over 2x2x2 blocks match the res-2 maps (to within the difference of two linear resamplings)."""
    template, _, written, _, out, (template1, written1) = registered
    xfm_sidecar = json.loads(written["xfm"].with_suffix(".json").read_text())
    assert xfm_sidecar["Registration"]["FixedImage"] == f"tpl-{TEMPLATE}_res-2_T1w.nii.gz (brain-masked)"
    brain = nib.load(template["desc-brain_mask"]).get_fdata() > 0
    for name in ("chimap", "magnitude"):
        fine = nib.load(written1[name])
        assert np.allclose(fine.affine, nib.load(template1["T1w"]).affine) and fine.shape == (197, 233, 189)
        data = fine.get_fdata()[:196, :232, :188].reshape(98, 2, 116, 2, 94, 2).mean(axis=(1, 3, 5))
        assert _correlation(data, nib.load(written[name]).get_fdata(), brain) > 0.98, name
        sidecar = json.loads(written1[name].with_name(written1[name].name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Sources"][1] == "bids::" + written["xfm"].relative_to(out).as_posix()
        assert "1 x 1 x 1 mm" in sidecar["Resolution"]["1"]


def test_transform_file_reproduces_the_outputs(registered):
    import ants

    template, paths, written, *_ = registered
    fixed = ants.image_read(str(template["T1w"]))
    again = ants.apply_transforms(fixed, ants.image_read(str(paths["magnitude"])), [str(written["xfm"])],
                                  interpolator="linear").numpy()
    expected = nib.load(written["magnitude"]).get_fdata()
    assert np.abs(again - expected).max() < 1e-3 * np.abs(expected).max()


def test_missing_template_names_templateflow_home(registered):
    *_, missing, _, _ = registered
    assert "MNI152NLin6Asym" in missing and "TEMPLATEFLOW_HOME=" in missing


def test_outputs_keep_the_dataset_valid(registered, bids_validator):
    *_, out, _ = registered
    result = subprocess.run([bids_validator, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def test_output_space_parsing_and_names():
    assert parse_output_space("MNI152NLin2009cAsym:res-2") == ("MNI152NLin2009cAsym", 2)
    assert parse_output_space("MNI152NLin2009cAsym:res-01") == ("MNI152NLin2009cAsym", 1)
    assert parse_output_space("MNI152NLin2009cAsym") == ("MNI152NLin2009cAsym", 2)
    assert parse_output_space("orig") == ("orig", None)
    for bad in ("MNI152:2mm", "orig:res-1", ""):
        with pytest.raises(ValueError):
            parse_output_space(bad)
    entities = {"subject": "01", "session": "2", "acquisition": None, "run": 3}
    assert output_name("qsm_mask", {**entities, "space": "X", "res": 2}) == \
        "sub-01_ses-2_run-3_space-X_res-2_desc-qsm_mask.nii.gz"
    assert output_name("transform", {**entities, "to": "X"}, ".h5") == \
        "sub-01_ses-2_run-3_from-orig_to-X_mode-image_xfm.h5"
