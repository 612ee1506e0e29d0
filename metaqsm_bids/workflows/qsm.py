"""The per-run QSM workflow: phase scaling -> brain mask -> total field -> reliability map and background removal
-> inversion -> susceptibility reference -> sink; beside them, with two echoes or more, the R2*/T2* fit of the
magnitude in the brain mask, and after background removal the SWI and its minimum-intensity projection."""
import nibabel as nib
import numpy as np
from nipype.pipeline import engine as pe

from ..interfaces.sink import WriteRunDerivatives
from ..io.derivatives import raw_uris
from ..interfaces.qsm import (SWI, BackgroundRemoval, BrainMask, ChiReference, DipoleInversion, PrepareMEGRE, R2StarMap,
                              TotalField)
from ..qsm.background.registry import BACKGROUND_REMOVALS, DEFAULT_BACKGROUND_REMOVAL
from ..qsm.field.bipolar import DEFAULT_BIPOLAR
from ..qsm.field.relaxometry import DEFAULT_METHOD as DEFAULT_R2STAR_METHOD
from ..qsm.field.swi import DEFAULT_SWI_PHASE_SIGN, MIP_SLAB_MM
from ..qsm.inversion.registry import DEFAULT_INVERSION, INVERSIONS
from ..qsm.network.device import DEFAULT_DEVICE
from ..qsm.reference import DEFAULT_REFERENCE
from ..qsm.spec import lookup
from .spaces import init_template_wf


def _memory_gb(run):
    """Peak-memory hint (GB) of the heaviest node, for MultiProc/SLURM packing.

    The echo fit holds a few complex64 copies of all echoes; RESHARP and the
    inversion hold ~10 float32 volumes on the padded grid.
    """
    shape = nib.load(run.reference_file).shape[:3]
    voxels = float(np.prod(shape))
    echoes = len(run.echo_times_s)
    return round(max(voxels * echoes * 8 * 4, voxels * 1.5 * 4 * 12) / 1e9 + 0.3, 2)


def _acquisition(run, bids_dir):
    """Facts about the acquisition that go into every sidecar of the run.

    ``Warnings`` name the raw files by BIDS URI (``bids:raw:sub-01/...``), as ``Sources`` does: the console
    says the absolute paths, the sidecars stay valid wherever the datasets move.

    ``MagneticFieldStrength`` is the raw sidecar's nominal value (BIDS' meaning); ``B0Tesla`` is the
    B0 that converts Hz to ppm and ``B0Source`` where it came from (see :func:`~metaqsm_bids.io.inputs.field_strength`).
    """
    nominal = run.nominal_field_strength_t if run.nominal_field_strength_t is not None else run.field_strength_t
    facts = {"EchoTime": list(run.echo_times_s), "MagneticFieldStrength": nominal, "B0Tesla": run.field_strength_t,
             "B0Source": run.field_strength_source or "not recorded"}
    if run.warnings:
        facts["Warnings"] = [raw_uris(warning, bids_dir) for warning in run.warnings]
    return facts


def _inversion_node(run, inversion, parameters, *, source, device, omp_nthreads, mem_gb):
    """The dipole inversion's node, with the inputs of the run that its method's spec takes set (the echo times,
    for the echo spacing); its parameters checked against the spec."""
    spec = lookup(INVERSIONS, inversion, "dipole inversion")
    spec.settings(parameters)
    node = pe.Node(DipoleInversion(source_file=source, field_strength_t=run.field_strength_t, method=inversion,
                                   parameters=dict(parameters or {}), device=device, num_threads=omp_nthreads),
                   name="dipole_inversion", mem_gb=mem_gb, n_procs=omp_nthreads)
    if "delta_te_s" in spec.inputs:
        node.inputs.echo_times_s = list(run.echo_times_s)
    return node


def init_qsm_wf(run, *, bids_dir, output_dir, inversion=DEFAULT_INVERSION, inversion_params=None,
                bfr=DEFAULT_BACKGROUND_REMOVAL, bfr_params=None, bipolar=DEFAULT_BIPOLAR, user_mask_file=None,
                device=DEFAULT_DEVICE, omp_nthreads=1, output_spaces=None, name=None,
                r2star_method=DEFAULT_R2STAR_METHOD,
                reference=DEFAULT_REFERENCE, swi_phase_sign=DEFAULT_SWI_PHASE_SIGN, mip_slab_mm=MIP_SLAB_MM):
    """Build the workflow for one :class:`~metaqsm_bids.io.inputs.MEGRERun`.

    Long by design: every node and connection of the run's graph stands here, in pipeline order, to read at once.

    Parameters
    ----------
    run : MEGRERun
        Files and acquisition facts collected from the BIDS dataset.
    bids_dir, output_dir : path
        The raw dataset and the derivatives dataset (``output_dir``).
    inversion : str
        Dipole inversion method (see :data:`metaqsm_bids.qsm.inversion.registry.INVERSIONS`); the inputs its spec
        takes (magnitude, echo spacing) are connected or set.
    inversion_params : dict
        Parameters of that method (its spec's ``parameters`` fields; its defaults for what it lacks).
    bfr : str
        Background field removal method (see :data:`metaqsm_bids.qsm.background.registry.BACKGROUND_REMOVALS`).
    bfr_params : dict
        Parameters of that method (e.g. ``{"radius_mm": 6.0}`` for RESHARP; its defaults for what it lacks).
    bipolar : str
        ``auto``, ``on`` or ``off``: the odd/even echo phase correction (:mod:`metaqsm_bids.qsm.field.bipolar`).
    user_mask_file : path or None
        A brain mask on the run's grid to use instead of computing one.
    r2star_method : str
        ``loglinear`` or ``arlo``: the R2* fit of three or more echoes (:mod:`metaqsm_bids.qsm.field.relaxometry`).
    reference : str
        ``brain``, ``csf`` or ``none``: the region whose mean chi is 0 (:mod:`metaqsm_bids.qsm.reference`); ``csf``
        is found from the R2* map, so a single-echo run fails at that step with a message saying so.
    swi_phase_sign, mip_slab_mm : str, float
        The sign of the SWI phase its mask darkens and the mIP's slab thickness (mm)
        (:mod:`metaqsm_bids.qsm.field.swi`).
    output_spaces : list of (str, int or None)
        ``(space, resolution)`` pairs; template spaces (all but ``orig``) get the maps resampled
        there once the run's derivatives are written (:func:`~metaqsm_bids.workflows.spaces.init_template_wf`).
    """
    # a wrong method or parameter name fails here, not when the run reaches its node
    lookup(BACKGROUND_REMOVALS, bfr, "background field removal").settings(bfr_params)
    wf = pe.Workflow(name=name or f"qsm_{run.name.replace('-', '_')}_wf")
    mem_gb = _memory_gb(run)
    source = (run.phase_files or run.imag_files)[0]
    sign = run.phase_sign
    prep = pe.Node(PrepareMEGRE(magnitude_files=run.magnitude_files, phase_files=run.phase_files,
                                real_files=run.real_files, imag_files=run.imag_files,
                                n_echoes=len(run.echo_times_s), phase_units=run.phase_units,
                                phase_sign=sign.factor if sign else 1,
                                phase_sign_provenance=sign.provenance() if sign else {},
                                source_file=source),
                   name="phase_scaling", mem_gb=mem_gb)
    mask = pe.Node(BrainMask(source_file=run.reference_file, echo_times_s=list(run.echo_times_s),
                             field_strength_t=run.field_strength_t, num_threads=omp_nthreads),
                   name="brain_mask", mem_gb=mem_gb / 2, n_procs=omp_nthreads)
    if user_mask_file:
        mask.inputs.user_mask_file = str(user_mask_file)
    field = pe.Node(TotalField(source_file=source, echo_times_s=list(run.echo_times_s), bipolar=bipolar,
                               num_threads=omp_nthreads),
                    name="total_field", mem_gb=mem_gb, n_procs=omp_nthreads)
    bfr = pe.Node(BackgroundRemoval(source_file=source, method=bfr, parameters=dict(bfr_params or {}),
                                    field_strength_t=run.field_strength_t, num_threads=omp_nthreads),
                  name="background_removal", mem_gb=mem_gb / 2, n_procs=omp_nthreads)
    invert = _inversion_node(run, inversion, inversion_params, source=source, device=device,
                             omp_nthreads=omp_nthreads, mem_gb=mem_gb / 2)
    # both under a second: no cluster job's queue wait for them
    chi_reference = pe.Node(ChiReference(source_file=source, region=reference, field_strength_t=run.field_strength_t),
                            name="chi_reference", mem_gb=mem_gb / 4, run_without_submitting=True)
    swi = pe.Node(SWI(source_file=source, echo_times_s=list(run.echo_times_s), phase_sign=swi_phase_sign,
                      slab_mm=mip_slab_mm), name="swi", mem_gb=mem_gb / 4, run_without_submitting=True)
    sink = pe.Node(WriteRunDerivatives(
        output_dir=str(output_dir), bids_dir=str(bids_dir), entities=run.entities,
        source_files=run.source_files,
        acquisition=_acquisition(run, bids_dir), num_threads=omp_nthreads,
    ), name="ds_run", run_without_submitting=True)

    wf.connect([
        (prep, mask, [("magnitude_file", "magnitude_file")]),
        (prep, field, [("magnitude_file", "magnitude_file"), ("phase_file", "phase_file")]),
        (field, bfr, [("field_file", "field_file")]),
        (mask, bfr, [("mask_file", "mask_file")]),
        (field, bfr, [("magnitude_rss_file", "magnitude_file"), ("residual_file", "residual_file")]),
        (bfr, invert, [("local_field_file", "local_field_file"), ("mask_file", "mask_file")]),
        (prep, sink, [("provenance", "phase_provenance")]),
        (mask, sink, [("mask_file", "brain_mask_file"), ("provenance", "mask_provenance")]),
        (field, sink, [("field_file", "total_field_file"), ("magnitude_rss_file", "magnitude_rss_file"),
                       ("residual_file", "fit_residual_file"), ("provenance", "field_provenance")]),
        (bfr, sink, [("local_field_file", "local_field_file"), ("mask_file", "qsm_mask_file"),
                     ("reliable_mask_file", "reliable_mask_file"), ("provenance", "bfr_provenance")]),
        (invert, sink, [("provenance", "inversion_provenance")]),
        (invert, chi_reference, [("chimap_file", "chimap_file")]),
        (bfr, chi_reference, [("mask_file", "mask_file")]),
        (chi_reference, sink, [("chimap_file", "chimap_file"), ("provenance", "reference_provenance")]),
        (field, swi, [("magnitude_rss_file", "magnitude_file")]),
        (bfr, swi, [("local_field_file", "local_field_file")]),
        (swi, sink, [("swi_file", "swi_file"), ("mip_file", "mip_file"), ("provenance", "swi_provenance"),
                     ("mip_parameters", "mip_parameters")]),
    ])
    if "magnitude" in INVERSIONS[inversion].inputs:
        wf.connect(field, "magnitude_rss_file", invert, "magnitude_file")
    if reference == "csf":
        wf.connect(chi_reference, "reference_mask_file", sink, "reference_mask_file")
    if len(run.echo_times_s) > 1:  # one echo has no decay to fit: its run's Warnings say there is no R2* map
        # its own node, not part of the total field's: it needs only the magnitude and the brain mask, so it runs
        # beside the field steps (MultiProc), and its choices never invalidate their cache
        r2star = pe.Node(R2StarMap(source_file=run.magnitude_files[0] if run.magnitude_files else source,
                                   echo_times_s=list(run.echo_times_s), method=r2star_method,
                                   num_threads=omp_nthreads),
                         name="r2star_map", mem_gb=mem_gb / 2, n_procs=omp_nthreads,
                         run_without_submitting=True)  # under a second: not worth a cluster job's queue wait
        wf.connect([
            (prep, r2star, [("magnitude_file", "magnitude_file")]),
            (mask, r2star, [("mask_file", "mask_file")]),
            (r2star, sink, [("r2star_file", "r2star_file"), ("t2star_file", "t2star_file"),
                            ("provenance", "r2star_provenance")]),
        ])
        if reference == "csf":
            wf.connect(r2star, "r2star_file", chi_reference, "r2star_file")
    templates = [space for space in output_spaces or () if space[0] != "orig"]
    if templates:
        template_wf = init_template_wf(run, templates, output_dir=output_dir, omp_nthreads=omp_nthreads)
        wf.connect(sink, "out_files", template_wf, "inputnode.derivatives")
    return wf
