"""The in-process pipeline (:func:`metaqsm_bids.steps.pipeline.reconstruct`, what the benchmarks run) and the real
``metaqsm`` CLI give the same numbers, to the last digit: both chain the same step functions (:mod:`metaqsm_bids.steps`)
in the same order with the same settings; the CLI passes each map through a float32 (masks: uint8) NIfTI file, which
the step functions' float32 results go through unchanged."""
import json

import nibabel as nib
import numpy as np
import pytest

from metaqsm_bids.cli.parser import build_parser
from metaqsm_bids.cli.run import pipeline_settings
from metaqsm_bids.io.inputs import find_megre_runs, index_dataset
from metaqsm_bids.io.outputs import output_path
from metaqsm_bids.sim.dataset import RunSpec, simulate_dataset
from metaqsm_bids.steps.pipeline import reconstruct, run_inputs

from .conftest import run_cli

#: a small run (a CLI run and the same run in this process: about 10 s), its phase stored as vendor integers (the
#: phase scaling step has work to do), 4 equally spaced echoes (the bipolar test runs) and an oblique grid (B0 off
#: the slice axis); and the demo's adult-size head (``metaqsm-simulate``'s defaults; about 40 s: slow)
RUNS = [pytest.param(RunSpec("01", shape=(48, 48, 24), voxel_size_mm=(1.2, 1.2, 2.4), oblique_deg=15.0,
                             phase_units="arbitrary", seed=5), id="small"),
        pytest.param(RunSpec("01", seed=1), id="demo", marks=pytest.mark.slow)]
ARGS = ["participant", "--inversion", "tkd"]  # TKD: the fast inversion; everything else the CLI's defaults
#: derivative kind -> attribute of the Reconstruction it holds
MAPS = {"chimap": "chimap", "local_field": "local_field_hz", "total_field": "total_field_hz",
        "magnitude": "magnitude_rss", "fit_residual": "fit_residual_rad", "r2star": "r2star_hz", "t2star": "t2star_s"}
MASKS = {"brain_mask": "brain_mask", "qsm_mask": "qsm_mask", "reliable_mask": "reliable_mask"}
#: sidecar key of each step -> the Reconstruction's provenance key
STEPS = {"PhaseScaling": "PhaseScaling", "BrainMask": "BrainMask", "TotalField": "TotalField",
         "BackgroundFieldRemoval": "BackgroundFieldRemoval", "DipoleInversion": "DipoleInversion",
         "SusceptibilityReference": "SusceptibilityReference"}


@pytest.fixture(scope="module", params=RUNS)
def both(request, tmp_path_factory):
    """``(out, reconstruction)``: the CLI's derivatives folder and :func:`reconstruct` of the same raw files with
    the settings the CLI's parser gives for ``ARGS``."""
    root = tmp_path_factory.mktemp("inprocess")
    bids_dir, out = root / "bids", root / "out"
    simulate_dataset(bids_dir, [request.param])
    result = run_cli("metaqsm", bids_dir, out, *ARGS, "-w", root / "work", "--nprocs", "1")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]

    opts = build_parser().parse_args([str(bids_dir), str(out), *ARGS])
    layout, _ = index_dataset(bids_dir)
    [(_, run)] = find_megre_runs(layout, "01", phase_sign=opts.phase_sign)
    settings = pipeline_settings(opts)
    assert set(settings) >= {"bfr", "bfr_params", "inversion", "inversion_params", "bipolar", "reference"}
    return out, reconstruct(**run_inputs(run), **settings)


def _written(out, kind):
    return nib.load(output_path(out, kind, {"subject": "01"}))


@pytest.mark.parametrize("kind", MAPS)
def test_maps_equal_to_the_last_digit(both, kind):
    out, recon = both
    img = _written(out, kind)
    written, computed = np.asarray(img.dataobj), getattr(recon, MAPS[kind])
    assert img.get_data_dtype() == np.float32 and computed.dtype == np.float32
    if kind == "chimap":  # not a trivial map: a real reconstruction, in a mask most of the brain
        assert np.count_nonzero(computed) > 0.1 * computed.size and np.abs(computed).max() > 0.01
    assert np.array_equal(written, computed), (kind, float(np.abs(written - computed).max()))


@pytest.mark.parametrize("kind", MASKS)
def test_masks_equal(both, kind):
    out, recon = both
    written, computed = np.asarray(_written(out, kind).dataobj) > 0, getattr(recon, MASKS[kind])
    assert computed.dtype == bool and computed.any()
    assert np.array_equal(written, computed), (kind, int((written != computed).sum()))


def test_step_provenance_equal(both):
    """The Chimap's sidecar records each step as the in-process pipeline does (its wall times and file URIs apart)."""
    out, recon = both
    sidecar = json.loads(output_path(out, "chimap", {"subject": "01"}, ".json").read_text())
    for key, step in STEPS.items():
        written = {k: v for k, v in sidecar[key].items() if k not in ("ElapsedSeconds", "Mask")}
        computed = recon.provenance[step]
        if key == "BackgroundFieldRemoval":
            assert recon.provenance["Reliability"].items() <= computed.items()
        assert written == json.loads(json.dumps(computed)), key
