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

COLUMNS = ("nrmse", "hfen", "xsim", "correlation", "dgm_linearity")


def score_run(chimap_path, output_dir, truth_dir):
    """qsm-ci challenge metrics of one Chimap against the truth (same relative folder in ``truth_dir``)."""
    chimap_path = Path(chimap_path)
    prefix = chimap_path.name.replace("_Chimap.nii.gz", "")
    truth_anat = Path(truth_dir) / chimap_path.parent.relative_to(output_dir)

    def load(path, dtype=np.float64):
        return np.asarray(nib.load(path).dataobj, dtype=dtype)

    chi = load(chimap_path)
    truth = load(truth_anat / f"{prefix}_Chimap.nii.gz")
    seg = load(truth_anat / f"{prefix}_dseg.nii.gz", np.int32)
    brain = load(truth_anat / f"{prefix}_desc-brain_mask.nii.gz") > 0
    mask = (load(chimap_path.with_name(f"{prefix}_desc-qsm_mask.nii.gz")) > 0) & brain
    return challenge_metrics(chi, truth, mask.astype(np.uint8), seg * mask), int(mask.sum()), int(brain.sum())


def score_dataset(bids_dir, output_dir):
    """Rows (run name, metrics, scored voxels, brain voxels) for every Chimap in ``output_dir``."""
    truth_dir = Path(bids_dir) / "derivatives" / "metaqsm-simulate"
    return [(p.name.replace("_Chimap.nii.gz", ""), *score_run(p, output_dir, truth_dir))
            for p in sorted(Path(output_dir).glob("sub-*/**/anat/*_Chimap.nii.gz"))]


def print_table(rows):
    print(f"{'run':<24}" + "".join(f"{c:>14}" for c in COLUMNS) + f"{'scored/brain':>16}")
    for name, metrics, scored, brain in rows:
        print(f"{name:<24}" + "".join(f"{metrics[c]:>14.3f}" for c in COLUMNS) + f"{scored:>9}/{brain:<7}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print_table(score_dataset(*sys.argv[1:]))
