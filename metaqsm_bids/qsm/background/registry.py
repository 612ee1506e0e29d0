"""Background field removal methods by name: total field -> local field (units preserved).

Each method's module declares its :class:`~metaqsm_bids.qsm.spec.MethodSpec` (``SPEC``); this registry lists
them. A method is called as ``f(total_field, mask, voxel_size_mm, **parameters, **inputs)`` with the inputs its
spec names (``b0_dir``, ``magnitude``, ``b0_tesla``) and returns a
:class:`~metaqsm_bids.qsm.background.common.BackgroundRemoval`.
"""
from ..spec import lookup, registry
from . import lbv, pdf, resharp, tfi, vsharp

#: Background field removal specs by name: a new method is one module and one entry here.
BACKGROUND_REMOVALS = registry(pdf.SPEC, resharp.SPEC, vsharp.SPEC, lbv.SPEC, tfi.SPEC)
#: The CLI's and the workflow's background field removal.
DEFAULT_BACKGROUND_REMOVAL = "tfi"


def remove_background(method, total_field, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), **params):
    """Local field (same unit as ``total_field``) by the registered ``method``; a BackgroundRemoval.

    ``b0_dir`` (unit B0 vector in voxel axes) goes to the methods whose spec takes it; ``params``: the method's
    parameters and its other inputs, by keyword.
    """
    spec = lookup(BACKGROUND_REMOVALS, method, "background field removal")
    inputs = {"b0_dir": b0_dir} if "b0_dir" in spec.inputs else {}
    return spec.function(total_field, mask, voxel_size_mm, **inputs, **params)
