#!/usr/bin/env python
"""Accuracy, speed and memory of every dipole inversion from the same local field, at four resolutions.

For each protocol a head phantom is simulated with ``metaqsm_bids.sim`` (multi-echo GRE, noise,
field computed on a 2x finer grid, 2nd-order shim, smooth phase offset), then, once:
the total field (``echofit.fit_total_field``) and the root-sum-of-squares magnitude over echoes
(for MEDI and PDF's weighting). Every background removal runs on the true brain mask and is
compared with the field of the true brain susceptibility (printed per protocol); the local field
of RESHARP (6 mm) is the one every inversion then starts from. Every inversion runs from that same
local field in its own forked process; the table gives qsm-ci's challenge metrics against the
true susceptibility (inside the RESHARP-eroded mask; NRMSE and HFEN in %, DGM linearity as
|1 - slope|, calcification streak), a 3D SSIM (Wang et al. 2004: Gaussian window of 1.5 voxels,
K = 0.01, 0.03, data range of the truth in the mask), wall seconds, the process's peak RSS
above its RSS at the start (GiB) and the iterations (``info`` of the method).

Usage: python benchmarks/bench_methods.py [--threads 2] [--protocols 0.76x0.76x3 ...] [--methods ...]
"""
import argparse
import ctypes
import json
import os
import time

import numpy as np
import scipy.fft as sfft
from qsm_ci.qsm_eval import challenge_metrics
from scipy import ndimage

from metaqsm_bids.qsm.core import dipole, physics
from metaqsm_bids.qsm.field.echofit import fit_total_field
from metaqsm_bids.qsm.inversion.registry import NETWORK_INVERSIONS
from metaqsm_bids.sim import phantom as ph
from metaqsm_bids.steps.inversion import invert_local_field
from metaqsm_bids.steps.local_field import remove_background_field

B0_TESLA = 3.0
CLINICAL_TES = tuple(round(0.0126 + 0.0041 * n, 4) for n in range(7))
RESEARCH_TES = (0.004, 0.008, 0.012, 0.016, 0.020)


def _tilt_about_i(degrees):
    """Voxel-to-world rotation of a slab tilted by ``degrees`` about the first (left-right) axis."""
    a = np.radians(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


#: name -> (shape, voxel size mm, echo times s, voxel-to-world rotation). The clinical protocol has the
#: full 256x256x64 size (MEDI and iLSQR must finish it in < 60 s; Meta-QSM in 10x TKD's time); the
#: others use smaller fields of view (the phantom head is scaled to fit the in-plane FOV), to keep the
#: benchmark's run time reasonable. 0.75x0.75x1.5 is a 20 deg oblique slab (B0 off the slice axis).
PROTOCOLS = {
    "0.5x0.5x2": ((288, 320, 56), (0.5, 0.5, 2.0), RESEARCH_TES, np.eye(3)),
    "0.76x0.76x3": ((256, 256, 64), (0.76, 0.76, 3.0), CLINICAL_TES, np.eye(3)),
    "1x1x1": ((144, 160, 128), (1.0, 1.0, 1.0), RESEARCH_TES, np.eye(3)),
    "0.75x0.75x1.5": ((208, 240, 96), (0.75, 0.75, 1.5), RESEARCH_TES, _tilt_about_i(20.0)),
}

#: The inversions, each with its spec's defaults (the CLI's).
METHODS = ("tkd", "l2", "ilsqr", "medi", "mesaqsm", "metaqsm")


def ssim3d(x, y, mask, sigma=1.5, k1=0.01, k2=0.03):
    """Mean SSIM (Wang et al. 2004) over ``mask`` with a Gaussian window of ``sigma`` voxels."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    data_range = float(np.ptp(y[mask]))
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    def blur(a):
        return ndimage.gaussian_filter(a, sigma, truncate=3.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(ssim[mask].mean())


def simulate(name, seed=0):
    """Local field (ppm), eroded mask, RSS magnitude, truth and labels for one protocol."""
    shape, voxel, tes, rotation = PROTOCOLS[name]
    start = time.perf_counter()
    head = ph.sample_head(shape, voxel, rotation)
    magnitude, phase = ph.simulate_megre(head, tes, B0_TESLA, peak_snr=100, rng=np.random.default_rng(seed))
    simulated = time.perf_counter() - start
    start = time.perf_counter()
    total = fit_total_field(magnitude, phase, tes, voxel)
    del phase
    fitted = time.perf_counter() - start
    rss = np.sqrt((magnitude ** 2).sum(axis=-1)).astype(np.float32)
    del magnitude
    print(f"{name}: {shape} voxels of {voxel} mm, {len(tes)} echoes, head scale {head.scale:.2f}; simulated in "
          f"{simulated:.0f} s, total field in {fitted:.1f} s")
    b0_dir = physics.b0_direction_voxel(head.affine)
    truth_field = physics.field_ppm_to_hz(dipole.forward_field_ppm(head.chi_ppm * head.brain_mask, voxel, b0_dir),
                                          B0_TESLA)
    removals = {}
    for method in ("resharp", "vsharp", "pdf"):  # with their defaults (RESHARP's 6 mm), PDF weighted by the magnitude
        start = time.perf_counter()
        removals[method] = remove_background_field(method, total.field_hz, head.brain_mask, voxel, b0_dir,
                                                   magnitude=rss)
        removals[method].wall = time.perf_counter() - start
    common = removals["resharp"].mask
    for method, result in removals.items():
        print(f"  {method:<8} {result.wall:6.1f} s {result.iterations:4d} iterations, keeps "
              f"{result.mask.sum() / head.brain_mask.sum():5.1%} of the brain mask; local field error against the "
              f"true brain's field: {_relative_error(result.local_field, truth_field, result.mask):.3f} in its "
              f"mask, {_relative_error(result.local_field, truth_field, common):.3f} in RESHARP's")
    bfr = removals["resharp"]
    return {
        "voxel": voxel, "b0_dir": b0_dir, "echo_times": tes, "local_hz": bfr.local_field, "mask": bfr.mask,
        "magnitude": rss,
        "truth": (head.chi_ppm * head.brain_mask).astype(np.float32), "seg": head.seg.astype(int),
        "brain": head.brain_mask,
    }


def _relative_error(field, truth, mask):
    """||field - truth|| / ||truth|| in ``mask``, both demeaned there (the mean of a local field is arbitrary)."""
    a, b = field[mask].astype(np.float64), truth[mask].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _memory_kib(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def run_method(data, method, threads):
    """Run one inversion in a forked child; return its metrics, wall s, peak extra RSS GiB and info."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            # return the heap's free pages to the OS, or the method would reuse them unseen by the RSS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset the peak RSS to the current RSS
            baseline = _memory_kib("VmRSS")
            if method in NETWORK_INVERSIONS:
                import torch

                torch.set_num_threads(threads)
            start = time.perf_counter()
            with sfft.set_workers(threads):  # the CLI's inversion step, the networks on the CPU
                chi, info = invert_local_field(method, data["local_hz"], data["mask"], data["voxel"], data["b0_dir"],
                                               B0_TESLA, magnitude=data["magnitude"], echo_times_s=data["echo_times"],
                                               device="cpu")
            wall = time.perf_counter() - start
            peak = (_memory_kib("VmHWM") - baseline) / 2 ** 20
            score = data["mask"] & data["brain"]
            metrics = challenge_metrics(chi, data["truth"], score.astype(np.uint8), data["seg"] * score)
            metrics["ssim"] = ssim3d(chi, data["truth"], score)
            payload = {"metrics": {k: float(v) for k, v in metrics.items()}, "wall": wall, "peak": peak,
                       "info": info}
            code = 0
        except Exception as err:  # report and exit non-zero; the parent raises
            payload, code = {"error": repr(err)}, 1
        with os.fdopen(write, "w") as pipe:
            json.dump(payload, pipe)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        payload = json.load(pipe)
    os.waitpid(pid, 0)
    if "error" in payload:
        raise RuntimeError(f"{method}: {payload['error']}")
    return payload


def iterations(method, info):
    if method == "ilsqr":
        return f"{info['LSQRIterations']}+{info['ArtifactIterations']} LSQR"
    if method == "medi":
        return f"{info['Iterations']} GN, {sum(info['CGIterations'])} CG"
    if method in NETWORK_INVERSIONS:
        return f"model {info['Model']}"
    return "-"


COLUMNS = (("nrmse", "NRMSE %", 8.1), ("hfen", "HFEN %", 8.1), ("xsim", "XSIM", 7.3), ("ssim", "SSIM", 7.3),
           ("correlation", "corr", 7.3), ("dgm_linearity", "DGM |1-s|", 10.3), ("calc_streak", "calc streak", 12.3))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FFT threads per method")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    opts = parser.parse_args(argv)
    header = f"{'protocol':<12} {'method':<7}" + "".join(f"{title:>{int(fmt)}}" for _, title, fmt in COLUMNS)
    header += f"{'wall s':>8} {'peak GiB':>9}  iterations"
    rows = []
    for name in opts.protocols:
        data = simulate(name)
        walls = {}
        for method in opts.methods:
            result = run_method(data, method, opts.threads)
            walls[method] = result["wall"]
            m = result["metrics"]
            row = f"{name:<12} {method:<7}" + "".join(f"{m[key]:>{fmt}f}" for key, _, fmt in COLUMNS)
            row += f"{result['wall']:>8.1f} {result['peak']:>9.2f}  {iterations(method, result['info'])}"
            print(row, flush=True)
            rows.append(row)
        if "tkd" in walls:
            rows += [f"{name:<12} {method:<7} {walls[method] / walls['tkd']:.1f}x TKD's wall time"
                     for method in NETWORK_INVERSIONS if method in walls]
    print("\n" + header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
