"""The participant workflow as the CLI builds it, over a grid of settings, built and never run (seconds in all).

Every background removal x every inversion x output spaces (orig only / orig and a template) x runs of 1 and 3
echoes: the options come from the CLI's parser and :func:`metaqsm_bids.cli.run.qsm_options`, the runs are the typed
:class:`~metaqsm_bids.io.inputs.MEGRERun` objects that :func:`~metaqsm_bids.io.inputs.find_megre_runs` collects from a
tiny simulated dataset. Each graph must have exactly the expected nodes and connections for its settings, the
settings on the nodes that use them, and every mandatory input of every node set or connected (what a run would
otherwise find missing only when it reaches that node).
"""
import re

import pytest
from nipype.interfaces.base import isdefined

from metaqsm_bids.cli.parser import parse_args
from metaqsm_bids.cli.run import qsm_options
from metaqsm_bids.io.inputs import find_megre_runs, index_dataset
from metaqsm_bids.qsm.background.registry import BACKGROUND_REMOVALS
from metaqsm_bids.qsm.inversion.registry import INVERSIONS
from metaqsm_bids.sim.dataset import RunSpec, simulate_dataset
from metaqsm_bids.workflows.base import init_metaqsm_wf, subject_workflow_name

#: The template space of the grid's second output-space setting (the graph is built, never run: no antspyx needed).
TEMPLATE = ("MNI152NLin2009cAsym", 2)
#: Participant -> echo times of its one run.
ECHOES = {"01": (0.005, 0.01, 0.015), "02": (0.01,)}

#: Every connection of a run's QSM workflow: (source node, output, destination node, input).
QSM_EDGES = {
    ("phase_scaling", "magnitude_file", "brain_mask", "magnitude_file"),
    ("phase_scaling", "magnitude_file", "total_field", "magnitude_file"),
    ("phase_scaling", "phase_file", "total_field", "phase_file"),
    ("total_field", "field_file", "background_removal", "field_file"),
    ("brain_mask", "mask_file", "background_removal", "mask_file"),
    ("total_field", "magnitude_rss_file", "background_removal", "magnitude_file"),
    ("total_field", "residual_file", "background_removal", "residual_file"),
    ("background_removal", "local_field_file", "dipole_inversion", "local_field_file"),
    ("background_removal", "mask_file", "dipole_inversion", "mask_file"),
    ("phase_scaling", "provenance", "ds_run", "phase_provenance"),
    ("brain_mask", "mask_file", "ds_run", "brain_mask_file"),
    ("brain_mask", "provenance", "ds_run", "mask_provenance"),
    ("total_field", "field_file", "ds_run", "total_field_file"),
    ("total_field", "magnitude_rss_file", "ds_run", "magnitude_rss_file"),
    ("total_field", "residual_file", "ds_run", "fit_residual_file"),
    ("total_field", "provenance", "ds_run", "field_provenance"),
    ("background_removal", "local_field_file", "ds_run", "local_field_file"),
    ("background_removal", "mask_file", "ds_run", "qsm_mask_file"),
    ("background_removal", "reliable_mask_file", "ds_run", "reliable_mask_file"),
    ("background_removal", "provenance", "ds_run", "bfr_provenance"),
    ("dipole_inversion", "provenance", "ds_run", "inversion_provenance"),
    ("dipole_inversion", "chimap_file", "chi_reference", "chimap_file"),
    ("background_removal", "mask_file", "chi_reference", "mask_file"),
    ("chi_reference", "chimap_file", "ds_run", "chimap_file"),
    ("chi_reference", "provenance", "ds_run", "reference_provenance"),
    ("total_field", "magnitude_rss_file", "swi", "magnitude_file"),
    ("background_removal", "local_field_file", "swi", "local_field_file"),
    ("swi", "swi_file", "ds_run", "swi_file"),
    ("swi", "mip_file", "ds_run", "mip_file"),
    ("swi", "provenance", "ds_run", "swi_provenance"),
    ("swi", "mip_parameters", "ds_run", "mip_parameters"),
}
#: ... and the magnitude's, for the inversions that take it (MEDI weighs by it, the networks may take it in).
MAGNITUDE_EDGES = {("total_field", "magnitude_rss_file", "dipole_inversion", "magnitude_file")}
#: ... and those of its R2*/T2* fit, when it has two echoes or more.
R2STAR_EDGES = {
    ("phase_scaling", "magnitude_file", "r2star_map", "magnitude_file"),
    ("brain_mask", "mask_file", "r2star_map", "mask_file"),
    ("r2star_map", "r2star_file", "ds_run", "r2star_file"),
    ("r2star_map", "t2star_file", "ds_run", "t2star_file"),
    ("r2star_map", "provenance", "ds_run", "r2star_provenance"),
}
#: ... and those of its template-space sub-workflow, when there is a template space.
TEMPLATE_EDGES = {
    ("ds_run", "out_files", "template_wf.inputnode", "derivatives"),
    ("template_wf.inputnode", "derivatives", f"template_wf.ds_{TEMPLATE[0]}", "derivatives"),
    ("template_wf.inputnode", "derivatives|_magnitude", f"template_wf.register_{TEMPLATE[0]}", "magnitude_file"),
    ("template_wf.inputnode", "derivatives|_brain_mask", f"template_wf.register_{TEMPLATE[0]}", "brain_mask_file"),
    (f"template_wf.register_{TEMPLATE[0]}", "transform_file", f"template_wf.ds_{TEMPLATE[0]}", "transform_file"),
    (f"template_wf.register_{TEMPLATE[0]}", "registration", f"template_wf.ds_{TEMPLATE[0]}", "registration"),
}


#: The inversions given the magnitude.
MAGNITUDE_USERS = ("medi", "tv", "metaqsm", "mesaqsm")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny dataset (16x16x8 voxels), its runs as the CLI collects them, and an output folder."""
    root = tmp_path_factory.mktemp("wiring")
    bids = root / "bids"
    simulate_dataset(bids, [RunSpec(label, shape=(16, 16, 8), voxel_size_mm=(2.0, 2.0, 3.0), echo_times_s=tes, seed=n)
                            for n, (label, tes) in enumerate(ECHOES.items())])
    layout, _ = index_dataset(bids)
    runs = {}
    for subject in ECHOES:
        found = find_megre_runs(layout, subject)
        assert len(found) == 1 and not isinstance(found[0][1], Exception), found
        runs[subject] = [found[0][1]]
    (root / "out").mkdir()
    return bids, root / "out", root / "work", runs


def _expected_parameters(opts):
    network = {"orientations": opts.network_orientations, "data_consistency_lambda": opts.network_data_consistency,
               "data_consistency_edge_mm": opts.network_data_consistency_edge_mm,
               "tv_refinement": opts.network_tv_refinement}
    return {"tkd": {"threshold": opts.tkd_threshold}, "medi": {"lambda_": opts.medi_lambda},
            "tv": {"alpha": opts.tv_alpha, "iterations": opts.tv_iterations, "weighting": opts.tv_weighting},
            "metaqsm": network, "mesaqsm": network}.get(opts.inversion, {})


def _graph(wf):
    """``{node path: node}`` and ``{(source, output, destination, input)}`` of the flattened graph, node paths
    relative to the top workflow (``sub_01_wf.qsm_sub_01_wf.total_field``)."""
    flat = wf._create_flat_graph()  # what Workflow.run executes (before expanding iterables; there are none)

    def path(node):
        return ".".join((node._hierarchy or "").split(".")[1:] + [node.name])

    nodes = {path(node): node for node in flat.nodes()}
    edges = {(path(src), _output(out), path(dst), in_) for src, dst, data in flat.edges(data=True)
             for out, in_ in data["connect"]}
    return nodes, edges


def _output(out):
    """An output name, or ``'name|function'`` for an output passed through a function (nipype keeps its source)."""
    if isinstance(out, str):
        return out
    return f"{out[0]}|" + re.search(r"def (\w+)", out[1]).group(1)


def _mandatory_unset(node, connected):
    """The node's mandatory inputs that are neither set nor connected."""
    inputs = node.inputs
    return [name for name in inputs.copyable_trait_names()
            if inputs.trait(name).mandatory and not isdefined(getattr(inputs, name)) and name not in connected]


@pytest.mark.parametrize("spaces", ["orig", "template"])
@pytest.mark.parametrize("inversion", sorted(INVERSIONS))
@pytest.mark.parametrize("bfr", sorted(BACKGROUND_REMOVALS))
def test_workflow_wiring(dataset, bfr, inversion, spaces):
    bids, out, work, runs = dataset
    opts = parse_args([str(bids), str(out), "participant", "-w", str(work), "--bfr", bfr, "--inversion", inversion,
                       "--nprocs", "1"])
    if spaces == "template":  # set here, past the parser's check that antspyx and the template files are there
        opts.output_spaces = [("orig", None), TEMPLATE]
    wf = init_metaqsm_wf(runs, work_dir=work, **qsm_options(opts))
    nodes, edges = _graph(wf)

    expected_nodes, expected_edges = set(), set()
    for subject, (run,) in runs.items():
        prefix = f"{subject_workflow_name(subject)}.qsm_{run.name.replace('-', '_')}_wf."
        tes = list(ECHOES[subject])
        run_edges = QSM_EDGES | (TEMPLATE_EDGES if spaces == "template" else set()) \
            | (R2STAR_EDGES if len(tes) > 1 else set()) | (MAGNITUDE_EDGES if inversion in MAGNITUDE_USERS else set())
        expected_edges |= {(prefix + src, out_, prefix + dst, in_) for src, out_, dst, in_ in run_edges}
        expected_nodes |= {prefix + name for src, _, dst, _ in run_edges for name in (src, dst)}

        bfr_node, invert = nodes[prefix + "background_removal"], nodes[prefix + "dipole_inversion"]
        assert bfr_node.inputs.method == bfr
        assert bfr_node.inputs.parameters == {"resharp": {"radius_mm": opts.bfr_radius_mm},
                                              "tfi": {"alpha": opts.tfi_alpha, "steps": opts.tfi_steps,
                                                      "coarse_steps": opts.tfi_coarse_steps},
                                              }.get(bfr, {})
        assert bfr_node.inputs.field_strength_t == run.field_strength_t
        assert invert.inputs.method == inversion
        assert invert.inputs.parameters == _expected_parameters(opts)
        assert invert.inputs.field_strength_t == run.field_strength_t
        assert nodes[prefix + "total_field"].inputs.echo_times_s == tes
        assert nodes[prefix + "chi_reference"].inputs.region == opts.reference == "brain"
        swi = nodes[prefix + "swi"]
        assert (swi.inputs.echo_times_s, swi.inputs.phase_sign, swi.inputs.slab_mm) == (tes, "negative", 8.0)
        if len(tes) > 1:
            r2star = nodes[prefix + "r2star_map"]
            assert r2star.inputs.echo_times_s == tes and r2star.inputs.method == opts.r2star_method == "loglinear"
        assert nodes[prefix + "phase_scaling"].inputs.n_echoes == len(tes)
        assert len(nodes[prefix + "phase_scaling"].inputs.magnitude_files) == len(tes)
        # MEDI's noise scaling needs the echo spacing; no other inversion is given the echo times
        assert (invert.inputs.echo_times_s == tes) if inversion == "medi" else not isdefined(invert.inputs.echo_times_s)
        if spaces == "template":
            for node in ("register", "ds"):
                template = nodes[prefix + f"template_wf.{node}_{TEMPLATE[0]}"]
                assert (template.inputs.template, template.inputs.resolutions) == (TEMPLATE[0], [TEMPLATE[1]])
            assert template.inputs.entities == run.entities

    assert set(nodes) == expected_nodes
    assert edges == expected_edges
    for name, node in nodes.items():
        connected = {in_ for _, _, dst, in_ in edges if dst == name}
        assert not _mandatory_unset(node, connected), f"{name}: mandatory inputs neither set nor connected"


def test_csf_reference_takes_the_r2star_map_and_writes_its_region(dataset):
    """--reference csf: the reference step reads the R2* map and the sink writes the region; a single-echo run has
    no R2* map, so its reference step fails with the message of metaqsm_bids.qsm.reference.reference_chi."""
    bids, out, work, runs = dataset
    opts = parse_args([str(bids), str(out), "participant", "-w", str(work), "--reference", "csf", "--swi-phase-sign",
                       "positive", "--mip-slab-mm", "12", "--nprocs", "1"])
    nodes, edges = _graph(init_metaqsm_wf(runs, work_dir=work, **qsm_options(opts)))
    for subject, (run,) in runs.items():
        prefix = f"{subject_workflow_name(subject)}.qsm_{run.name.replace('-', '_')}_wf."
        r2star = (prefix + "r2star_map", "r2star_file", prefix + "chi_reference", "r2star_file")
        assert (prefix + "chi_reference", "reference_mask_file", prefix + "ds_run", "reference_mask_file") in edges
        assert nodes[prefix + "chi_reference"].inputs.region == "csf"
        assert (nodes[prefix + "swi"].inputs.phase_sign, nodes[prefix + "swi"].inputs.slab_mm) == ("positive", 12.0)
        assert (r2star in edges) == (len(ECHOES[subject]) > 1)
