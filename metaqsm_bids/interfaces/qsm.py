"""Thin nipype interfaces around the numerical modules in :mod:`metaqsm_bids.qsm`.

Each interface loads NIfTI files, calls one pure function, writes its result
(uncompressed ``.nii`` in the work directory: gzip would dominate the runtime) and
returns a ``provenance`` dict (method, parameters, diagnostics, seconds) that ends
up in the derivative sidecars.
"""
import os
import time
from contextlib import contextmanager

import nibabel as nib
import numpy as np
import scipy.fft
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..qsm import physics


@contextmanager
def _threads(n):
    """Bound the FFT and torch thread pools of one node (MultiProc runs several at once)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with scipy.fft.set_workers(n):
            yield
    finally:
        torch.set_num_threads(previous)


def _geometry(img):
    return physics.voxel_size_mm(img.affine), physics.b0_direction_voxel(img.affine)


def _camel_case(name):
    """A Python parameter name as a BIDS-style sidecar key: ``threshold`` -> ``Threshold``, ``lambda_`` -> ``Lambda``,
    ``max_iter`` -> ``MaxIter``."""
    return "".join(part[:1].upper() + part[1:] for part in name.strip("_").split("_"))


def _save(data, reference, name, dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine)
    img.header.set_xyzt_units("mm", "sec")
    path = os.path.abspath(name)
    nib.save(img, path)
    return path


class _QSMInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, desc="FFT/torch threads for this node")
    source_file = traits.Str(desc="input file named in error messages")


class _QSMInterface(SimpleInterface):
    """Runs ``_compute`` inside a thread limit and records its wall time in the provenance."""

    def _run_interface(self, runtime):
        import torch  # noqa: F401  (imported before the clock starts: seconds of import are no step's time)

        start = time.perf_counter()
        source = self.inputs.source_file if isdefined(self.inputs.source_file) else None
        try:
            with _threads(self.inputs.num_threads):
                provenance = self._compute()
        except ValueError as err:  # name the input, so the user knows which run to look at
            if source and source not in str(err) and not str(err).startswith(os.sep):  # not already a path
                raise ValueError(f"{source}: {err}") from err
            raise
        provenance["ElapsedSeconds"] = round(time.perf_counter() - start, 3)
        self._results["provenance"] = provenance
        return runtime


class _PrepareMEGREInputSpec(_QSMInputSpec):
    magnitude_files = InputMultiObject(File(exists=True), mandatory=True, desc="magnitude, one file per echo")
    phase_files = InputMultiObject(File(exists=True), mandatory=True, desc="phase, one file per echo")
    phase_units = traits.Enum(None, "rad", "arbitrary", usedefault=True, desc="the sidecars' Units")


class _PrepareMEGREOutputSpec(TraitedSpec):
    magnitude_file = File(exists=True, desc="4D magnitude (echo last)")
    phase_file = File(exists=True, desc="4D phase in rad (echo last)")
    provenance = traits.Dict()


class PrepareMEGRE(_QSMInterface):
    """Stack the echoes and scale the phase to radians (vendor integer ranges included)."""

    input_spec = _PrepareMEGREInputSpec
    output_spec = _PrepareMEGREOutputSpec

    def _compute(self):
        from ..qsm.phase import phase_to_rad

        reference = nib.load(self.inputs.magnitude_files[0])
        magnitudes, phases = [], []
        for mag_file, phase_file in zip(self.inputs.magnitude_files, self.inputs.phase_files):
            mag = np.asarray(nib.load(mag_file).dataobj, dtype=np.float32).reshape(reference.shape[:3])
            phase = np.asarray(nib.load(phase_file).dataobj, dtype=np.float32).reshape(reference.shape[:3])
            for path, data in ((mag_file, mag), (phase_file, phase)):
                bad = int((~np.isfinite(data)).sum())
                if bad:
                    raise ValueError(f"{path}: {bad} voxels are NaN or infinite")
            try:
                phases.append(phase_to_rad(phase, self.inputs.phase_units))
            except ValueError as err:
                raise ValueError(f"{phase_file}: {err}") from err
            magnitudes.append(mag)
        self._results["magnitude_file"] = _save(np.stack(magnitudes, -1), reference, "magnitude.nii")
        self._results["phase_file"] = _save(np.stack(phases, -1), reference, "phase_rad.nii")
        if self.inputs.phase_units is None:
            return {"Method": "phase_to_rad", "PhaseUnits": "inferred from range",
                    "Warnings": ["the phase sidecars have no Units: rad assumed where the values lie within "
                                 "[-pi, pi] or [0, 2*pi], else one full turn over the value range"]}
        return {"Method": "phase_to_rad", "PhaseUnits": self.inputs.phase_units}


class _BrainMaskInputSpec(_QSMInputSpec):
    magnitude_file = File(exists=True, mandatory=True, desc="4D magnitude")
    user_mask_file = File(exists=True, desc="a mask to use instead of computing one")


class _BrainMaskOutputSpec(TraitedSpec):
    mask_file = File(exists=True)
    provenance = traits.Dict()


class BrainMask(_QSMInterface):
    """Brain mask from the root-sum-of-squares magnitude over echoes, or a user's mask."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _compute(self):
        from ..qsm.masking import brain_mask

        img = nib.load(self.inputs.magnitude_file)
        if isdefined(self.inputs.user_mask_file):
            user = nib.load(self.inputs.user_mask_file)
            if user.shape[:3] != img.shape[:3] or not np.allclose(user.affine, img.affine, atol=1e-3):
                raise ValueError(
                    f"{self.inputs.user_mask_file}: mask grid {user.shape[:3]} does not match "
                    f"{self.inputs.source_file} {img.shape[:3]} (shape and affine must agree)"
                )
            mask = np.asarray(user.dataobj).reshape(img.shape[:3]) > 0
            provenance = {"Method": "user-provided", "File": self.inputs.user_mask_file}
        else:
            voxel_size, _ = _geometry(img)
            rss = np.sqrt((np.asarray(img.dataobj, dtype=np.float32) ** 2).sum(-1))
            mask = brain_mask(rss, voxel_size)
            provenance = {"Method": "magnitude threshold + morphology (metaqsm brain_mask)",
                          "Input": "root-sum-of-squares magnitude over echoes"}
        if not mask.any():
            raise ValueError(f"{self.inputs.user_mask_file}: the brain mask is empty"
                             if isdefined(self.inputs.user_mask_file) else "the brain mask is empty")
        provenance["Voxels"] = int(mask.sum())
        self._results["mask_file"] = _save(mask, img, "brain_mask.nii", np.uint8)
        return provenance


class _TotalFieldInputSpec(_QSMInputSpec):
    magnitude_file = File(exists=True, mandatory=True, desc="4D magnitude")
    phase_file = File(exists=True, mandatory=True, desc="4D phase (rad)")
    echo_times_s = traits.List(traits.Float, mandatory=True, desc="echo times (s)")


class _TotalFieldOutputSpec(TraitedSpec):
    field_file = File(exists=True, desc="total field (Hz)")
    magnitude_rss_file = File(exists=True, desc="root-sum-of-squares magnitude over echoes")
    provenance = traits.Dict()


class TotalField(_QSMInterface):
    """Multi-echo field map: unwrapping + weighted echo fit, phase offset at TE=0 removed."""

    input_spec = _TotalFieldInputSpec
    output_spec = _TotalFieldOutputSpec

    def _compute(self):
        from ..qsm.echofit import fit_total_field

        mag_img = nib.load(self.inputs.magnitude_file)
        magnitude = np.asarray(mag_img.dataobj, dtype=np.float32)
        phase = np.asarray(nib.load(self.inputs.phase_file).dataobj, dtype=np.float32)
        voxel_size, _ = _geometry(mag_img)
        fit = fit_total_field(magnitude, phase, self.inputs.echo_times_s, voxel_size)
        self._results["field_file"] = _save(fit.field_hz, mag_img, "total_field_hz.nii")
        self._results["magnitude_rss_file"] = _save(np.sqrt((magnitude ** 2).sum(-1)), mag_img, "magnitude_rss.nii")
        if magnitude.shape[-1] > 1:
            return {
                "Method": "Laplacian unwrapping of the echo-difference field + magnitude-weighted linear fit over "
                          "echoes",
                "EchoTime": list(self.inputs.echo_times_s),
                "Units": "Hz",
            }
        return {
            "Method": "Laplacian unwrapping of a single echo, divided by 2*pi*TE",
            "EchoTime": list(self.inputs.echo_times_s),
            "Units": "Hz",
            "Warnings": ["single echo: the phase offset at TE = 0 could not be removed (that needs two or more "
                         "echoes); the total field includes it, divided by 2*pi*TE"],
        }


class _BackgroundRemovalInputSpec(_QSMInputSpec):
    field_file = File(exists=True, mandatory=True, desc="total field (Hz)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    magnitude_file = File(exists=True, desc="RSS magnitude, for methods that weight by it (PDF)")
    method = traits.Enum("resharp", "vsharp", "pdf", usedefault=True, desc="background field removal method")
    radius_mm = traits.Float(6.0, usedefault=True, desc="RESHARP spherical kernel radius (mm)")


class _BackgroundRemovalOutputSpec(TraitedSpec):
    local_field_file = File(exists=True, desc="local field (Hz)")
    mask_file = File(exists=True, desc="mask eroded by the kernel radius: where the local field is valid")
    provenance = traits.Dict()


class BackgroundRemoval(_QSMInterface):
    """RESHARP background field removal (Sun & Wilman 2014)."""

    input_spec = _BackgroundRemovalInputSpec
    output_spec = _BackgroundRemovalOutputSpec

    def _compute(self):
        from ..qsm.background import remove_background

        img = nib.load(self.inputs.field_file)
        field_hz = np.asarray(img.dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        voxel_size, b0_dir = _geometry(img)
        params = {}
        if self.inputs.method == "resharp":
            params["radius_mm"] = self.inputs.radius_mm
        if self.inputs.method == "pdf" and isdefined(self.inputs.magnitude_file):
            params["magnitude"] = np.asarray(nib.load(self.inputs.magnitude_file).dataobj, dtype=np.float32)
        result = remove_background(self.inputs.method, field_hz, mask, voxel_size, b0_dir=b0_dir, **params)
        self._results["local_field_file"] = _save(result.local_field, img, "local_field_hz.nii")
        self._results["mask_file"] = _save(result.mask, img, "qsm_mask.nii", np.uint8)
        return {
            "Method": self.inputs.method.upper().replace("VSHARP", "V-SHARP"),
            **({"RadiusMm": self.inputs.radius_mm} if self.inputs.method == "resharp" else {}),
            **(result.parameters or {}),
            "Iterations": int(result.iterations),
            "RelativeResidual": float(result.relative_residual),
            "Units": "Hz",
        }


class _DipoleInversionInputSpec(_QSMInputSpec):
    local_field_file = File(exists=True, mandatory=True, desc="local field (Hz)")
    mask_file = File(exists=True, mandatory=True, desc="mask where the local field is valid")
    magnitude_file = File(exists=True, desc="RSS magnitude, for methods that use it (MEDI)")
    echo_times_s = traits.List(traits.Float, desc="echo times (s), for MEDI's noise scaling")
    field_strength_t = traits.Float(mandatory=True, desc="B0 (T)")
    method = traits.Str("tkd", usedefault=True, desc="inversion method")
    parameters = traits.Dict(desc="method parameters")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True,
                         desc="torch device; 'auto' is resolved on the machine that runs the node")


class _DipoleInversionOutputSpec(TraitedSpec):
    chimap_file = File(exists=True, desc="susceptibility (ppm)")
    provenance = traits.Dict()


class DipoleInversion(_QSMInterface):
    """Local field (Hz) -> susceptibility (ppm) with the chosen method."""

    input_spec = _DipoleInversionInputSpec
    output_spec = _DipoleInversionOutputSpec

    def _compute(self):
        from ..qsm.inversion import NETWORK_INVERSIONS, invert

        img = nib.load(self.inputs.local_field_file)
        voxel_size, b0_dir = _geometry(img)
        local_ppm = physics.field_hz_to_ppm(np.asarray(img.dataobj, dtype=np.float32), self.inputs.field_strength_t)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        params = dict(self.inputs.parameters) if isdefined(self.inputs.parameters) else {}
        extra = {}
        if self.inputs.method == "medi":
            tes = self.inputs.echo_times_s
            extra = {"magnitude": np.asarray(nib.load(self.inputs.magnitude_file).dataobj, dtype=np.float32),
                     "b0_tesla": self.inputs.field_strength_t,
                     "delta_te_s": float(np.diff(tes).mean()) if len(tes) > 1 else float(tes[0])}
        if self.inputs.method in NETWORK_INVERSIONS:
            extra = {"device": self.inputs.device}  # resolved here, on the machine that runs the node
        info = {}
        chi = invert(self.inputs.method, local_ppm, mask, voxel_size, b0_dir, info=info, **params, **extra)
        self._results["chimap_file"] = _save(chi, img, "chimap_ppm.nii")
        return {
            "Method": self.inputs.method,
            **{_camel_case(key): value for key, value in params.items()},  # BIDS style: threshold -> Threshold
            **info,
            "B0DirectionVoxel": [round(float(v), 6) for v in b0_dir],
            "VoxelSizeMm": [round(float(v), 6) for v in voxel_size],
            "MagneticFieldStrength": self.inputs.field_strength_t,
            "Units": "ppm",
        }
