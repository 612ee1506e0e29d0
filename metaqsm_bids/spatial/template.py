"""Template-space outputs: register the magnitude to a templateflow template with ANTs, resample the maps.

The brain-masked RSS magnitude is registered to the template's brain-masked T1w with ANTs
(antspyx, ``antsRegistrationSyNQuick``): rigid then affine stages with Mattes mutual information
(the contrasts differ: GRE magnitude vs T1w), and optionally a SyN stage. Affine is the default:
on a 256x256x64 magnitude it takes ~14 s on 2 cores against ~25 s with SyN (benchmarks in the
closing report of issue 6), QSM group studies mostly average over regions, and a deformable
fit of GRE magnitude to a T1w template is less reliable than a T1w-to-T1w one. One registration
per template (on its coarsest requested grid) serves all its resolutions; it is a function of its own
(:func:`register_to_template`), apart from the writing (:func:`write_template_outputs`), so that a
pipeline rerun reuses a cached registration yet rewrites the outputs. The Chimap is
resampled with linear interpolation, masks with nearest neighbour, all through one transform,
and written with fMRIPrep-style names from the output spec (:mod:`metaqsm_bids.io.outputs`):
``<run>_space-<template>_res-<n>[_desc-<d>]_<suffix>.nii.gz`` and
``<run>_from-orig_to-<template>_mode-image_xfm.{mat,h5}`` (ITK affine, or a composite HDF5
transform with SyN), each with a JSON sidecar.

Templates come from templateflow (``TEMPLATEFLOW_HOME``); nothing is downloaded when the files are
there, so containers fetch them at build time and runs work offline.
"""
import json
import re
import shutil
import tempfile
import time
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io.derivatives import atomic_write, bids_uri, software_versions, write_json, write_nifti
from ..io.outputs import INTERPOLATIONS, OUTPUTS, output_path, sidecar_path
from ..io.validation import ensure_bidsignore

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"
#: Below this Dice overlap of the registered and template brain masks, the registration is flagged.
#: Affine registrations of adult brains reach 0.9-0.95; the simulated adult phantom, whose brain is
#: not anatomical, reaches 0.87.
MIN_BRAIN_DICE = 0.8
#: Fixed seed of the metric sampling: with one thread (``--omp-nthreads 1``) a rerun gives the same transform; with
#: more, ITK's parallel sums may differ in their last bits from run to run, and the optimiser's path with them (the
#: template test's registered magnitude: correlation with the T1w 0.256-0.27 over runs with two threads, 0.291 with
#: one).
SEED = 42


def parse_output_space(spec):
    """``"MNI152NLin2009cAsym:res-2"`` -> ``("MNI152NLin2009cAsym", 2)``; ``"orig"`` -> ``("orig", None)``.

    A template without ``:res-N`` gets resolution 2. Raises ValueError on anything else.
    """
    match = re.fullmatch(r"([A-Za-z0-9]+)(?::res-0*(\d+))?", str(spec))
    if not match:
        raise ValueError(f"output space {spec!r}: expected 'orig' or a templateflow name such as "
                         "'MNI152NLin2009cAsym' or 'MNI152NLin2009cAsym:res-2'")
    name, resolution = match.groups()
    if name == "orig":
        if resolution:
            raise ValueError(f"output space {spec!r}: 'orig' takes no resolution")
        return "orig", None
    return name, int(resolution) if resolution else 2


def template_files(template, resolution):
    """Paths of the template's T1w and brain mask (None if it has none) at ``resolution`` from templateflow.

    Fetches missing files when templateflow can reach its archive. Raises ValueError naming the
    template and TEMPLATEFLOW_HOME when the T1w (or a brain mask the template has) cannot be had.
    """
    from templateflow import api, conf

    def get(**query):
        found = api.get(template, resolution=resolution, extension=".nii.gz", raise_empty=False, **query)
        found = found if isinstance(found, list) else [found]
        return Path(found[0]) if len(found) == 1 else None

    fetch = (f"fetch it beforehand (python -c \"from templateflow.api import get; "
             f"get('{template}', resolution={resolution}, suffix='T1w', desc=None); "
             f"get('{template}', resolution={resolution}, suffix='mask', desc='brain')\") or set TEMPLATEFLOW_HOME")
    try:
        t1w = get(suffix="T1w", desc=None)
        mask = get(suffix="mask", desc="brain")
    except Exception as err:  # templateflow raises several types when it cannot reach or index the archive
        raise ValueError(f"template {template} res-{resolution}: templateflow failed ({err}); "
                         f"TEMPLATEFLOW_HOME={conf.TF_HOME}; {fetch}") from err
    if t1w is None or not t1w.exists() or t1w.stat().st_size == 0:
        raise ValueError(f"template {template} res-{resolution}: no T1w in TEMPLATEFLOW_HOME={conf.TF_HOME}; "
                         f"{fetch}")
    return {"T1w": t1w, "brain_mask": mask if mask is not None and mask.exists() else None}


def check_output_spaces(spaces):
    """Fail before processing: template ``spaces`` ``[(template, resolution)]`` need antspyx, templateflow
    and the template files (fetched here when templateflow can reach its archive).

    Raises ValueError naming ``pip install 'metaqsm[templates]'``, or the template and TEMPLATEFLOW_HOME.
    """
    problems = []
    for package, module in (("antspyx", "ants"), ("templateflow", "templateflow")):
        try:
            import_module(module)
        except ImportError as err:
            problems.append(f"{package} ({err})")
    if problems:
        raise ValueError(f"template output spaces need {' and '.join(problems)}: pip install 'metaqsm[templates]'")
    for template, resolution in spaces:
        template_files(template, resolution)


def _source_uri(path, out_dir):
    path, out_dir = Path(path).resolve(), Path(out_dir).resolve()
    return bids_uri("", path.relative_to(out_dir)) if path.is_relative_to(out_dir) else path.as_uri()


def _ants_image(path, mask_path=None):
    import ants

    image = ants.image_read(str(path), pixeltype="float")
    if mask_path is not None:
        mask = ants.image_read(str(mask_path), pixeltype="float").numpy() > 0
        if mask.shape != image.shape:
            raise ValueError(f"{mask_path}: shape {mask.shape} differs from {Path(path).name} {image.shape}")
        image = image.new_image_like(image.numpy() * mask)
    return image


def register(magnitude_file, template_t1w, brain_mask_file=None, template_mask=None, nonlinear=False,
             work_dir=None):
    """Register the magnitude to the template T1w with ANTs; returns ``(transform_path, info)``.

    With ``brain_mask_file`` (and a template brain mask) both images are brain-masked first.
    ``info`` records the stages, metric, seed, elapsed seconds and, with both masks, the Dice
    overlap of the registered brain mask with the template's (a contrast-independent check;
    ``Warnings`` holds a message when it is below :data:`MIN_BRAIN_DICE`).
    """
    import ants

    masked = brain_mask_file is not None and template_mask is not None  # both images masked, or neither
    fixed = _ants_image(template_t1w, template_mask if masked else None)
    moving = _ants_image(magnitude_file, brain_mask_file if masked else None)
    if not np.isfinite(moving.numpy()).all() or not moving.numpy().any():
        raise ValueError(f"{magnitude_file}: the magnitude is empty or not finite inside the mask; cannot register")
    kind = "antsRegistrationSyNQuick[s]" if nonlinear else "antsRegistrationSyNQuick[a]"
    ants.config.set_ants_deterministic(on=False, seed_value=SEED)  # a seed without forcing one thread
    start = time.perf_counter()
    initial, initialisation = None, "centres of mass of the intensities aligned"
    if masked:
        initial, scale = _mask_initialiser(brain_mask_file, template_mask, work_dir)
        initialisation = f"brain-mask centroids aligned, isotropic scale {1 / scale:.3f} from the mask volumes"
    result = ants.registration(fixed, moving, kind, initial_transform=initial, outprefix=str(Path(work_dir) / "reg_"),
                               write_composite_transform=nonlinear)
    elapsed = time.perf_counter() - start
    # one collapsed affine (.mat), or one composite (.h5) that antspyx returns as a bare string
    forward = result["fwdtransforms"]
    forward = Path(forward if isinstance(forward, str) else forward[0])
    info = {
        "Software": f"ANTs via antspyx {_version('antspyx')}",
        "Type": kind,
        "Stages": ["Rigid", "Affine", "SyN"] if nonlinear else ["Rigid", "Affine"],
        "Metric": "Mattes mutual information (32 bins, regular sampling of 25%)"
                  + ("; SyN: mutual information" if nonlinear else ""),
        "Initialisation": initialisation,
        "BrainMasked": masked,
        "RandomSeed": SEED,
        "ElapsedSeconds": round(elapsed, 3),
    }
    if masked:
        warped = ants.apply_transforms(fixed, ants.image_read(str(brain_mask_file), pixeltype="float"),
                                       [str(forward)], interpolator="nearestNeighbor").numpy() > 0.5
        target = ants.image_read(str(template_mask), pixeltype="float").numpy() > 0
        dice = 2 * float((warped & target).sum()) / max(float(warped.sum() + target.sum()), 1.0)
        info["BrainMaskDice"] = round(dice, 4)
        if dice < MIN_BRAIN_DICE:
            info["Warnings"] = [f"the registered brain mask overlaps the template's by Dice {dice:.2f} "
                                f"(< {MIN_BRAIN_DICE}): check the registration before using template-space maps"]
    return forward, info


def _mask_initialiser(brain_mask_file, template_mask, work_dir):
    """Initial ITK affine: brain-mask centroids matched and an isotropic scale from the mask volumes.

    The rigid stage cannot change size, so a brain far from the template's (children, or the
    demo phantom shrunk to fit its field of view) would otherwise start it in a wrong minimum.
    Returns ``([transform path], scale)`` with ``scale`` = (subject / template brain volume)^(1/3).
    """
    import ants

    def centroid_and_volume(path):
        image = ants.image_read(str(path), pixeltype="float")
        mask = image.numpy() > 0
        if not mask.any():
            raise ValueError(f"{path}: the mask is empty")
        spacing = np.asarray(image.spacing)
        centre = np.asarray(image.origin) + np.asarray(image.direction) @ (np.argwhere(mask).mean(axis=0) * spacing)
        return centre, mask.sum() * np.prod(spacing)

    subject_centre, subject_volume = centroid_and_volume(brain_mask_file)
    template_centre, template_volume = centroid_and_volume(template_mask)
    scale = float((subject_volume / template_volume) ** (1 / 3))
    # ITK transforms map fixed (template) points to moving (subject) points
    transform = ants.create_ants_transform(transform_type="AffineTransform", dimension=3, matrix=np.eye(3) * scale,
                                           center=template_centre.tolist(),
                                           translation=(subject_centre - template_centre).tolist())
    path = Path(work_dir) / "initial.mat"
    ants.write_transform(transform, str(path))
    return [str(path)], scale


def _version(package):
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _check_images(images):
    for kind in images:
        if kind not in OUTPUTS or OUTPUTS[kind].extension != ".nii.gz":
            raise ValueError(f"image kind {kind!r}: expected one of the derivative images "
                             f"{sorted(k for k, o in OUTPUTS.items() if o.extension == '.nii.gz')}")


def _resolutions(resolutions):
    resolutions = list(dict.fromkeys(int(r) for r in resolutions))
    if not resolutions:
        raise ValueError("no template resolution given")
    return resolutions


def register_to_template(magnitude_file, work_dir, template=DEFAULT_TEMPLATE, resolutions=(2,), brain_mask_file=None,
                         nonlinear=False):
    """Register ``magnitude_file`` to ``template`` once, on the T1w of the coarsest of ``resolutions``.

    The expensive half of :func:`to_template`, apart so that a pipeline can cache it while the
    outputs are rewritten (:func:`write_template_outputs`). The coarsest grid (largest voxels) is
    the fastest, and an ITK transform maps physical points, so it serves every grid of the template.
    The transform (and ANTs' intermediate files) go to ``work_dir``, which must outlive the writing.
    Returns ``(transform path, info)``: :func:`register`'s info plus ``FixedImage``.
    """
    files = {resolution: template_files(template, resolution) for resolution in _resolutions(resolutions)}
    coarsest = max(files, key=lambda r: np.prod(nib.load(str(files[r]["T1w"])).header.get_zooms()[:3]))
    transform, info = register(magnitude_file, files[coarsest]["T1w"], brain_mask_file, files[coarsest]["brain_mask"],
                               nonlinear, work_dir)
    info["FixedImage"] = files[coarsest]["T1w"].name + (" (brain-masked)" if info["BrainMasked"] else "")
    return transform, info


def write_template_outputs(transform, registration, magnitude_file, images, out_dir, entities,
                           template=DEFAULT_TEMPLATE, resolutions=(2,), brain_mask_file=None):
    """Resample ``images`` through ``transform`` at each resolution; write them and the transform to ``out_dir``.

    The cheap half of :func:`to_template` (see there for the arguments), apart so that it can run on
    every pipeline run, restoring deleted outputs, while the registration stays cached.
    transform, registration: what :func:`register_to_template` returned for ``magnitude_file``
    (and ``brain_mask_file``, only named in the transform's sidecar here). The transform's
    sidecar's ``ElapsedSeconds`` is the registration's plus this writing's.
    Returns ``(transform path, {resolution: {kind: written NIfTI path}})``. Everything is computed
    before the first file is written, and each file is written atomically.
    """
    import ants

    start = time.perf_counter()
    out_dir, transform = Path(out_dir), Path(transform)
    resolutions = _resolutions(resolutions)
    _check_images(images)
    files = {resolution: template_files(template, resolution) for resolution in resolutions}
    grids = {resolution: nib.load(str(found["T1w"])) for resolution, found in files.items()}
    resampled = {}
    for resolution in resolutions:
        fixed = ants.image_read(str(files[resolution]["T1w"]), pixeltype="float")
        for kind, path in images.items():
            moving = ants.image_read(str(path), pixeltype="float")
            resampled[resolution, kind] = ants.apply_transforms(
                fixed, moving, [str(transform)], interpolator=INTERPOLATIONS[OUTPUTS[kind].interpolation]).numpy()
    xfm = output_path(out_dir, "transform", {**entities, "to": template}, transform.suffix)
    atomic_write(xfm, lambda tmp: shutil.copyfile(transform, tmp))
    info = {**registration, "MovingImage": _source_uri(magnitude_file, out_dir)}
    versions = f"{software_versions()}, antspyx {_version('antspyx')}, templateflow {_version('templateflow')}"
    written = {}
    for resolution in resolutions:
        zooms = " x ".join(f"{float(z):g}" for z in grids[resolution].header.get_zooms()[:3])
        resolution_text = {str(resolution): f"templateflow {template} res-{resolution}: {zooms} mm voxels"}
        for kind, path in images.items():
            data = resampled[resolution, kind]
            target = output_path(out_dir, kind, {**entities, "space": template, "res": resolution})
            if OUTPUTS[kind].mask:
                write_nifti(target, data > 0.5, grids[resolution].affine, dtype=np.uint8)
            else:
                write_nifti(target, data, grids[resolution].affine, dtype=np.float32)
            original = sidecar_path(path)
            kept = json.loads(original.read_text()) if original.exists() else {}
            sidecar = {k: v for k, v in kept.items() if k in ("Units", "SkullStripped", "Description", "Type")}
            sidecar.update(Resolution=resolution_text, Interpolation=OUTPUTS[kind].interpolation,
                           SoftwareVersions=versions,
                           Sources=[_source_uri(path, out_dir), bids_uri("", xfm.relative_to(out_dir))],
                           Registration={k: info[k] for k in ("Type", "Stages", "BrainMaskDice", "ElapsedSeconds")
                                         if k in info})
            if "Warnings" in info:
                sidecar["Warnings"] = info["Warnings"]
            write_json(sidecar_path(target), sidecar)
            written.setdefault(resolution, {})[kind] = target
    # written last: its total time covers the registration, the resampling and the writing
    write_json(sidecar_path(xfm), {
        "Description": f"Transform from the run's voxel grid (orig) to {template} (every resolution), "
                       "for antsApplyTransforms (ITK format).",
        "FromSpace": "orig", "ToSpace": template, "Registration": info,
        "Resolutions": resolutions,
        "Sources": [_source_uri(magnitude_file, out_dir)]
                   + ([_source_uri(brain_mask_file, out_dir)] if brain_mask_file is not None else []),
        "SoftwareVersions": versions,
        "ElapsedSeconds": round(info["ElapsedSeconds"] + time.perf_counter() - start, 3),
    })
    ensure_bidsignore(out_dir, OUTPUTS["transform"].bidsignore)
    return xfm, written


def to_template(magnitude_file, images, out_dir, entities, template=DEFAULT_TEMPLATE, resolutions=(2,),
                brain_mask_file=None, nonlinear=False):
    """Register ``magnitude_file`` to ``template`` once and write ``images`` resampled at each resolution.

    :func:`register_to_template` (in a temporary folder) then :func:`write_template_outputs`.
    images: derivative kind (a key of :data:`~metaqsm_bids.io.outputs.OUTPUTS`) -> NIfTI path, e.g.
    ``{"chimap": chi, "brain_mask": mask}``; each is named and interpolated (linear, or nearest neighbour
    for masks) as the output spec says.
    entities: the run's pybids entities (subject, session, acquisition, reconstruction, run).
    resolutions: templateflow resolution indices; the registration uses the T1w of the coarsest
    (largest voxels: fastest) and every resolution is resampled through that one transform
    (an ITK transform maps physical points, so it serves every grid of the template).
    brain_mask_file: the run's brain mask; registration then uses brain-masked images.
    Returns ``(transform path, {resolution: {kind: written NIfTI path}})``; every file has a JSON
    sidecar. Everything is computed before the first file is written, and each file is written
    atomically. Raises ValueError for unknown kinds and a missing template.
    """
    _check_images(images)  # before the registration, which takes seconds
    with tempfile.TemporaryDirectory() as work:
        transform, info = register_to_template(magnitude_file, work, template, resolutions, brain_mask_file, nonlinear)
        return write_template_outputs(transform, info, magnitude_file, images, out_dir, entities, template,
                                      resolutions, brain_mask_file)
