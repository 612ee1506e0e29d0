"""The CLI's participant run in this process: the same step functions, in the same order, with the same defaults as
the nodes of :func:`metaqsm_bids.workflows.qsm.init_qsm_wf` (each node loads its inputs, calls one of these steps
and saves its result), without nipype, files or a work directory.

phase scaling (:mod:`~metaqsm_bids.steps.phase`) -> brain mask (:mod:`~metaqsm_bids.steps.brain_mask`) -> total
field (:mod:`~metaqsm_bids.steps.total_field`) -> reliability map and background removal
(:mod:`~metaqsm_bids.steps.local_field`) -> dipole inversion (:mod:`~metaqsm_bids.steps.inversion`) -> R2*/T2*
with two echoes or more (:mod:`~metaqsm_bids.steps.relaxometry`) -> susceptibility reference
(:mod:`~metaqsm_bids.steps.reference`).

Every map the CLI passes from one node to the next through a float32 (masks: uint8) NIfTI file is float32 (masks:
bool) here too, so both give the same numbers (``tests/test_inprocess_pipeline.py`` compares them to the last
digit). The benchmarks run it through :func:`local_field_maps` and :func:`susceptibility`.
"""
from dataclasses import dataclass, field, replace

import nibabel as nib
import numpy as np

from ..qsm.background.registry import DEFAULT_BACKGROUND_REMOVAL
from ..qsm.core import physics
from ..qsm.field.bipolar import DEFAULT_BIPOLAR
from ..qsm.field.relaxometry import DEFAULT_METHOD as DEFAULT_R2STAR_METHOD
from ..qsm.inversion.registry import DEFAULT_INVERSION
from ..qsm.network.device import DEFAULT_DEVICE
from ..qsm.reference import DEFAULT_REFERENCE
from .brain_mask import compute_brain_mask, user_brain_mask
from .inversion import invert_local_field
from .local_field import estimate_local_field, reliability_map
from .phase import scale_phase
from .reference import reference_susceptibility
from .relaxometry import r2star_maps
from .total_field import estimate_total_field


@dataclass
class Reconstruction:
    """What :func:`reconstruct` gives: the Chimap (ppm, float32, referenced as asked) and the maps of the steps
    before it, as the CLI writes them (float32 maps, bool masks; None where the run has none), each step's
    provenance under the key its sidecars use (``PhaseScaling``, ``BrainMask``, ``TotalField``, ``Reliability``,
    ``BackgroundFieldRemoval``, ``R2starFit``, ``DipoleInversion``, ``SusceptibilityReference``; no
    ``ElapsedSeconds``, which the interfaces add), and the acquisition the later steps take. :func:`local_field_maps`
    fills it up to the local field (``chimap`` None), :func:`susceptibility` the rest."""

    echo_times_s: list
    affine: np.ndarray
    b0_tesla: float
    magnitude: np.ndarray
    phase_rad: np.ndarray
    brain_mask: np.ndarray
    total_field_hz: np.ndarray
    magnitude_rss: np.ndarray
    fit_residual_rad: np.ndarray
    reliable_mask: np.ndarray
    qsm_mask: np.ndarray
    local_field_hz: np.ndarray
    r2star_hz: np.ndarray = None
    t2star_s: np.ndarray = None
    chimap_unreferenced: np.ndarray = None
    chimap: np.ndarray = None
    reference_mask: np.ndarray = None
    provenance: dict = field(default_factory=dict)

    @property
    def voxel_size_mm(self):
        return physics.voxel_size_mm(self.affine)

    @property
    def b0_dir(self):
        return physics.b0_direction_voxel(self.affine)


def _echo_volumes(images):
    """One 3D array per echo of a list of 3D (or 4D, echo last) arrays, or of one 4D array (echo last)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = [images]
    volumes = []
    for image in images:
        image = np.asarray(image)
        volumes += [image[..., n] for n in range(image.shape[3])] if image.ndim == 4 else [image]
    return volumes


def run_inputs(run):
    """The raw inputs of :func:`reconstruct` (a dict of its keyword arguments) for a
    :class:`~metaqsm_bids.io.inputs.MEGRERun` stored as magnitude and phase: its files' data as the CLI's phase
    scaling reads them, its echo times, the first magnitude file's affine, its B0 and its phase units and sign."""
    if not run.magnitude_files:
        raise ValueError(f"{run.name}: stored as real and imaginary parts; the in-process pipeline takes magnitude "
                         "and phase")

    def load(files):
        return [np.asarray(nib.load(path).dataobj) for path in files]

    sign = run.phase_sign
    return dict(magnitudes=load(run.magnitude_files), phases=load(run.phase_files),
                echo_times_s=list(run.echo_times_s), affine=nib.load(run.magnitude_files[0]).affine,
                b0_tesla=run.field_strength_t, phase_units=run.phase_units, phase_sign=sign.factor if sign else 1,
                phase_sign_provenance=sign.provenance() if sign else {})


def local_field_maps(magnitudes, phases, echo_times_s, affine, b0_tesla, *, phase_units=None, phase_sign=1,
                     phase_sign_provenance=None, brain_mask=None, bipolar=DEFAULT_BIPOLAR,
                     bfr=DEFAULT_BACKGROUND_REMOVAL, bfr_params=None, r2star_method=DEFAULT_R2STAR_METHOD):
    """The :class:`Reconstruction` of a run up to its local field (and its R2*/T2* maps): the steps before the
    inversion. The arguments are :func:`reconstruct`'s."""
    tes = list(echo_times_s)
    voxel_size, b0_dir = physics.voxel_size_mm(affine), physics.b0_direction_voxel(affine)
    echoes = scale_phase(_echo_volumes(magnitudes), _echo_volumes(phases), phase_units, phase_sign,
                         phase_sign_provenance)
    if len(tes) != echoes.magnitude.shape[-1]:
        raise ValueError(f"{echoes.magnitude.shape[-1]} echo volumes but {len(tes)} echo times")
    provenance = {"PhaseScaling": echoes.provenance}
    if brain_mask is None:
        mask, provenance["BrainMask"] = compute_brain_mask(echoes.magnitude, voxel_size, tes, b0_tesla,
                                                           axial_axis=physics.axial_axis(affine))
    else:
        mask, provenance["BrainMask"] = user_brain_mask(brain_mask, echoes.magnitude.shape[:3])
    maps = estimate_total_field(echoes.magnitude, echoes.phase_rad, tes, voxel_size, bipolar)
    provenance["TotalField"] = maps.provenance
    reliability = reliability_map(mask, maps.magnitude_rss, maps.residual_rad)
    provenance["Reliability"] = reliability.provenance
    local = estimate_local_field(bfr, maps.field_hz, mask, maps.magnitude_rss, voxel_size, b0_dir,
                                 parameters=bfr_params, reliability=reliability, b0_tesla=b0_tesla)
    provenance["BackgroundFieldRemoval"] = {**local.provenance, "Units": "Hz"}
    r2star = t2star = None
    if len(tes) > 1:  # as the workflow: one echo has no decay to fit
        r2star, t2star, provenance["R2starFit"] = r2star_maps(echoes.magnitude, tes, mask, r2star_method)
    return Reconstruction(
        echo_times_s=tes, affine=np.asarray(affine, float), b0_tesla=b0_tesla, magnitude=echoes.magnitude,
        phase_rad=echoes.phase_rad, brain_mask=mask, total_field_hz=maps.field_hz, magnitude_rss=maps.magnitude_rss,
        fit_residual_rad=maps.residual_rad, reliable_mask=local.reliable, qsm_mask=local.qsm_mask,
        local_field_hz=local.local_field, r2star_hz=r2star, t2star_s=t2star, provenance=provenance)


def susceptibility(maps, *, inversion=DEFAULT_INVERSION, inversion_params=None, reference=DEFAULT_REFERENCE,
                   device=DEFAULT_DEVICE, inversion_options=None):
    """``maps`` (:func:`local_field_maps`' :class:`Reconstruction`) with the steps after the local field done: the
    dipole inversion and the susceptibility reference (a new :class:`Reconstruction`; ``maps`` is left as it is).
    The arguments are :func:`reconstruct`'s."""
    provenance = dict(maps.provenance)
    chi, provenance["DipoleInversion"] = invert_local_field(
        inversion, maps.local_field_hz, maps.qsm_mask, maps.voxel_size_mm, maps.b0_dir, maps.b0_tesla,
        parameters=inversion_params, magnitude=maps.magnitude_rss, echo_times_s=maps.echo_times_s, device=device,
        options=inversion_options)
    referenced, region, provenance["SusceptibilityReference"] = reference_susceptibility(
        chi, maps.qsm_mask, maps.b0_tesla, reference, r2star_hz=maps.r2star_hz, voxel_size_mm=maps.voxel_size_mm)
    return replace(maps, chimap_unreferenced=chi, chimap=referenced,
                   reference_mask=region if reference == "csf" else None, provenance=provenance)


def reconstruct(magnitudes, phases, echo_times_s, affine, b0_tesla, *, phase_units=None, phase_sign=1,
                phase_sign_provenance=None, brain_mask=None, bipolar=DEFAULT_BIPOLAR,
                bfr=DEFAULT_BACKGROUND_REMOVAL, bfr_params=None, inversion=DEFAULT_INVERSION, inversion_params=None,
                reference=DEFAULT_REFERENCE, r2star_method=DEFAULT_R2STAR_METHOD, device=DEFAULT_DEVICE,
                inversion_options=None):
    """A run's :class:`Reconstruction`, as ``metaqsm ... participant`` computes it with the same settings.

    ``magnitudes``, ``phases``: the stored images, one 3D array per echo (or 4D, echo last), the phase as stored
    (``phase_units``: its sidecars' ``Units``, None to infer; ``phase_sign``: +1 keeps it, -1 negates it, as the
    CLI's ``--phase-sign`` resolved for the run: :attr:`metaqsm_bids.io.inputs.MEGRERun.phase_sign`);
    ``echo_times_s`` (s); ``affine``: the images' voxel-to-world affine (voxel size, B0 direction, axial axis);
    ``b0_tesla``: the B0 (T) that converts Hz to ppm.

    The settings are the CLI's options, with its defaults: ``brain_mask`` (``--brain-mask-dir``: a mask to use
    instead of computing one), ``bipolar``, ``bfr`` and ``bfr_params`` (the method's parameters by name; its spec's
    defaults for what they lack), ``inversion`` and ``inversion_params``, ``reference``, ``r2star_method``,
    ``device``. ``inversion_options``: further keyword arguments of the inversion's function (a benchmark's
    candidate network ``model``). :func:`local_field_maps` then :func:`susceptibility`, which a caller trying
    several inversions on one local field calls apart.
    """
    maps = local_field_maps(magnitudes, phases, echo_times_s, affine, b0_tesla, phase_units=phase_units,
                            phase_sign=phase_sign, phase_sign_provenance=phase_sign_provenance,
                            brain_mask=brain_mask, bipolar=bipolar, bfr=bfr, bfr_params=bfr_params,
                            r2star_method=r2star_method)
    return susceptibility(maps, inversion=inversion, inversion_params=inversion_params, reference=reference,
                          device=device, inversion_options=inversion_options)
