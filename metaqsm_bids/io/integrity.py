"""Reading every input image in full before any step runs.

A truncated or corrupt ``.nii.gz``, a NaN in a phase image or a magnitude that is zero
everywhere would otherwise surface deep inside a nipype node. Here each file is read once:
gzip files are decompressed as one whole stream (so a truncated file or a bad CRC is caught
even where the image data end before the damage), the NIfTI header and data are parsed from
the result, and the values are checked. Results are cached by (path, size, mtime), so the
input validation and the participant level share one read per file.
"""
import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

#: (path, size, mtime_ns) -> error message, or None when the file is fine.
_CHECKED = {}


def _read(path):
    """The image in ``path`` with its data in memory; raises ValueError with what is wrong."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with open(path, "rb") as f:
                raw = gzip.decompress(f.read())
            img = nib.Nifti1Image.from_bytes(raw) if raw[344:348] in (b"n+1\0", b"ni1\0") \
                else nib.Nifti2Image.from_bytes(raw)
        else:
            img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"the gzip stream is truncated or corrupt ({type(err).__name__}: {err}); "
                         "the file is damaged, copy or convert it again") from err
    except (OSError, ValueError, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as err:
        raise ValueError(f"not a readable NIfTI image ({type(err).__name__}: {err})") from err
    return img, data


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
