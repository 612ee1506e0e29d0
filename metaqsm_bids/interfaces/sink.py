"""The sink that writes one run's derivatives with their sidecars."""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..io.derivatives import RELIABILITY_KEYS, bids_uri, software_versions, write_json, write_nifti
from ..io.outputs import OUTPUTS, output_path, sidecar_path
from ..io.validation import ensure_bidsignore


#: The Chimap's Description for each reference region (metaqsm_bids.qsm.reference).
_CHIMAP_DESCRIPTION = {
    "brain": "Magnetic susceptibility map relative to its mean in the QSM mask (the whole brain; see "
             "SusceptibilityReference).",
    "csf": "Magnetic susceptibility map relative to its mean in the ventricular CSF (the reference mask; see "
           "SusceptibilityReference).",
    "none": "Magnetic susceptibility map as the dipole inversion gives it (mean 0 in the QSM mask).",
}


class _WriteRunDerivativesInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="the derivatives dataset root")
    bids_dir = Directory(exists=True, mandatory=True, desc="the raw dataset root")
    entities = traits.Dict(mandatory=True, desc="run entities (pybids names)")
    source_files = InputMultiObject(File(exists=True), mandatory=True, desc="raw magnitude and phase files")
    brain_mask_file = File(exists=True, mandatory=True)
    magnitude_rss_file = File(exists=True, mandatory=True)
    total_field_file = File(exists=True, mandatory=True)
    fit_residual_file = File(exists=True, mandatory=True, desc="RMS phase residual of the echo fit (rad)")
    reliable_mask_file = File(exists=True, mandatory=True, desc="the brain mask's voxels that passed the "
                                                                "reliability test")
    local_field_file = File(exists=True, mandatory=True)
    qsm_mask_file = File(exists=True, mandatory=True)
    chimap_file = File(exists=True, mandatory=True)
    mask_provenance = traits.Dict(mandatory=True)
    phase_provenance = traits.Dict(mandatory=True)
    field_provenance = traits.Dict(mandatory=True)
    bfr_provenance = traits.Dict(mandatory=True)
    inversion_provenance = traits.Dict(mandatory=True)
    r2star_file = File(exists=True, desc="R2* (1/s); absent for a single echo")
    t2star_file = File(exists=True, desc="T2* (s); given with r2star_file")
    r2star_provenance = traits.Dict(desc="the R2* fit's method and parameters; given with r2star_file")
    reference_provenance = traits.Dict(mandatory=True, desc="the susceptibility reference (region, mean subtracted)")
    reference_mask_file = File(exists=True, desc="the reference region, when it is not the QSM mask (csf)")
    swi_file = File(exists=True, mandatory=True, desc="SWI (arbitrary units)")
    mip_file = File(exists=True, mandatory=True, desc="the SWI's minimum-intensity projection")
    swi_provenance = traits.Dict(mandatory=True, desc="the SWI's parameters")
    mip_parameters = traits.Dict(mandatory=True, desc="the projection's slab")
    acquisition = traits.Dict(mandatory=True, desc="EchoTime (s), MagneticFieldStrength (T)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="files written at once (gzip releases the GIL)")


class _WriteRunDerivativesOutputSpec(TraitedSpec):
    out_files = traits.Dict(desc="output kind -> written path")


class WriteRunDerivatives(SimpleInterface):
    """Write the run's masks, field maps, echo-fit residual, Chimap (and its reference region, when it is not the
    QSM mask), SWI and its minimum-intensity projection and (two echoes or more) R2* and T2* maps with
    provenance sidecars.

    Runs only after every step has succeeded, loads every image before writing
    the first one, and writes each file atomically: a failed run leaves nothing.
    Always runs, even when nipype's cache holds its inputs: the output folder may have been
    deleted or edited since (the cache only knows the work directory).
    """

    _always_run = True

    input_spec = _WriteRunDerivativesInputSpec
    output_spec = _WriteRunDerivativesOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        out = Path(inputs.output_dir)
        bids_dir = Path(inputs.bids_dir).resolve()
        raw_sources = [bids_uri("raw", Path(f).resolve().relative_to(bids_dir)) for f in inputs.source_files]
        paths = {kind: output_path(out, kind, inputs.entities) for kind in _written_kinds(inputs)}

        def own(kind):
            return bids_uri("", paths[kind].relative_to(out))

        chi_reference = dict(inputs.reference_provenance)
        if chi_reference["Region"] != "none":  # the region: the QSM mask itself (brain) or its own mask (csf)
            chi_reference["Mask"] = own("reference_mask" if "reference_mask" in paths else "qsm_mask")
        reference = nib.load(inputs.chimap_file)
        images = _load_images(inputs, paths)
        sidecars = {**_field_sidecars(inputs, own, raw_sources),
                    **_chimap_sidecars(inputs, own, raw_sources, chi_reference, "reference_mask" in paths)}
        if "r2star" in paths:
            sidecars.update(_relaxometry_sidecars(inputs, own, raw_sources))
        common = {"SoftwareVersions": software_versions(), **inputs.acquisition}
        ensure_bidsignore(out, [pattern for kind in paths for pattern in OUTPUTS[kind].bidsignore])

        written = []

        def write(kind):
            write_nifti(paths[kind], images[kind], reference.affine, np.uint8 if OUTPUTS[kind].mask else np.float32)
            written.append(paths[kind])
            write_json(sidecar_path(paths[kind]), {**common, **sidecars[kind]})
            written.append(sidecar_path(paths[kind]))

        # compressing the float volumes is most of the sink's time (0.4 s each at 233x282x65)
        pool = ThreadPoolExecutor(max(1, inputs.num_threads))
        try:
            for task in [pool.submit(write, kind) for kind in sorted(paths, key=lambda k: -images[k].nbytes)]:
                task.result()
        except BaseException:  # e.g. a full disk: the run leaves none of its derivatives, not some
            pool.shutdown(cancel_futures=True)  # the files not started are not written; those started finish
            for path in written:
                path.unlink(missing_ok=True)
            raise
        pool.shutdown()
        self._results["out_files"] = {k: str(v) for k, v in paths.items()}
        return runtime


def _written_kinds(inputs):
    """The kinds of :data:`OUTPUTS` this run writes (the reference mask and relaxometry when given)."""
    return [kind for kind, output in OUTPUTS.items() if output.written == "always"
            or output.written == "reference csf" and isdefined(inputs.reference_mask_file)
            or output.written == "two echoes or more" and isdefined(inputs.r2star_file)]


def _load_images(inputs, kinds):
    """The image of each of ``kinds``, all loaded before the first is written (a failed load writes nothing)."""
    def load(path_in, dtype=np.float32):
        return np.asarray(nib.load(path_in).dataobj, dtype=dtype)

    qsm_mask = load(inputs.qsm_mask_file, np.uint8)
    magnitude = load(inputs.magnitude_rss_file)
    images = {
        "brain_mask": load(inputs.brain_mask_file, np.uint8),
        "magnitude": magnitude,
        "total_field": load(inputs.total_field_file),
        "fit_residual": load(inputs.fit_residual_file),
        "reliable_mask": load(inputs.reliable_mask_file, np.uint8),
        "local_magnitude": magnitude * qsm_mask,
        "local_field": load(inputs.local_field_file),
        "qsm_mask": qsm_mask,
        "chimap": load(inputs.chimap_file),
        "swi": load(inputs.swi_file),
        "mip": load(inputs.mip_file),
    }
    if "reference_mask" in kinds:
        images["reference_mask"] = load(inputs.reference_mask_file, np.uint8)
    if "r2star" in kinds:
        images.update(r2star=load(inputs.r2star_file), t2star=load(inputs.t2star_file))
    return images


def _steps_upto(inputs, name=None):
    """The provenance of the pipeline's steps, in order, up to ``name`` (all of them by default)."""
    steps = {
        "PhaseScaling": inputs.phase_provenance,
        "BrainMask": inputs.mask_provenance,
        "TotalField": inputs.field_provenance,
        "BackgroundFieldRemoval": inputs.bfr_provenance,
        "DipoleInversion": inputs.inversion_provenance,
    }
    chain = list(steps)
    return {k: steps[k] for k in chain[: chain.index(name) + 1 if name else None]}


def _map_sidecar(kind, units, skull_stripped, sources, **provenance):
    """The sidecar of a map: the spec's Description (``provenance`` may word its own), units, sources."""
    return {"Description": OUTPUTS[kind].description, "Units": units, "SkullStripped": skull_stripped,
            "Sources": sources, **provenance}


def _mask_sidecar(kind, mask_type, skull_stripped, sources, raw_sources, **provenance):
    """The sidecar of a mask of BIDS ``Type`` ``mask_type``."""
    # masks are on the grid of the raw images: BIDS names that image in SpatialReference
    return {"Description": OUTPUTS[kind].description, "Type": mask_type, "SkullStripped": skull_stripped,
            "Sources": sources, "SpatialReference": raw_sources[0], **provenance}


def _field_sidecars(inputs, own, raw_sources):
    """Sidecars of the masks and field maps up to the local field (``own``: kind -> its ``bids::`` URI)."""
    upto_bfr = _steps_upto(inputs, "BackgroundFieldRemoval")
    reliability = {key: inputs.bfr_provenance[key] for key in RELIABILITY_KEYS if key in inputs.bfr_provenance}
    return {
        "brain_mask": _mask_sidecar("brain_mask", "Brain", False, raw_sources, raw_sources,
                                    **_steps_upto(inputs, "BrainMask")),
        "magnitude": _map_sidecar("magnitude", "arbitrary", False, raw_sources, **_steps_upto(inputs, "PhaseScaling")),
        "total_field": _map_sidecar("total_field", "Hz", False, raw_sources, **_steps_upto(inputs, "TotalField")),
        "fit_residual": _map_sidecar("fit_residual", "rad", False, raw_sources, **_steps_upto(inputs, "TotalField")),
        "reliable_mask": _mask_sidecar("reliable_mask", "ROI", True,
                                       [own("brain_mask"), own("magnitude"), own("fit_residual")], raw_sources,
                                       **reliability, **upto_bfr),
        "local_magnitude": _map_sidecar("local_magnitude", "arbitrary", True, [own("magnitude"), own("qsm_mask")],
                                        **upto_bfr),
        "local_field": _map_sidecar("local_field", "Hz", True, [own("total_field"), own("reliable_mask")],
                                    **upto_bfr),
        "qsm_mask": _mask_sidecar("qsm_mask", "Brain", True, [own("brain_mask"), own("reliable_mask")], raw_sources,
                                  **upto_bfr),
    }


def _chimap_sidecars(inputs, own, raw_sources, chi_reference, reference_mask):
    """Sidecars of the Chimap, the SWI and its mIP, and (``reference_mask``) the Chimap's reference region."""
    upto_bfr = _steps_upto(inputs, "BackgroundFieldRemoval")
    swi_parameters = dict(inputs.swi_provenance)
    sidecars = {
        "chimap": _map_sidecar("chimap", "ppm", True,
                               [own("local_field"), own("qsm_mask"), *raw_sources,
                                *([own("reference_mask")] if reference_mask else [])],
                               Description=_CHIMAP_DESCRIPTION[chi_reference["Region"]], **_steps_upto(inputs),
                               SusceptibilityReference=chi_reference),
        "swi": _map_sidecar("swi", "arbitrary", False, [own("magnitude"), own("local_field")], **upto_bfr,
                            SWI=swi_parameters),
        "mip": _map_sidecar("mip", "arbitrary", False, [own("swi")], **upto_bfr, SWI=swi_parameters,
                            MinimumIntensityProjection=dict(inputs.mip_parameters)),
    }
    if reference_mask:
        sidecars["reference_mask"] = _mask_sidecar("reference_mask", "ROI", True, [own("r2star"), own("qsm_mask")],
                                                   raw_sources, SusceptibilityReference=chi_reference)
    return sidecars


def _relaxometry_sidecars(inputs, own, raw_sources):
    """Sidecars of the R2* and T2* maps (two echoes or more)."""
    # the decay is the magnitude's: its raw files (both parts where the magnitude is |real + i imag|)
    magnitude_sources = [uri for uri in raw_sources if "_part-mag_" in uri] or raw_sources
    fit = {"PhaseScaling": inputs.phase_provenance, "BrainMask": inputs.mask_provenance,
           "R2starFit": dict(inputs.r2star_provenance) if isdefined(inputs.r2star_provenance) else {}}
    relaxometry_sources = [*magnitude_sources, own("brain_mask")]
    return {
        "r2star": _map_sidecar("r2star", "1/s", True, relaxometry_sources, **fit),
        "t2star": _map_sidecar("t2star", "s", True, [own("r2star"), *relaxometry_sources], **fit),
    }
