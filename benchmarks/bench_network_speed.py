#!/usr/bin/env python
"""CPU time of one U-Net forward pass for several widths and folds, on the benchmark head's box.

Why metaqsm folds 2x2x2 voxel blocks into channels: 3D convolutions with few channels are
memory-bound on CPUs, so narrowing the full-resolution level saves little; folding moves every
convolution to an eighth of the voxels. Each variant runs with plain convolutions and random
weights (the WP-Conv variants run the same ``conv3d`` calls once their kernels are predicted),
channels-last, under ``torch.no_grad``, on ``--threads`` threads; the table gives the median of
``--repeats`` passes after a warm-up, and TKD (threshold 0.2) on the same box for reference.

Usage: python benchmarks/bench_network_speed.py [--threads 2] [--shape 208 240 64] [--repeats 5]
"""
import argparse
import statistics
import time

import numpy as np
import scipy.fft as sfft
import torch

from metaqsm_bids.qsm.inversion.tkd import tkd
from metaqsm_bids.qsm.network.networks import UNet3d

#: (channels per level, fold): metaqsm-v2's widths unfolded, a narrower unfolded top level, the shipped one.
VARIANTS = (([8, 16, 32], 1), ([4, 8, 16, 32], 1), ([16, 32, 64], 2))


def median_seconds(function, repeats):
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[208, 240, 64],
                        help="box in voxels (the 256x256x64 benchmark head's mask box, padded)")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    shape = tuple(opts.shape)
    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.02, shape).astype(np.float32)
    mask = np.ones(shape, bool)
    with sfft.set_workers(opts.threads):
        tkd_s = median_seconds(lambda: tkd(field, mask, (0.76, 0.76, 3.0)), opts.repeats)
    print(f"{'channels':<16} {'fold':>4} {'convolutions at':>16} {'s':>7} {'x TKD':>6}")
    for channels, fold in VARIANTS:
        net = UNet3d({"arch": "mesa", "channels": channels, "fold": fold, "input": "field+tkd",
                      "fixed_voxel_size_mm": [0.76, 0.76, 3.0]}).eval()
        m = net.multiple
        x = torch.from_numpy(rng.normal(size=(1, 2, *(n // m * m for n in shape))).astype(np.float32))
        with torch.no_grad():
            weights = net.predict_weights(None)
            seconds = median_seconds(lambda: net.run(x, weights), opts.repeats)
        grid = "full grid" if fold == 1 else f"1/{fold ** 3} of voxels"
        print(f"{'/'.join(map(str, channels)):<16} {fold:>4} {grid:>16} {seconds:>7.3f} {seconds / tkd_s:>6.1f}")
    print(f"{'TKD (0.2)':<16} {'':>4} {'':>16} {tkd_s:>7.3f} {1:>6.1f}")


if __name__ == "__main__":
    main()
