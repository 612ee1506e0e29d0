"""Shared helpers: run the installed console scripts; an offline TEMPLATEFLOW_HOME."""
import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def require_templates():
    """Skip the calling test module, saying why, unless antspyx and templateflow (the templates extra) are installed.

    They are not test extras (antspyx pins numpy and scipy below what ``pip install .`` gives, so the tested
    environment would differ from the runtime one); ``.ci/run`` installs them and runs these modules with
    ``METAQSM_REQUIRE_TEMPLATES=1``, which turns the skip into a failure.
    """
    missing = [name for name, module in (("antspyx", "ants"), ("templateflow", "templateflow"))
               if find_spec(module) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed: pip install -e '.[test,templates]' to run these tests"
        if os.environ.get("METAQSM_REQUIRE_TEMPLATES"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def console_script(name):
    """Path of an installed console script next to this interpreter (the package must be installed)."""
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the package first (pip install -e '.[test]')")
    return exe


def run_cli(name, *args, timeout=900, env=None):
    """Run a console script (``env``: variables added to this process's); return the CompletedProcess."""
    return subprocess.run([str(console_script(name)), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def bids_validator():
    """Path of the official BIDS validator (bids-validator-deno), installed by the test extras."""
    exe = shutil.which("bids-validator-deno") or str(Path(sys.executable).with_name("bids-validator-deno"))
    if not Path(exe).exists():
        pytest.fail("bids-validator-deno is missing: it is part of the test extras")
    return exe


#: The templateflow template that nilearn ships (ICBM 2009a nonlinear symmetric, 1 mm, skull-stripped T1w).
OFFLINE_TEMPLATE = "MNI152NLin2009aSym"
_NILEARN_FILES = {"T1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "label-GM_probseg": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"}


def _nilearn_volume(name, resolution):
    """A nilearn 1 mm volume (float32), averaged over 2x2x2 blocks for resolution 2, with its affine.

    The 2 mm voxel centres sit between the 1 mm ones (half a 1 mm voxel further on), as in templateflow.
    """
    img = nib.load(Path(find_spec("nilearn").submodule_search_locations[0]) / "datasets" / "data" / name)
    data, affine = np.asarray(img.dataobj, np.float32), img.affine.copy()
    if resolution == 2:
        n = [s // 2 * 2 for s in data.shape]
        data = data[:n[0], :n[1], :n[2]].reshape(n[0] // 2, 2, n[1] // 2, 2, n[2] // 2, 2).mean(axis=(1, 3, 5))
        affine[:3, 3] += affine[:3, :3] @ [0.5, 0.5, 0.5]
        affine[:3, :3] *= 2
    return data, affine


def make_templateflow_home(home, resolutions=(2,)):
    """A TEMPLATEFLOW_HOME holding tpl-MNI152NLin2009aSym from nilearn's files, named as templateflow names them.

    Per resolution (1 or 2): T1w, desc-brain_mask (T1w > 0: the T1w is skull-stripped) and
    label-GM_probseg (0-1). Returns ``{resolution: {tail: path}}``. Point TEMPLATEFLOW_HOME at
    ``home`` before templateflow is imported (it reads the variable once).
    """
    if not set(resolutions) <= {1, 2}:
        raise ValueError(f"resolutions {resolutions}: nilearn's copy gives 1 and 2 mm only")
    folder = Path(home) / f"tpl-{OFFLINE_TEMPLATE}"
    folder.mkdir(parents=True)
    paths = {}
    for resolution in resolutions:
        t1w, affine = _nilearn_volume(_NILEARN_FILES["T1w"], resolution)
        gm, _ = _nilearn_volume(_NILEARN_FILES["label-GM_probseg"], resolution)
        files = {"T1w": t1w, "desc-brain_mask": (t1w > 0).astype(np.uint8), "label-GM_probseg": gm / 255.0}
        for tail, data in files.items():
            path = folder / f"tpl-{OFFLINE_TEMPLATE}_res-{resolution}_{tail}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), path)
            paths.setdefault(resolution, {})[tail] = path
    (folder / "template_description.json").write_text(json.dumps({
        "Identifier": OFFLINE_TEMPLATE, "Name": "ICBM 2009a Nonlinear Symmetric (nilearn copy)"}))
    return paths
