#!/usr/bin/env python
"""Score every Chimap of a metaqsm output against the ground truth of a metaqsm-simulate dataset.

Usage: python benchmarks/score.py BIDS_DIR OUTPUT_DIR
Prints one row per run: qsm-ci's QSM challenge 2.0 metrics (NRMSE %, HFEN %, XSIM, correlation,
DGM linearity |1 - slope|), computed inside the run's ``desc-qsm_mask`` (the eroded brain mask in
which the Chimap is defined) intersected with the true brain mask.
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from qsm_ci.qsm_eval import challenge_metrics

from metaqsm_bids.io.outputs import output_path, parse_output_name, run_name

COLUMNS = ("nrmse", "hfen", "xsim", "correlation", "dgm_linearity")


def _load(path, dtype=np.float64):
    return np.asarray(nib.load(path).dataobj, dtype=dtype)


def read_output(root, kind, entities, dtype=np.float64):
    """The image of a derivative of ``kind`` (see :mod:`metaqsm_bids.io.outputs`) in the dataset ``root``."""
    return _load(output_path(root, kind, entities), dtype)


def score_run(entities, output_dir, truth_dir):
    """qsm-ci challenge metrics of the run's Chimap against the truth (the same names in ``truth_dir``)."""
    chi = read_output(output_dir, "chimap", entities)
    truth = read_output(truth_dir, "chimap", entities)
    # the simulator's labels, beside its Chimap
    seg = _load(output_path(truth_dir, "chimap", entities).with_name(f"{run_name(entities)}_dseg.nii.gz"), np.int32)
    brain = read_output(truth_dir, "brain_mask", entities) > 0
    mask = (read_output(output_dir, "qsm_mask", entities) > 0) & brain
    return challenge_metrics(chi, truth, mask.astype(np.uint8), seg * mask), int(mask.sum()), int(brain.sum())


def score_dataset(bids_dir, output_dir):
    """Rows (run name, metrics, scored voxels, brain voxels) for every Chimap in ``output_dir`` (native space)."""
    truth_dir = Path(bids_dir) / "derivatives" / "metaqsm-simulate"
    runs = [parsed[1] for parsed in map(parse_output_name, (p.name for p in Path(output_dir).glob("sub-*/**/anat/*")))
            if parsed and parsed[0] == "chimap" and "space" not in parsed[1]]
    return [(run_name(entities), *score_run(entities, output_dir, truth_dir))
            for entities in sorted(runs, key=run_name)]


def print_table(rows):
    print(f"{'run':<24}" + "".join(f"{c:>14}" for c in COLUMNS) + f"{'scored/brain':>16}")
    for name, metrics, scored, brain in rows:
        print(f"{name:<24}" + "".join(f"{metrics[c]:>14.3f}" for c in COLUMNS) + f"{scored:>9}/{brain:<7}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print_table(score_dataset(*sys.argv[1:]))
