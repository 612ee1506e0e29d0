"""Adding a method is one module and one registry entry: a dummy dipole inversion and a dummy background removal,
declared here as a method's module would declare them and registered by monkeypatching the registries, reach the
CLI's choices and options, the workflow (built, never run), the sidecars (through the interfaces and their step
functions) and the report's methods text and references. And the registered methods' specs are complete."""
from dataclasses import dataclass, fields

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.base import isdefined

from metaqsm_bids.cli.parser import build_parser, parse_args
from metaqsm_bids.cli.run import qsm_options
from metaqsm_bids.interfaces.qsm import BackgroundRemoval, DipoleInversion
from metaqsm_bids.qsm.background.common import BackgroundRemoval as BackgroundRemovalResult
from metaqsm_bids.qsm.background.registry import BACKGROUND_REMOVALS
from metaqsm_bids.qsm.core import physics
from metaqsm_bids.qsm.inversion.registry import INVERSIONS
from metaqsm_bids.qsm.spec import INPUTS, MethodSpec, find, parameter
from metaqsm_bids.reports.content import methods_paragraph, number_citations
from metaqsm_bids.workflows.base import init_metaqsm_wf

from .test_workflow_wiring import _graph, dataset  # noqa: F401  (the module's tiny dataset fixture)


# ---------------------------------------------------------------- what a new method's module holds

@dataclass(frozen=True)
class GainParameters:
    gain: float = parameter(2.0, "scale of the field", words="gain", check="positive")


def scaled_field(local_field_ppm, mask, voxel_size_mm, b0_dir, gain=GainParameters.gain, magnitude=None, info=None):
    """chi = gain x field in the mask, demeaned there (ppm); it needs the magnitude (and checks it came)."""
    assert magnitude is not None and magnitude.shape == local_field_ppm.shape
    chi = np.where(mask, gain * local_field_ppm, 0).astype(np.float32)
    chi[mask] -= chi[mask].mean()
    info["Scaled"] = True
    return chi


SCALED = MethodSpec(name="scaled", function=scaled_field, display_name="Scaled-QSM",
                    description="the scaled-field dummy inversion", citations={"doe2031": "Doe J. Scaled. 2031."},
                    parameters=GainParameters, inputs=("magnitude",))


@dataclass(frozen=True)
class OffsetParameters:
    offset_hz: float = parameter(0.5, "offset added to the local field", unit="Hz", words="offset")


def demeaned(total_field, mask, voxel_size_mm, offset_hz=OffsetParameters.offset_hz):
    """The field demeaned in the mask, plus ``offset_hz``: a dummy background removal (no B0, no weight)."""
    local = np.where(mask, total_field - total_field[mask].mean() + offset_hz, 0).astype(np.float32)
    return BackgroundRemovalResult(local, mask, 0, 0.0, {})


DEMEANED = MethodSpec(name="demeaned", function=demeaned, display_name="DEMEAN", description="a demeaning dummy",
                      citations={"roe2032": "Roe R. Demeaned. 2032."}, parameters=OffsetParameters)


@pytest.fixture
def registered(monkeypatch):
    """The registries' one line each, done by the test."""
    monkeypatch.setitem(INVERSIONS, SCALED.name, SCALED)
    monkeypatch.setitem(BACKGROUND_REMOVALS, DEMEANED.name, DEMEANED)


def _opts(bids, out, work, *extra):
    return parse_args([str(bids), str(out), "participant", "-w", str(work), "--nprocs", "1", *extra])


# ---------------------------------------------------------------- the app, derived from the specs

def test_parser_offers_the_new_methods_and_their_options(registered, dataset):  # noqa: F811
    # argparse wraps at hyphens too ("scaled-" / "field"), wherever the other methods' text puts the line ends
    text = " ".join(build_parser().format_help().split()).replace("- ", "-")
    assert "'scaled': the scaled-field dummy inversion" in text and "'demeaned': a demeaning dummy" in text
    assert "--scaled-gain SCALED_GAIN scale of the field; with --inversion scaled (default: 2.0)" in text
    assert "--demeaned-offset-hz DEMEANED_OFFSET_HZ offset added to the local field (Hz); with --bfr demeaned" in text
    bids, out, work, _ = dataset
    opts = _opts(bids, out, work, "--inversion", "scaled", "--scaled-gain", "3", "--bfr", "demeaned")
    options = qsm_options(opts)
    assert (options["inversion"], options["inversion_params"]) == ("scaled", {"gain": 3.0})
    assert (options["bfr"], options["bfr_params"]) == ("demeaned", {"offset_hz": 0.5})
    with pytest.raises(SystemExit):  # a check of the parameter's spec, as argparse's type
        _opts(bids, out, work, "--inversion", "scaled", "--scaled-gain", "-1")


def test_workflow_wires_the_new_methods(registered, dataset):  # noqa: F811
    bids, out, work, runs = dataset
    opts = _opts(bids, out, work, "--inversion", "scaled", "--scaled-gain", "3", "--bfr", "demeaned")
    nodes, edges = _graph(init_metaqsm_wf(runs, work_dir=work, **qsm_options(opts)))
    inversions = [name for name in nodes if name.endswith(".dipole_inversion")]
    assert len(inversions) == len(runs)
    for name in inversions:
        prefix = name.removesuffix("dipole_inversion")
        assert (nodes[name].inputs.method, nodes[name].inputs.parameters) == ("scaled", {"gain": 3.0})
        bfr = nodes[prefix + "background_removal"]
        assert (bfr.inputs.method, bfr.inputs.parameters) == ("demeaned", {"offset_hz": 0.5})
        # its spec takes the magnitude, not the echo spacing
        assert (prefix + "total_field", "magnitude_rss_file", name, "magnitude_file") in edges
        assert not isdefined(nodes[name].inputs.echo_times_s)


def test_unknown_parameter_fails_when_the_workflow_is_built(registered, dataset):  # noqa: F811
    bids, out, work, runs = dataset
    options = qsm_options(_opts(bids, out, work, "--inversion", "scaled"))
    with pytest.raises(ValueError, match="scaled takes no parameter strength"):
        init_metaqsm_wf(runs, work_dir=work, **{**options, "inversion_params": {"strength": 1.0}})


def _image(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return str(path)


def test_sidecars_and_methods_text_of_the_new_methods(registered, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shape = (16, 16, 16)
    brain = np.zeros(shape, bool)
    brain[3:13, 3:13, 3:13] = True
    field = np.random.default_rng(0).normal(size=shape) * brain
    files = {"field": _image(tmp_path / "field.nii", field), "brain": _image(tmp_path / "brain.nii", brain),
             "rss": _image(tmp_path / "rss.nii", np.ones(shape))}
    bfr = BackgroundRemoval(field_file=files["field"], mask_file=files["brain"], magnitude_file=files["rss"],
                            field_strength_t=3.0, method="demeaned", parameters={"offset_hz": 1.5}).run().outputs
    assert bfr.provenance["Method"] == "DEMEAN" and bfr.provenance["OffsetHz"] == 1.5
    inversion = DipoleInversion(local_field_file=bfr.local_field_file, mask_file=bfr.mask_file,
                                magnitude_file=files["rss"], field_strength_t=3.0, method="scaled",
                                parameters={"gain": 3.0}).run().outputs
    provenance = inversion.provenance
    assert (provenance["Method"], provenance["Gain"], provenance["Scaled"]) == ("Scaled-QSM", 3.0, True)
    chi = np.asarray(nib.load(inversion.chimap_file).dataobj)
    local = np.asarray(nib.load(bfr.local_field_file).dataobj)
    mask = np.asarray(nib.load(bfr.mask_file).dataobj) > 0
    expected = 3.0 * physics.field_hz_to_ppm(local[mask], 3.0)  # the gain times the field in ppm at 3 T
    np.testing.assert_allclose(chi[mask], expected - expected.mean(), atol=1e-5)

    sidecar = {"EchoTime": [0.01], "BackgroundFieldRemoval": bfr.provenance, "DipoleInversion": provenance}
    (text,), references = number_citations([methods_paragraph(sidecar)])
    assert "Background fields were removed with a demeaning dummy [2] (offset 1.5 Hz)." in text
    assert "Susceptibility was computed by the scaled-field dummy inversion [3] (gain 3; Scaled yes)" in text
    assert references[1:] == [(2, "Roe R. Demeaned. 2032."), (3, "Doe J. Scaled. 2031.")]


# ---------------------------------------------------------------- the registered specs

@pytest.mark.parametrize("methods", [BACKGROUND_REMOVALS, INVERSIONS], ids=["background", "inversion"])
def test_every_spec_is_complete(methods):
    for name, spec in methods.items():
        assert spec.name == name and name.islower() and spec.display_name and spec.description
        assert spec.citations and set(spec.inputs) <= set(INPUTS)
        assert find(methods, spec.display_name) is spec and find(methods, name) is spec
        for field in fields(spec.parameters):  # every parameter says what it is, in which unit, and how to set it
            assert field.metadata["help"] and spec.option(field).startswith("--")
            assert field.metadata["unit"] in ("", "mm", "ppm", "Hz", "rad", "s")
