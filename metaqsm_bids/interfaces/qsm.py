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

from ..qsm.core import physics
from ..qsm.field.bipolar import BIPOLAR_MODES, DEFAULT_BIPOLAR
from ..qsm.field.relaxometry import DEFAULT_METHOD as DEFAULT_R2STAR_METHOD, METHOD_CHOICES as R2STAR_METHODS
from ..qsm.field.swi import DEFAULT_SWI_PHASE_SIGN, MIP_SLAB_MM, SWI_PHASE_SIGNS, swi
from ..qsm.network.device import DEFAULT_DEVICE, DEVICE_CHOICES
from ..qsm.reference import DEFAULT_REFERENCE, REFERENCE_CHOICES
from ..steps.brain_mask import compute_brain_mask, user_brain_mask
from ..steps.inversion import invert_local_field
from ..steps.local_field import estimate_local_field, reliability_map
from ..steps.phase import complex_to_polar, scale_phase
from ..steps.reference import reference_susceptibility
from ..steps.relaxometry import r2star_maps
from ..steps.total_field import estimate_total_field

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


def _load(path, dtype=np.float32):
    """The image at ``path`` and its data as an array of ``dtype``."""
    img = nib.load(path)
    return img, np.asarray(img.dataobj, dtype=dtype)


def _choice(default, choices, desc):
    """An input taking one of ``choices``, ``default`` unless set."""
    return traits.Enum(default, *(c for c in choices if c != default), usedefault=True, desc=desc)


def _defined(value):
    """An optional input's value, or None where it is not set."""
    return value if isdefined(value) else None


def _save(data, reference, name, dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine)
    img.header.set_xyzt_units("mm", "sec")
    path = os.path.abspath(name)
    nib.save(img, path)
    return path


class _QSMInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True, desc="FFT/torch threads for this node")
    source_file = traits.Str(desc="input file named in error messages")


class _QSMOutputSpec(TraitedSpec):
    """What every :class:`_QSMInterface` outputs besides its files: the provenance it records."""

    provenance = traits.Dict(desc="method, parameters, diagnostics and ElapsedSeconds, for the derivative sidecars")


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
    magnitude_files = InputMultiObject(File(exists=True), desc="magnitude: one 3D file per echo or 4D files (echo last)")
    phase_files = InputMultiObject(File(exists=True), desc="phase, laid out like the magnitude")
    real_files = InputMultiObject(File(exists=True), desc="real part (instead of magnitude and phase)")
    imag_files = InputMultiObject(File(exists=True), desc="imaginary part, laid out like the real part")
    n_echoes = traits.Int(mandatory=True, desc="number of echoes the files hold together")
    phase_units = traits.Enum(None, "rad", "arbitrary", usedefault=True, desc="the sidecars' Units")
    phase_sign = traits.Enum(1, -1, usedefault=True, desc="factor applied to every echo's phase")
    phase_sign_provenance = traits.Dict(desc="why that factor (metaqsm_bids.qsm.field.phase_sign.PhaseSign.provenance)")


class _PrepareMEGREOutputSpec(_QSMOutputSpec):
    magnitude_file = File(exists=True, desc="4D magnitude (echo last)")
    phase_file = File(exists=True, desc="4D phase in rad (echo last)")


def _load_echo_volumes(files, shape):
    """``(volumes, names)``: every 3D volume of the 3D or 4D (echo last) ``files``, named for error messages."""
    volumes, names = [], []
    for path in files:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        if data.ndim == 3 or (data.ndim == 4 and data.shape[3] == 1):
            volumes.append(data.reshape(shape))
            names.append(path)
        elif data.ndim == 4:
            volumes += [data[..., n] for n in range(data.shape[3])]
            names += [f"{path} (volume {n + 1})" for n in range(data.shape[3])]
        else:
            raise ValueError(f"{path}: shape {data.shape} is neither 3D nor 4D (echo last)")
    for name, volume in zip(names, volumes):
        bad = int((~np.isfinite(volume)).sum()) if np.issubdtype(volume.dtype, np.floating) else 0
        if bad:
            raise ValueError(f"{name}: {bad} voxels are NaN or infinite")
    return volumes, names


class PrepareMEGRE(_QSMInterface):
    """Stack the echoes as magnitude and phase (rad), from magnitude/phase or real/imaginary files.

    Phase: scaled to radians with one known convention for all echoes, then multiplied by ``phase_sign``
    (:func:`~metaqsm_bids.steps.phase.scale_phase`). Real/imaginary: ``|S|`` and ``angle(S)``
    (:func:`~metaqsm_bids.steps.phase.complex_to_polar`).
    """

    input_spec = _PrepareMEGREInputSpec
    output_spec = _PrepareMEGREOutputSpec

    def _compute(self):
        complex_parts = isdefined(self.inputs.real_files) and self.inputs.real_files
        first = self.inputs.real_files[0] if complex_parts else self.inputs.magnitude_files[0]
        reference = nib.load(first)
        shape = reference.shape[:3]
        sign = dict(phase_sign=self.inputs.phase_sign,
                    phase_sign_provenance=_defined(self.inputs.phase_sign_provenance))
        if complex_parts:
            reals, _ = _load_echo_volumes(self.inputs.real_files, shape)
            imags, _ = _load_echo_volumes(self.inputs.imag_files, shape)
            self._check_echo_count(first, reals)
            echoes = complex_to_polar(reals, imags, **sign)
        else:
            mags, names = _load_echo_volumes(self.inputs.magnitude_files, shape)
            raw_phases, phase_names = _load_echo_volumes(self.inputs.phase_files, shape)
            if len(raw_phases) != len(mags):
                raise ValueError(f"{self.inputs.phase_files[0]}: {len(raw_phases)} phase volumes but "
                                 f"{len(mags)} magnitude volumes")
            self._check_echo_count(first, mags)
            echoes = scale_phase(mags, raw_phases, self.inputs.phase_units, names=names, phase_names=phase_names,
                                 **sign)
        self._results["magnitude_file"] = _save(echoes.magnitude, reference, "magnitude.nii")
        self._results["phase_file"] = _save(echoes.phase_rad, reference, "phase_rad.nii")
        # what the input lacks (Units, a known vendor) is said once, in the run's Warnings (MEGRERun.warnings)
        return echoes.provenance

    def _check_echo_count(self, first, volumes):
        if len(volumes) != self.inputs.n_echoes:
            raise ValueError(f"{first}: the files hold {len(volumes)} echo volumes but the sidecars give "
                             f"{self.inputs.n_echoes} echo times")


class _BrainMaskInputSpec(_QSMInputSpec):
    magnitude_file = File(exists=True, mandatory=True, desc="4D magnitude")
    user_mask_file = File(exists=True, desc="a mask to use instead of computing one")
    echo_times_s = traits.List(traits.Float, desc="echo times (s): with 2 or more, the CSF rim is told by its R2*")
    field_strength_t = traits.Float(3.0, usedefault=True, desc="B0 (T), which R2* scales with")


class _BrainMaskOutputSpec(_QSMOutputSpec):
    mask_file = File(exists=True)


class BrainMask(_QSMInterface):
    """Brain mask from the root-sum-of-squares magnitude over echoes
    (:func:`~metaqsm_bids.steps.brain_mask.compute_brain_mask`), or a user's mask."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _compute(self):
        img = nib.load(self.inputs.magnitude_file)
        if isdefined(self.inputs.user_mask_file):
            user = nib.load(self.inputs.user_mask_file)
            if user.shape[:3] != img.shape[:3] or not np.allclose(user.affine, img.affine, atol=1e-3):
                raise ValueError(
                    f"{self.inputs.user_mask_file}: mask grid {user.shape[:3]} does not match "
                    f"{self.inputs.source_file} {img.shape[:3]} (shape and affine must agree)"
                )
            mask, provenance = user_brain_mask(user.dataobj, img.shape[:3], self.inputs.user_mask_file)
        else:
            _, magnitude = _load(self.inputs.magnitude_file)
            echo_times_s = _defined(self.inputs.echo_times_s) or []
            mask, provenance = compute_brain_mask(magnitude, _geometry(img)[0], echo_times_s,
                                                  self.inputs.field_strength_t,
                                                  axial_axis=physics.axial_axis(img.affine))
        self._results["mask_file"] = _save(mask, img, "brain_mask.nii", np.uint8)
        return provenance


class _TotalFieldInputSpec(_QSMInputSpec):
    magnitude_file = File(exists=True, mandatory=True, desc="4D magnitude")
    phase_file = File(exists=True, mandatory=True, desc="4D phase (rad)")
    echo_times_s = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    bipolar = _choice(DEFAULT_BIPOLAR, BIPOLAR_MODES,
                      desc="odd/even echo phase correction (metaqsm_bids.qsm.field.bipolar.correct_bipolar)")


class _TotalFieldOutputSpec(_QSMOutputSpec):
    field_file = File(exists=True, desc="total field (Hz)")
    magnitude_rss_file = File(exists=True, desc="root-sum-of-squares magnitude over echoes")
    residual_file = File(exists=True, desc="RMS phase residual of the echo fit (rad)")


class TotalField(_QSMInterface):
    """Multi-echo field map: unwrapping + weighted echo fit, phase offset at TE=0 removed
    (:func:`~metaqsm_bids.steps.total_field.estimate_total_field`).

    Also writes the root-sum-of-squares magnitude over echoes, the weight later steps take."""

    input_spec = _TotalFieldInputSpec
    output_spec = _TotalFieldOutputSpec

    def _compute(self):
        mag_img, magnitude = _load(self.inputs.magnitude_file)
        _, phase = _load(self.inputs.phase_file)
        maps = estimate_total_field(magnitude, phase, self.inputs.echo_times_s, _geometry(mag_img)[0],
                                    self.inputs.bipolar)
        self._results["field_file"] = _save(maps.field_hz, mag_img, "total_field_hz.nii")
        self._results["magnitude_rss_file"] = _save(maps.magnitude_rss, mag_img, "magnitude_rss.nii")
        self._results["residual_file"] = _save(maps.residual_rad, mag_img, "fit_residual_rad.nii")
        return maps.provenance  # a single echo's offset left in the field: said in the run's Warnings


class _R2StarMapInputSpec(_QSMInputSpec):
    magnitude_file = File(exists=True, mandatory=True, desc="4D magnitude (echo last)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask: R2* and T2* are 0 outside it")
    echo_times_s = traits.List(traits.Float, mandatory=True, minlen=2, desc="echo times (s), two or more")
    method = _choice(DEFAULT_R2STAR_METHOD, R2STAR_METHODS,
                     desc="fit of three or more echoes (metaqsm_bids.qsm.field.relaxometry)")


class _R2StarMapOutputSpec(_QSMOutputSpec):
    r2star_file = File(exists=True, desc="R2* (1/s)")
    t2star_file = File(exists=True, desc="T2* (s)")


class R2StarMap(_QSMInterface):
    """R2* (1/s) and T2* (s) maps of the multi-echo magnitude in the brain mask
    (:func:`~metaqsm_bids.steps.relaxometry.r2star_maps`). Needs two echoes or more: the workflow
    has no such node for a single echo."""

    input_spec = _R2StarMapInputSpec
    output_spec = _R2StarMapOutputSpec

    def _compute(self):
        img, magnitude = _load(self.inputs.magnitude_file)  # 4D: the node exists for two echoes or more
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        r2star, t2star, provenance = r2star_maps(magnitude, self.inputs.echo_times_s, mask, self.inputs.method)
        self._results["r2star_file"] = _save(r2star, img, "r2star_hz.nii")
        self._results["t2star_file"] = _save(t2star, img, "t2star_s.nii")
        return provenance


class _SWIInputSpec(_QSMInputSpec):
    magnitude_file = File(exists=True, mandatory=True, desc="root-sum-of-squares magnitude over echoes")
    local_field_file = File(exists=True, mandatory=True, desc="local field (Hz), 0 outside the QSM mask")
    echo_times_s = traits.List(traits.Float, mandatory=True, minlen=1, desc="echo times (s)")
    phase_sign = _choice(DEFAULT_SWI_PHASE_SIGN, SWI_PHASE_SIGNS,
                         desc="sign of the SWI phase the mask darkens (metaqsm_bids.qsm.field.swi)")
    slab_mm = traits.Float(MIP_SLAB_MM, usedefault=True, desc="thickness (mm) of the mIP's slab")


class _SWIOutputSpec(_QSMOutputSpec):
    swi_file = File(exists=True, desc="SWI (arbitrary units)")
    mip_file = File(exists=True, desc="minimum-intensity projection of the SWI (arbitrary units)")
    mip_parameters = traits.Dict(desc="the projection's slab (sidecar-ready)")


class SWI(_QSMInterface):
    """SWI of the RSS magnitude with the phase mask of the local field, and its minimum-intensity projection
    (:func:`~metaqsm_bids.qsm.field.swi.swi`)."""

    input_spec = _SWIInputSpec
    output_spec = _SWIOutputSpec

    def _compute(self):
        img, magnitude = _load(self.inputs.magnitude_file)
        _, local_hz = _load(self.inputs.local_field_file)
        voxel_size, _ = _geometry(img)
        result = swi(magnitude, local_hz, self.inputs.echo_times_s, voxel_size, phase_sign=self.inputs.phase_sign,
                     slab_mm=self.inputs.slab_mm)
        self._results["swi_file"] = _save(result.swi, img, "swi.nii")
        self._results["mip_file"] = _save(result.mip, img, "swi_mip.nii")
        self._results["mip_parameters"] = {**result.mip_parameters, "SlabThicknessRequestedMm": self.inputs.slab_mm}
        return dict(result.swi_parameters)


class _ChiReferenceInputSpec(_QSMInputSpec):
    chimap_file = File(exists=True, mandatory=True, desc="susceptibility (ppm) from the inversion")
    mask_file = File(exists=True, mandatory=True, desc="the QSM mask")
    region = _choice(DEFAULT_REFERENCE, REFERENCE_CHOICES,
                     desc="reference region (metaqsm_bids.qsm.reference)")
    r2star_file = File(exists=True, desc="R2* (1/s): finds the ventricular CSF of region 'csf'")
    field_strength_t = traits.Float(3.0, usedefault=True, desc="B0 (T), which CSF's R2* threshold scales with")


class _ChiReferenceOutputSpec(_QSMOutputSpec):
    chimap_file = File(exists=True, desc="susceptibility (ppm) relative to the region")
    reference_mask_file = File(exists=True, desc="the region, when it is not the QSM mask itself (csf)")


class ChiReference(_QSMInterface):
    """The Chimap less its mean over the reference region
    (:func:`~metaqsm_bids.steps.reference.reference_susceptibility`): the QSM mask (``brain``), the ventricular
    CSF found from the R2* map (``csf``) or none."""

    input_spec = _ChiReferenceInputSpec
    output_spec = _ChiReferenceOutputSpec

    def _compute(self):
        img, chi = _load(self.inputs.chimap_file)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        r2star = _load(self.inputs.r2star_file)[1] if isdefined(self.inputs.r2star_file) else None
        chi, reference, provenance = reference_susceptibility(chi, mask, self.inputs.field_strength_t,
                                                              self.inputs.region, r2star_hz=r2star,
                                                              voxel_size_mm=_geometry(img)[0])
        self._results["chimap_file"] = _save(chi, img, "chimap_referenced_ppm.nii")
        if self.inputs.region == "csf":
            self._results["reference_mask_file"] = _save(reference, img, "reference_mask.nii", np.uint8)
        return provenance


class _BackgroundRemovalInputSpec(_QSMInputSpec):
    field_file = File(exists=True, mandatory=True, desc="total field (Hz)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    magnitude_file = File(exists=True, mandatory=True,
                          desc="RSS magnitude: the reliability test, and the weight of methods that use one (PDF)")
    residual_file = File(exists=True, desc="echo-fit residual (rad), for the reliability test")
    field_strength_t = traits.Float(mandatory=True, desc="B0 (T), for the methods whose spec takes it (TFI)")
    method = traits.Str(mandatory=True, desc="background field removal method "
                                             "(metaqsm_bids.qsm.background.registry.BACKGROUND_REMOVALS)")
    parameters = traits.Dict(desc="the method's parameters (its spec's defaults for what it lacks)")


class _BackgroundRemovalOutputSpec(_QSMOutputSpec):
    local_field_file = File(exists=True, desc="local field (Hz) on the QSM mask")
    mask_file = File(exists=True, desc="the QSM mask: where the local field and the susceptibility are defined")
    reliable_mask_file = File(exists=True, desc="the brain mask's voxels that passed the reliability test")


class BackgroundRemoval(_QSMInterface):
    """Total field -> local field on the QSM mask (:func:`~metaqsm_bids.steps.local_field.estimate_local_field`):
    background removal by the chosen method fitted on the reliable voxels
    (:mod:`metaqsm_bids.qsm.field.reliability`, written as the reliability map), the unreliable voxels'
    local field completed from the rest."""

    input_spec = _BackgroundRemovalInputSpec
    output_spec = _BackgroundRemovalOutputSpec

    def _compute(self):
        img, field_hz = _load(self.inputs.field_file)
        brain = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        voxel_size, b0_dir = _geometry(img)
        _, rss = _load(self.inputs.magnitude_file)
        residual = _load(self.inputs.residual_file)[1] if isdefined(self.inputs.residual_file) else None
        out = estimate_local_field(self.inputs.method, field_hz, brain, rss, voxel_size, b0_dir,
                                   parameters=_defined(self.inputs.parameters),
                                   reliability=reliability_map(brain, rss, residual),
                                   b0_tesla=self.inputs.field_strength_t)
        self._results["local_field_file"] = _save(out.local_field, img, "local_field_hz.nii")
        self._results["mask_file"] = _save(out.qsm_mask, img, "qsm_mask.nii", np.uint8)
        self._results["reliable_mask_file"] = _save(out.reliable, img, "reliable_mask.nii", np.uint8)
        return {**out.provenance, "Units": "Hz"}


class _DipoleInversionInputSpec(_QSMInputSpec):
    local_field_file = File(exists=True, mandatory=True, desc="local field (Hz)")
    mask_file = File(exists=True, mandatory=True, desc="mask where the local field is valid")
    magnitude_file = File(exists=True, desc="RSS magnitude, for the methods whose spec takes it (MEDI, the networks)")
    echo_times_s = traits.List(traits.Float, desc="echo times (s), for the methods whose spec takes their spacing "
                                                  "(MEDI's noise scaling)")
    field_strength_t = traits.Float(mandatory=True, desc="B0 (T)")
    method = traits.Str(mandatory=True, desc="dipole inversion method (metaqsm_bids.qsm.inversion.registry.INVERSIONS)")
    parameters = traits.Dict(desc="the method's parameters (its spec's defaults for what it lacks)")
    device = _choice(DEFAULT_DEVICE, DEVICE_CHOICES,
                     desc="torch device; 'auto' is resolved on the machine that runs the node")


class _DipoleInversionOutputSpec(_QSMOutputSpec):
    chimap_file = File(exists=True, desc="susceptibility (ppm)")


class DipoleInversion(_QSMInterface):
    """Local field (Hz) -> susceptibility (ppm) with the chosen method
    (:func:`~metaqsm_bids.steps.inversion.invert_local_field`); the networks run on ``device``."""

    input_spec = _DipoleInversionInputSpec
    output_spec = _DipoleInversionOutputSpec

    def _compute(self):
        img, local_hz = _load(self.inputs.local_field_file)
        voxel_size, b0_dir = _geometry(img)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        magnitude = _load(self.inputs.magnitude_file)[1] if isdefined(self.inputs.magnitude_file) else None
        chi, provenance = invert_local_field(
            self.inputs.method, local_hz, mask, voxel_size, b0_dir, self.inputs.field_strength_t,
            parameters=_defined(self.inputs.parameters), magnitude=magnitude,
            echo_times_s=_defined(self.inputs.echo_times_s), device=self.inputs.device)
        self._results["chimap_file"] = _save(chi, img, "chimap_ppm.nii")
        return provenance
