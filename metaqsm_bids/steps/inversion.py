"""The pipeline's inversion step, shared by the CLI's interface and the benchmarks: local field (Hz) ->
susceptibility (ppm) by a registered dipole inversion, given the inputs its spec names
(:data:`metaqsm_bids.qsm.spec.INPUTS`), with the provenance its sidecar records."""
import numpy as np

from ..qsm.core import physics
from ..qsm.inversion.registry import INVERSIONS, invert
from ..qsm.spec import lookup


def echo_spacing_s(echo_times_s):
    """The echo spacing (s) of the field fit: the mean spacing of the echoes, or the echo time of a single echo."""
    echo_times_s = list(echo_times_s or ())
    if not echo_times_s:
        raise ValueError("no echo times: the echo spacing is unknown")
    return float(np.diff(echo_times_s).mean()) if len(echo_times_s) > 1 else float(echo_times_s[0])


def invert_local_field(method, local_field_hz, mask, voxel_size_mm, b0_dir, b0_tesla, *, parameters=None,
                       magnitude=None, echo_times_s=None, device="auto", options=None):
    """``(chi, provenance)``: the susceptibility (float32, ppm, 0 outside ``mask``, mean 0 inside) of the local
    field (Hz) by the registered ``method``, and what its sidecar records.

    ``parameters``: the method's settings (a dict; its spec's defaults for what it lacks); ``b0_tesla`` (T)
    converts Hz to ppm; ``magnitude`` (the RSS magnitude over echoes), ``echo_times_s`` (s) and ``device`` go to
    the methods whose spec takes them (the echo times as their spacing). ``options``: further keyword arguments of
    the method's function, outside its spec (the benchmarks' candidate network ``model``). ``provenance``:
    ``Method`` (the display name), the parameters (BIDS-style keys), the method's diagnostics (a network's model
    among them), the geometry and ``Units``.
    """
    spec = lookup(INVERSIONS, method, "dipole inversion")
    settings = spec.settings(parameters)
    available = {"magnitude": magnitude, "b0_tesla": b0_tesla, "device": device,
                 "delta_te_s": echo_spacing_s(echo_times_s) if "delta_te_s" in spec.inputs else None}
    info = {}
    chi = invert(method, physics.field_hz_to_ppm(local_field_hz, b0_tesla), mask, voxel_size_mm, b0_dir, info=info,
                 **vars(settings), **spec.keyword_inputs(available), **(options or {}))
    return chi, {
        **spec.sidecar(settings),
        **info,
        "B0DirectionVoxel": [round(float(v), 6) for v in b0_dir],
        "VoxelSizeMm": [round(float(v), 6) for v in voxel_size_mm],
        "MagneticFieldStrength": b0_tesla,
        "Units": "ppm",
    }
