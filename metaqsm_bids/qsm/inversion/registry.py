"""Dipole inversion: local field (ppm) -> susceptibility (ppm).

Each method's module declares its :class:`~metaqsm_bids.qsm.spec.MethodSpec`; this registry lists them. A method
is called as ``f(local_field_ppm, mask, voxel_size_mm, b0_dir, **parameters, **inputs)`` with the inputs its spec
names, and returns only the susceptibility map (float32, ppm, zero outside ``mask``, mean 0 inside it: QSM is
relative because the dipole kernel vanishes at k = 0); the caller records the method and parameters it used.
"""
import inspect

from ..spec import lookup, registry
from . import ilsqr, l2, medi, metaqsm, tkd, tv

#: Dipole inversion specs by name: a new method is one module and one entry here.
INVERSIONS = registry(tkd.SPEC, l2.SPEC, tv.SPEC, ilsqr.SPEC, medi.SPEC, metaqsm.METAQSM_SPEC, metaqsm.MESAQSM_SPEC)
#: The methods that run a network (they take a torch ``device``).
NETWORK_INVERSIONS = tuple(name for name, spec in INVERSIONS.items() if "device" in spec.inputs)
#: The CLI's and the workflow's dipole inversion: the shipped Meta-QSM network.
DEFAULT_INVERSION = "metaqsm"


def invert(method, local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), info=None, **params):
    """Susceptibility (ppm) from the local field (ppm) by the registered ``method``.

    ``params``: the method's parameters and inputs, by keyword. ``info`` (a dict) receives the iterative methods'
    diagnostics (iterations, residuals) and the networks' model; closed-form methods leave it empty.
    """
    function = lookup(INVERSIONS, method, "dipole inversion").function
    if info is not None and "info" in inspect.signature(function).parameters:
        params["info"] = info
    return function(local_field_ppm, mask, voxel_size_mm, b0_dir, **params)
