"""The sink that writes one run's derivatives with their sidecars."""
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

from ..io.derivatives import (BIDSIGNORE, RELIABILITY_KEYS, bids_uri, derivative_path, software_versions, write_json,
                              write_nifti)
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

        def path(suffix, datatype, desc=None):
            return derivative_path(out, {**inputs.entities, "desc": desc}, suffix, datatype)

        paths = {
            "brain_mask": path("mask", "anat", "brain"),
            "magnitude": path("magnitude", "fmap", "total"),
            "total_field": path("fieldmap", "fmap", "total"),
            "fit_residual": path("residual", "fmap", "echofit"),
            "reliable_mask": path("mask", "anat", "reliable"),
            "local_magnitude": path("magnitude", "fmap", "local"),
            "local_field": path("fieldmap", "fmap", "local"),
            "qsm_mask": path("mask", "anat", "qsm"),
            "chimap": path("Chimap", "anat"),
            # BIDS has no SWI suffix: a T2*-weighted image (T2starw) with a desc-, as fMRIPrep names what BIDS lacks
            "swi": path("T2starw", "anat", "swi"),
            "mip": path("T2starw", "anat", "mip"),
        }
        if isdefined(inputs.reference_mask_file):
            paths["reference_mask"] = path("mask", "anat", "reference")
        relaxometry = isdefined(inputs.r2star_file)
        if relaxometry:
            paths.update(r2star=path("R2starmap", "anat"), t2star=path("T2starmap", "anat"))

        def own(kind):
            return bids_uri("", paths[kind].relative_to(out))

        common = {"SoftwareVersions": software_versions(), **inputs.acquisition}
        swi_parameters = dict(inputs.swi_provenance)
        chi_reference = dict(inputs.reference_provenance)
        if chi_reference["Region"] != "none":  # the region: the QSM mask itself (brain) or its own mask (csf)
            chi_reference["Mask"] = own("reference_mask" if "reference_mask" in paths else "qsm_mask")
        steps = {
            "PhaseScaling": inputs.phase_provenance,
            "BrainMask": inputs.mask_provenance,
            "TotalField": inputs.field_provenance,
            "BackgroundFieldRemoval": inputs.bfr_provenance,
            "DipoleInversion": inputs.inversion_provenance,
        }
        chain = list(steps)

        def steps_upto(name):
            return {k: steps[k] for k in chain[: chain.index(name) + 1]}

        def load(path_in, dtype=np.float32):
            return np.asarray(nib.load(path_in).dataobj, dtype=dtype)

        reference = nib.load(inputs.chimap_file)
        qsm_mask = load(inputs.qsm_mask_file, np.uint8)
        magnitude = load(inputs.magnitude_rss_file)
        images = {
            "brain_mask": (load(inputs.brain_mask_file, np.uint8), np.uint8),
            "magnitude": (magnitude, np.float32),
            "total_field": (load(inputs.total_field_file), np.float32),
            "fit_residual": (load(inputs.fit_residual_file), np.float32),
            "reliable_mask": (load(inputs.reliable_mask_file, np.uint8), np.uint8),
            "local_magnitude": (magnitude * qsm_mask, np.float32),
            "local_field": (load(inputs.local_field_file), np.float32),
            "qsm_mask": (qsm_mask, np.uint8),
            "chimap": (load(inputs.chimap_file), np.float32),
            "swi": (load(inputs.swi_file), np.float32),
            "mip": (load(inputs.mip_file), np.float32),
        }
        if "reference_mask" in paths:
            images["reference_mask"] = (load(inputs.reference_mask_file, np.uint8), np.uint8)
        if relaxometry:
            images.update(r2star=(load(inputs.r2star_file), np.float32), t2star=(load(inputs.t2star_file), np.float32))
        # masks are on the grid of the raw images: BIDS names that image in SpatialReference
        grid = {"SpatialReference": raw_sources[0]}
        sidecars = {
            "brain_mask": {
                "Description": "Brain mask computed from the magnitude images.",
                "Type": "Brain", "SkullStripped": False, "Sources": raw_sources, **grid,
                **steps_upto("BrainMask"),
            },
            "magnitude": {
                "Description": "Root-sum-of-squares magnitude over echoes (the total field map's magnitude).",
                "Units": "arbitrary", "SkullStripped": False, "Sources": raw_sources, **steps_upto("PhaseScaling"),
            },
            "total_field": {
                "Description": "Total field map: multi-echo fit of the unwrapped phase, "
                               "phase offset at TE=0 removed.",
                "Units": "Hz", "SkullStripped": False, "Sources": raw_sources,
                **steps_upto("TotalField"),
            },
            "fit_residual": {
                "Description": "Magnitude-weighted RMS residual of the phase about its fitted line over echo "
                               "time (the total field's echo fit); 0 with one or two echoes.",
                "Units": "rad", "SkullStripped": False, "Sources": raw_sources, **steps_upto("TotalField"),
            },
            "reliable_mask": {
                "Description": "Reliability map: the brain mask's voxels whose field is trusted, with an RSS "
                               "magnitude of at least MinSignalFraction x its median in the brain mask and an "
                               "echo-fit residual of at most MaxResidualRad (rad). The others (bone or air "
                               "inside the brain mask, lesions whose signal decays within the first echoes, phase "
                               "off the echo-time line) are left out of background field removal's fit; their "
                               "local field is completed from the reliable voxels' (see the local field).",
                "Type": "ROI", "SkullStripped": True,
                "Sources": [own("brain_mask"), own("magnitude"), own("fit_residual")], **grid,
                **{key: inputs.bfr_provenance[key] for key in RELIABILITY_KEYS if key in inputs.bfr_provenance},
                **steps_upto("BackgroundFieldRemoval"),
            },
            "local_magnitude": {
                "Description": "Root-sum-of-squares magnitude inside the mask where the local field is defined.",
                "Units": "arbitrary", "SkullStripped": True, "Sources": [own("magnitude"), own("qsm_mask")],
                **steps_upto("BackgroundFieldRemoval"),
            },
            "local_field": {
                "Description": "Local field map after background field removal; in the QSM mask's voxels "
                               "outside the reliability map (CompletedVoxels), the field of the susceptibility "
                               "fitted to the reliable voxels' local field.",
                "Units": "Hz", "SkullStripped": True, "Sources": [own("total_field"), own("reliable_mask")],
                **steps_upto("BackgroundFieldRemoval"),
            },
            "qsm_mask": {
                "Description": "Where the local field and the susceptibility map are defined: the brain mask "
                               "less its signal voids that reach its surface (bone, sinus air) with PDF; with "
                               "RESHARP, V-SHARP and LBV, the reliability map less what they could not keep (the "
                               "kernel's erosion, LBV's boundary layer), its inner holes filled.",
                "Type": "Brain", "SkullStripped": True, "Sources": [own("brain_mask"), own("reliable_mask")], **grid,
                **steps_upto("BackgroundFieldRemoval"),
            },
            "chimap": {
                "Description": _CHIMAP_DESCRIPTION[chi_reference["Region"]],
                "Units": "ppm", "SkullStripped": True,
                "Sources": [own("local_field"), own("qsm_mask"), *raw_sources,
                            *([own("reference_mask")] if "reference_mask" in paths else [])],
                **steps, "SusceptibilityReference": chi_reference,
            },
            "swi": {
                "Description": "Susceptibility-weighted image (Haacke et al. 2004): the root-sum-of-squares magnitude "
                               "times the phase mask of the local field at EchoTimeUsed raised to PhaseMaskPower "
                               "(metaqsm_bids.qsm.field.swi); outside the QSM mask, the magnitude.",
                "Units": "arbitrary", "SkullStripped": False, "Sources": [own("magnitude"), own("local_field")],
                **steps_upto("BackgroundFieldRemoval"), "SWI": swi_parameters,
            },
            "mip": {
                "Description": "Minimum-intensity projection of the SWI over a slab of SlabSlices slices "
                               "(SlabThicknessMm) centred on each slice along voxel axis SlabAxis, on the SWI's grid.",
                "Units": "arbitrary", "SkullStripped": False, "Sources": [own("swi")],
                **steps_upto("BackgroundFieldRemoval"), "SWI": swi_parameters,
                "MinimumIntensityProjection": dict(inputs.mip_parameters),
            },
        }
        if "reference_mask" in paths:
            sidecars["reference_mask"] = {
                "Description": "Reference region of the Chimap (its mean susceptibility is 0 there): the ventricular "
                               "CSF, found from the R2* map (see SusceptibilityReference).",
                "Type": "ROI", "SkullStripped": True,
                "Sources": [own("r2star"), own("qsm_mask")], **grid,
                "SusceptibilityReference": chi_reference,
            }
        if relaxometry:
            # the decay is the magnitude's: its raw files (both parts where the magnitude is |real + i imag|)
            magnitude_sources = [uri for uri in raw_sources if "_part-mag_" in uri] or raw_sources
            fit = {"PhaseScaling": inputs.phase_provenance, "BrainMask": inputs.mask_provenance,
                   "R2starFit": dict(inputs.r2star_provenance) if isdefined(inputs.r2star_provenance) else {}}
            relaxometry_sources = [*magnitude_sources, own("brain_mask")]
            sidecars["r2star"] = {
                "Description": "Effective transverse relaxation rate R2* of the multi-echo magnitude, fitted per voxel "
                               "(mono-exponential decay; method in R2starFit), clipped to R2starRangeHz; 0 outside "
                               "the brain mask.",
                "Units": "1/s", "SkullStripped": True, "Sources": relaxometry_sources, **fit,
            }
            sidecars["t2star"] = {
                "Description": "Effective transverse relaxation time T2* = 1/R2* (see the R2starmap), at most "
                               "T2starMaxSeconds where R2* is near 0; 0 outside the brain mask.",
                "Units": "s", "SkullStripped": True, "Sources": [own("r2star"), *relaxometry_sources], **fit,
            }
        ensure_bidsignore(out, BIDSIGNORE)  # the residual has no BIDS suffix
        for kind, target in paths.items():
            data, dtype = images[kind]
            write_nifti(target, data, reference.affine, dtype)
            write_json(target.with_name(target.name.replace(".nii.gz", ".json")), {**common, **sidecars[kind]})
        self._results["out_files"] = {k: str(v) for k, v in paths.items()}
        return runtime
