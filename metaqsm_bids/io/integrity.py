"""Reading every input image of the participants being run in full before any step runs.

A truncated or corrupt ``.nii.gz``, a NaN in a phase image or a magnitude that is zero
everywhere would otherwise surface deep inside a nipype node. Here each file is read once:
gzip files are decompressed as one whole stream (so a truncated file or a bad CRC is caught
even where the image data end before the damage), the NIfTI header and data are parsed from
the result, and the values are checked. Results are cached by (path, size, mtime), so the
input validation and the participant level share one read per file. Only the selected participants'
runs are checked (:func:`metaqsm_bids.io.inputs.index_dataset` indexes those alone), so a one-participant
task of a large study reads one participant's images.
"""
import gzip
import io
import logging
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

#: (path, size, mtime_ns) -> error message, or None when the file is fine.
_CHECKED = {}
#: Where nibabel's header fixes are told while checking (the check says what is wrong instead).
_QUIET = logging.getLogger("metaqsm.integrity.nibabel")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
#: Largest difference (mm) between two affines that still counts as the same grid (also between files of a run).
AFFINE_ATOL_MM = 1e-3


def _nifti_class(raw):
    """nibabel's image class for the bytes of a NIfTI file (NIfTI-1 magic at byte 344, else NIfTI-2)."""
    return nib.Nifti1Image if raw[344:348] in (b"n+1\0", b"ni1\0") else nib.Nifti2Image


def _unreadable(err):
    """The ValueError that says why nibabel or gzip could not read a file."""
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)):
        return ValueError(f"the gzip stream is truncated or corrupt ({type(err).__name__}: {err}); "
                          "the file is damaged, copy or convert it again")
    return ValueError(f"not a readable NIfTI image ({type(err).__name__}: {err})")


_READ_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError, nib.filebasedimages.ImageFileError,
                nib.spatialimages.HeaderDataError)


def _read(path):
    """The image in ``path`` with its data in memory; raises ValueError with what is wrong."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with open(path, "rb") as f:
                raw = gzip.decompress(f.read())
            img = _nifti_class(raw).from_bytes(raw)
        else:
            img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        raise _unreadable(err) from err
    return img, data


def _affine_text(header, form):
    code = int(header[f"{form}_code"])
    return f"the {form} (code {code})" if code else "the voxel sizes alone (no qform or sform code)"


def check_header(path):
    """The grid of ``path`` as metaqsm uses it: nibabel's affine (the sform if its code is set, else the
    qform, else the voxel sizes alone), checked from the header as stored, before nibabel's fixes.

    Returns ``(affine, warning)``; ``warning`` (naming ``path``) says which transform is used when the
    sform and qform disagree, else None. Raises ValueError (message starting with ``path``) for a zero
    or non-finite voxel size (pixdim), or a used affine that is not finite or is singular.
    """
    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read(540)  # a NIfTI-2 header; NIfTI-1 uses the first 348 bytes
        header = _nifti_class(raw).header_class.from_fileobj(io.BytesIO(raw), check=False)
    except _READ_ERRORS as err:
        raise ValueError(f"{path}: {_unreadable(err)}") from err
    pixdim = np.asarray(header["pixdim"][1:4], dtype=float)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
        sizes = " x ".join(f"{v:g}" for v in pixdim)
        raise ValueError(f"{path}: voxel size {sizes} mm in the header (pixdim[1:4]): a voxel size must be finite "
                         "and non-zero; the header is damaged, convert the data again")
    fixed = header.copy()
    fixed.check_fix(logger=_QUIET, error_level=logging.CRITICAL + 1)  # as nibabel loads it, silently
    try:
        affine = fixed.get_best_affine()
    except nib.spatialimages.HeaderDataError as err:
        raise ValueError(f"{path}: {_unreadable(err)}") from err
    what = _affine_text(fixed, "sform" if fixed["sform_code"] else "qform")  # qform code 0: the voxel sizes alone
    if not np.all(np.isfinite(affine)):
        raise ValueError(f"{path}: the voxel-to-world affine from {what} holds NaN or infinite values; "
                         "the header is damaged, convert the data again")
    columns = np.linalg.norm(affine[:3, :3], axis=0)
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * np.prod(columns):
        raise ValueError(f"{path}: the voxel-to-world affine from {what} is singular (its voxel axes do not span "
                         "3D space); the header is damaged, convert the data again")
    warning = None
    if fixed["sform_code"] and fixed["qform_code"]:
        other = fixed.get_qform()
        if not np.allclose(other, affine, atol=AFFINE_ATOL_MM, equal_nan=False):
            differ = (f"(largest element difference {np.abs(other - affine).max():.3g})" if np.all(np.isfinite(other))
                      else "(the qform is not finite)")
            warning = (f"{path}: the sform and qform of the header disagree {differ}; metaqsm uses "
                       f"{_affine_text(fixed, 'sform')}, as nibabel does, for every derivative's grid")
    return affine, warning


def check_image(path, magnitude=False):
    """Raise ValueError (message starting with ``path``) if the image cannot be read in full or its values
    cannot be used: NaN or infinite voxels, or (``magnitude``) no voxel above zero."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns, magnitude)
    if key not in _CHECKED:
        message = None
        try:
            _, data = _read(path)
            if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
                bad = int((~np.isfinite(data)).sum())
                if bad:
                    message = f"{bad} voxels are NaN or infinite"
            if message is None and magnitude and not (data > 0).any():
                message = "the magnitude is zero in every voxel (no signal to mask or to weight the fit)"
        except ValueError as err:
            message = str(err)
        _CHECKED[key] = message
    if _CHECKED[key]:
        raise ValueError(f"{path}: {_CHECKED[key]}")
