#!/usr/bin/env python
"""Training steps and patches per hour on this machine, for each ``--reuse`` (metaqsm-train's option).

A step is what :func:`metaqsm_bids.training.train.train` does per step: the batch
(:func:`~metaqsm_bids.training.train.training_batch`: made, or a made one reused with random axis
reversals and sign), the network's forward and backward passes and the RMSprop update, for the
shipped Meta-QSM's architecture (``--model``'s config) with ``--batch-size`` crops of ``--patch``.
The variants run interleaved, one step each in turn, so a shared machine's load falls on all of them
alike. "made/h" counts new synthetic crops, "seen/h" the crops the network trains on.

Usage: python benchmarks/bench_training_throughput.py [--reuse 1 4 8] [--steps 24] [--threads 1]
"""
import argparse
import statistics
import time

import torch

from metaqsm_bids.qsm.network.deepqsm import load_model
from metaqsm_bids.qsm.network.models import METAQSM_MODEL
from metaqsm_bids.training.train import DEFAULTS, masked_l1, training_batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=24, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--patch", type=int, nargs=3, default=DEFAULTS["patch"])
    parser.add_argument("--model", default=METAQSM_MODEL)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    template = load_model(args.model, "cpu")
    runs = {}
    for reuse in args.reuse:
        model = load_model(args.model, "cpu").train()
        cfg = {**DEFAULTS, **template.config, "batch_size": args.batch_size, "patch": args.patch, "reuse": reuse,
               "seed": 12345}
        runs[reuse] = {"cfg": cfg, "model": model, "opt": torch.optim.RMSprop(model.parameters(), lr=1e-5),
                       "data": [], "total": []}

    def step(run, index):
        t0 = time.perf_counter()
        batch = training_batch(run["cfg"], index)
        t1 = time.perf_counter()
        loss = masked_l1(run["model"](batch["x"], batch["cond"]), batch)
        run["opt"].zero_grad(set_to_none=True)
        loss.backward()
        run["opt"].step()
        return t1 - t0, time.perf_counter() - t0

    for index in range(args.steps + 1):
        for reuse, run in runs.items():
            # each variant its own steps (so its own made batches in the cache)
            data, total = step(run, index + 1000 * reuse)
            if index:
                run["data"].append(data)
                run["total"].append(total)
    print(f"{args.steps} steps per variant, batch {args.batch_size} x {'x'.join(map(str, args.patch))}, "
          f"{args.threads} torch thread(s), model {args.model}")
    print("| reuse | s/step (mean) | of which data (s) | steps/h | made/h | seen/h | seen/h vs reuse 1 |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for reuse, run in runs.items():
        per_step = statistics.mean(run["total"])
        steps_h = 3600 / per_step
        seen = steps_h * args.batch_size
        base = base or seen
        print(f"| {reuse} | {per_step:.3f} | {statistics.mean(run['data']):.3f} | {steps_h:.0f} | "
              f"{seen / reuse:.0f} | {seen:.0f} | {seen / base:.2f}x |")


if __name__ == "__main__":
    main()
