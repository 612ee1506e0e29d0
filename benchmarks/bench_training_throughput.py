#!/usr/bin/env python
"""Training steps and patches per hour on this machine, for each ``--reuse`` (metaqsm-train's option).

A step is what :func:`metaqsm_bids.training.train.train` does per step: the batch
(:func:`~metaqsm_bids.training.train.training_batch`: made, or a made one reused with random axis
reversals and sign), the network's forward and backward passes and the RMSprop update, for the
shipped Meta-QSM's architecture (``--model``'s config) with ``--batch-size`` crops of ``--patch``.
The variants run interleaved, one step each in turn, so a shared machine's load falls on all of them
alike. "made/h" counts new synthetic crops, "seen/h" the crops the network trains on. ``--input`` and
``--tv-weighting`` set the network input (the model's by default); ``--remade-inputs`` adds, per reuse, the variant
that makes the input channels anew for every reused step (what training did before they were made once per made
batch and augmented with it). ``--data-workers`` adds, per reuse, the variant whose batches are made ahead by that many
worker processes (``metaqsm-train --data-workers``, :class:`~metaqsm_bids.training.train.DataWorkers`); with any,
the variants run one after the other instead (the workers would load the others' steps), each after ``reuse x
(workers + 1)`` untimed steps (the workers' start and their first batches), in two halves, the second in reverse
order, so that a drifting machine falls on all alike.

Usage: python benchmarks/bench_training_throughput.py [--reuse 1 4 8] [--steps 24] [--threads 1] [--supersample 2]
       [--input field+tv+magnitude] [--tv-weighting magnitude] [--remade-inputs] [--data-workers 0 1]
"""
import argparse
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch

from metaqsm_bids.qsm.network.deepqsm import load_model
from metaqsm_bids.qsm.network.models import METAQSM_MODEL
from metaqsm_bids.qsm.network.models import INPUTS
from metaqsm_bids.qsm.inversion.tv import WEIGHTINGS
from metaqsm_bids.training.synth import augment
from metaqsm_bids.training.train import (DEFAULTS, DataWorkers, _as_tensors, _made_samples, masked_l1,
                                         training_batch)


def remade_inputs_batch(cfg, step):
    """:func:`training_batch` with the input channels made anew from each augmented sample (the former path)."""
    reuse = int(cfg["reuse"])
    made = (cfg["seed"], step // reuse, cfg["batch_size"], tuple(cfg["patch"]), None, cfg["conditioning"],
            cfg["supersample"])
    samples = _made_samples(*made)
    if reuse > 1:
        rng = np.random.default_rng([cfg["seed"], step, 0, 1])
        samples = [augment(s, [a for a in range(3) if rng.random() < 0.5], rng.random() < 0.5) for s in samples]
    return _as_tensors(samples, cfg)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=24, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--patch", type=int, nargs=3, default=DEFAULTS["patch"])
    parser.add_argument("--supersample", type=int, default=DEFAULTS["supersample"],
                        help="crops made on an S times finer grid (metaqsm-v5 to v10's recipe: 1)")
    parser.add_argument("--model", default=METAQSM_MODEL)
    parser.add_argument("--input", choices=sorted(INPUTS), help="the network input (default: the model's; a wider "
                        "one than the model's is not supported here)")
    parser.add_argument("--tv-weighting", choices=WEIGHTINGS, help="the TV-ADMM channel's (default: the model's)")
    parser.add_argument("--remade-inputs", action="store_true",
                        help="also time each reuse with the input channels made anew every step")
    parser.add_argument("--data-workers", type=int, nargs="+", default=[0], metavar="N",
                        help="data worker processes per variant (0: batches made between the steps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    template = load_model(args.model, "cpu")
    chosen = {k: v for k, v in (("input", args.input), ("tv_weighting", args.tv_weighting)) if v is not None}
    runs = {}
    for reuse in args.reuse:
        for remade, workers in [(False, w) for w in args.data_workers] + [(True, 0)] * args.remade_inputs:
            model = load_model(args.model, "cpu").train()
            cfg = {**DEFAULTS, **template.config, **chosen, "batch_size": args.batch_size, "patch": args.patch,
                   "supersample": args.supersample, "reuse": reuse, "seed": 12345}
            name = (f"{reuse}, inputs remade" if remade else f"{reuse}, {workers} data workers" if workers
                    else f"{reuse}")
            runs[name] = {"cfg": cfg, "model": model, "opt": torch.optim.RMSprop(model.parameters(), lr=1e-5),
                          "data": [], "total": [], "batch": remade_inputs_batch if remade else training_batch,
                          "reuse": reuse, "workers": workers, "made": None}

    def step(run, index):
        t0 = time.perf_counter()
        batch = run["batch"](run["cfg"], index, run["made"]) if run["made"] else run["batch"](run["cfg"], index)
        t1 = time.perf_counter()
        loss = masked_l1(run["model"](batch["x"], batch["cond"]), batch)
        run["opt"].zero_grad(set_to_none=True)
        loss.backward()
        run["opt"].step()
        return t1 - t0, time.perf_counter() - t0

    def record(run, index, timed):
        # each reuse its own steps (so its own made batches in the cache; a remade variant the same crops)
        data, total = step(run, index + 1000 * run["reuse"])
        if timed:
            run["data"].append(data)
            run["total"].append(total)

    if max(args.data_workers) == 0:
        for index in range(args.steps + 1):
            for run in runs.values():
                record(run, index, index > 0)
    else:
        half = args.steps // 2
        for names, first in ((list(runs), 0), (list(runs)[::-1], half)):
            for name in names:
                run = runs[name]
                untimed = run["reuse"] * (run["workers"] + 1)
                start = 0 if first == 0 else 10000  # the second half's made batches are not in the cache
                with DataWorkers(run["workers"]) if run["workers"] else nullcontext() as run["made"]:
                    for index in range(untimed + (half if first == 0 else args.steps - half)):
                        record(run, start + index, index >= untimed)
    print(f"{args.steps} steps per variant, batch {args.batch_size} x {'x'.join(map(str, args.patch))} "
          f"(supersample {args.supersample}), "
          f"{args.threads} torch thread(s), model {args.model}, input {runs[next(iter(runs))]['cfg']['input']} "
          f"(TV weighting {runs[next(iter(runs))]['cfg']['tv_weighting']})")
    print("| reuse | s/step (mean) | of which data (s) | steps/h | made/h | seen/h | seen/h vs the first row |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, run in runs.items():
        per_step = statistics.mean(run["total"])
        steps_h = 3600 / per_step
        seen = steps_h * args.batch_size
        base = base or seen
        print(f"| {name} | {per_step:.3f} | {statistics.mean(run['data']):.3f} | {steps_h:.0f} | "
              f"{seen / run['reuse']:.0f} | {seen:.0f} | {seen / base:.2f}x |")


if __name__ == "__main__":
    main()
