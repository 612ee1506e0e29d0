"""A container's outputs of the demo against the pip run's (for .ci/containers.sh).

    python .ci/check_outputs.py OUT PIP_OUT docker|singularity VERSION CHI_TOL
    python .ci/check_outputs.py --space TEMPLATE OUT

Fails (exit 1, saying what) unless: ``GeneratedBy[0].Container`` names the container and version; the
group level wrote its summary and report; the participant outputs are the same files as the pip run's;
every Chimap differs from pip's by at most CHI_TOL ppm (the largest difference is printed); and, where
``bids-validator-deno`` is on PATH, the validator reports 0 errors (warnings are listed).
With ``--space``: every Chimap of OUT has its TEMPLATE res-2 copy, whose registration has no warning and
a brain-mask Dice of at least metaqsm's threshold, and the validator reports 0 errors.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def say(message):
    print(f"[containers] {message}", flush=True)


def files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if p.is_file() and not p.name.startswith("group_"))


def main(out, pip_out, kind, version, tol):
    out, pip_out, tol = Path(out), Path(pip_out), float(tol)
    generated = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert generated["Container"] == {"Type": kind, "Tag": version}, generated
    say(f"{out}: GeneratedBy {generated['Name']} {generated['Version']}, Container {generated['Container']}")
    assert (out / "group_summary.tsv").exists() and (out / "group_report.html").exists(), "no group outputs"

    assert files(out) == files(pip_out), f"files differ from the pip run's: {set(files(out)) ^ set(files(pip_out))}"
    chimaps = sorted(pip_out.rglob("*_Chimap.nii.gz"))
    assert chimaps, f"no Chimap in {pip_out}"
    for pip_map in chimaps:
        a = np.asarray(nib.load(pip_map).dataobj, np.float64)
        b = np.asarray(nib.load(out / pip_map.relative_to(pip_out)).dataobj, np.float64)
        diff = np.abs(a - b).max()
        say(f"{pip_map.name}: max |{kind} - pip| = {diff:.3g} ppm (max |chi| {np.abs(a).max():.3g} ppm)")
        assert diff <= tol, f"{pip_map.name}: the {kind} Chimap differs from pip's by {diff} ppm > {tol}"
    say(f"{out}: the same {len(files(out))} files as the pip run")
    validate(out)


def check_space(template, out):
    from metaqsm_bids.spatial.template import MIN_BRAIN_DICE

    out = Path(out)
    chimaps = sorted(out.rglob("*_Chimap.nii.gz"))
    originals = [p for p in chimaps if "_space-" not in p.name]
    assert originals, f"no Chimap in {out}"
    for original in originals:
        name = original.name.replace("_Chimap", f"_space-{template}_res-2_Chimap")
        sidecar = json.loads((original.parent / name).with_suffix("").with_suffix(".json").read_text())
        dice = sidecar["Registration"]["BrainMaskDice"]
        assert dice >= MIN_BRAIN_DICE and "Warnings" not in sidecar, (name, sidecar["Registration"])
        say(f"{name}: registered in {sidecar['Registration']['ElapsedSeconds']} s, brain-mask Dice {dice}")
    validate(out)


def validate(out):
    validator = shutil.which("bids-validator-deno")
    if validator is None:
        say("bids-validator-deno is not installed: the outputs are not validated")
        return
    report = subprocess.run([validator, "--format", "json", str(out)], capture_output=True, text=True, timeout=600)
    issues = json.loads(report.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    warnings = sorted({i["code"] for i in issues if i["severity"] == "warning"})
    assert not errors, f"bids-validator-deno: {len(errors)} errors: {errors[:10]}"
    say(f"bids-validator-deno: 0 errors, {len(warnings)} kinds of warning {warnings}")


if __name__ == "__main__":
    try:
        check_space(*sys.argv[2:]) if sys.argv[1] == "--space" else main(*sys.argv[1:])
    except AssertionError as err:
        sys.exit(f"[containers] FAILED: {err}")
