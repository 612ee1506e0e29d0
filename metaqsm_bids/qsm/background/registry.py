"""Background field removal methods by name: total field -> local field (units preserved).

Every method has the signature ``f(total_field, mask, voxel_size_mm, b0_dir=..., **params)``
and returns a :class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval`. ``b0_dir`` (unit B0
vector in voxel axes) is accepted by all of them so callers can pass it uniformly; only
PDF uses it (SMV filtering of harmonic fields does not depend on B0).
"""
from .lbv import lbv
from .pdf import pdf
from .resharp import resharp
from .vsharp import vsharp


def _resharp(total_field, mask, voxel_size_mm, b0_dir=None, **params):
    """RESHARP (:func:`~metaqsm_bids.qsm.background.resharp.resharp`); ``b0_dir`` is unused."""
    return resharp(total_field, mask, voxel_size_mm, **params)


#: Background field removal methods by name.
BACKGROUND_REMOVALS = {"resharp": _resharp, "vsharp": vsharp, "pdf": pdf, "lbv": lbv}


def remove_background(method, total_field, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), **params):
    """Local field (same unit as ``total_field``) by the registered ``method``; a BackgroundRemoval."""
    try:
        function = BACKGROUND_REMOVALS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown background field removal {method!r}; choose one of: "
                         f"{', '.join(sorted(BACKGROUND_REMOVALS))}") from None
    return function(total_field, mask, voxel_size_mm, b0_dir=b0_dir, **params)
