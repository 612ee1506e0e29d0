"""Validating the input BIDS dataset before processing, and keeping the output dataset valid.

:func:`validate_input` runs the official BIDS validator (``bids-validator-deno``, offline, JSON
output) when it is installed, else pybids' file-name validation, then metaqsm's own checks of
every MEGRE run (:func:`metaqsm_bids.io.inputs.find_megre_runs`: phase without magnitude, missing
echoes, echoes of different shapes or grids, missing EchoTime or field strength). It returns
findings and never raises for a problem in the data: the caller decides what stops the run.

Given the participants being run, it reads their ``sub-*`` folders and the dataset-level files only
(the official validator sees a view of the dataset without the other participants' folders), so a
one-participant task of a large study reads its own participant, not the whole dataset.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .inputs import RUN_ENTITIES, BIDSInputError, bare_label, find_megre_runs, index_dataset, subject_dirs, subject_of

#: Dataset-level files: a validator error in them is an error for metaqsm too.
_DATASET_LEVEL = re.compile(r"^/?(dataset_description\.json|participants\.(tsv|json))$")


@dataclass(frozen=True)
class Finding:
    """One problem found in the input dataset.

    severity: "error" (metaqsm cannot use the file or dataset) or "warning" (not BIDS-valid,
    but metaqsm does not need it); path: relative to the dataset root, None for the whole
    dataset; subject: participant label, None for dataset-level findings; source:
    "bids-validator", "pybids" or "metaqsm"; code: the validator's issue code (with its sub-code
    after a slash), or metaqsm's: MEGRE_RUN, NO_MEGRE, INVALID_NAME, DATASET_DESCRIPTION, VALIDATOR_FAILED.
    """

    severity: str
    message: str
    path: str = None
    subject: str = None
    source: str = "metaqsm"
    code: str = None

    def __str__(self):
        return f"[{self.severity.upper()}] {self.message}"


def find_validator():
    """Path of ``bids-validator-deno`` on PATH or next to this Python, or None."""
    exe = shutil.which("bids-validator-deno") or Path(sys.executable).with_name("bids-validator-deno")
    return str(exe) if Path(exe).exists() else None


def validate_input(bids_dir, validator="auto", timeout_s=600, participants=None):
    """Findings about ``bids_dir`` that matter for QSM, errors first; an empty list means all is well.

    ``validator``: "auto" (the official validator if installed, else pybids), a path to
    ``bids-validator-deno``, or None (pybids only). Validator warnings (recommended metadata)
    are dropped; validator errors in MEGRE files or dataset-level files stay errors, those in
    other files become warnings (metaqsm ignores those files). ``participants`` (labels, with or
    without ``sub-``; None: all): only these participants' files are checked, besides the
    dataset-level files (dataset_description.json, participants.tsv, top-level sidecars). Raises
    ValueError only if ``bids_dir`` is not a directory.
    """
    bids_dir = Path(bids_dir).resolve()
    if not bids_dir.is_dir():
        raise ValueError(f"{bids_dir}: the BIDS dataset folder does not exist")
    validator = find_validator() if validator == "auto" else validator
    findings = []
    if validator:
        try:
            findings += _official_validator(bids_dir, validator, timeout_s, participants)
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            findings.append(Finding("warning", f"the BIDS validator could not run ({err}); "
                                    "checked file names with pybids instead", code="VALIDATOR_FAILED"))
            findings += _pybids_names(bids_dir, participants)
    else:
        findings += _pybids_names(bids_dir, participants)
    # a phase sidecar without Units is BIDS-invalid, but metaqsm infers the units from the value range and
    # says so, with the file, when it collects the run (one warning per run, also with --skip-bids-validation)
    findings = [f for f in findings if not (f.code == "SIDECAR_KEY_REQUIRED/Units" and "_part-phase_" in (f.path or ""))]
    own = _qsm_checks(bids_dir, participants)
    # a missing required key that metaqsm's check already names in its own words is said once
    findings = [f for f in findings if not (f.source == "bids-validator" and "/" in (f.code or "") and any(
        o.path == f.path and f.code.split("/", 1)[1] in o.message for o in own))]
    # so is the validator's finding about a sidecar that metaqsm cannot read (metaqsm names it, see index_dataset)
    unreadable = {o.path for o in own if o.path and o.path.endswith(".json")}
    findings = [f for f in findings if not (f.source == "bids-validator" and f.path in unreadable)]
    unique = list(dict.fromkeys(findings + own))
    return sorted(unique, key=lambda f: f.severity != "error")


def format_findings(findings):
    """One line per finding, for logs and error messages."""
    return "\n".join(str(f) for f in findings)


def _view(bids_dir, participants, folder):
    """Symbolic links in ``folder`` to every top-level entry of ``bids_dir`` but the ``sub-*`` folders of the
    participants not in ``participants``: the dataset as the validator should see it for those participants."""
    wanted = {f"sub-{bare_label(label)}" for label in participants}
    others = {f"sub-{label}" for label in subject_dirs(bids_dir)} - wanted
    for entry in os.scandir(bids_dir):
        if entry.name not in others:
            os.symlink(entry.path, Path(folder) / entry.name)
    return folder


def _official_validator(bids_dir, validator, timeout_s, participants=None):
    """The official validator's errors, on the whole dataset or (``participants``) on a view of it without the
    other participants' folders (messages and paths name ``bids_dir``'s files either way)."""
    if participants is not None:
        with tempfile.TemporaryDirectory(prefix="metaqsm-validate-") as folder:
            found = _official_validator(Path(_view(bids_dir, participants, folder)), validator, timeout_s)
        return [Finding(f.severity, f.message.replace(folder, str(bids_dir)), f.path, f.subject, f.source, f.code)
                for f in found]
    result = subprocess.run([validator, "--format", "json", "--no-color", str(bids_dir)], capture_output=True,
                            text=True, timeout=timeout_s)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise ValueError(f"exit status {result.returncode}, no JSON output: {result.stderr.strip()[-500:]}") from None
    issues, messages = report["issues"]["issues"], report["issues"].get("codeMessages", {})
    findings = []
    for issue in issues:
        if issue.get("severity") != "error":
            continue
        location = issue.get("location")
        what = (messages.get(issue["code"]) or issue["code"]).strip().splitlines()[0].rstrip(".")
        sub = f" ({issue['subCode']})" if issue.get("subCode") else ""
        relevant = location is None or "_MEGRE." in location or _DATASET_LEVEL.match(location)
        where = location.lstrip("/") if location else None
        message = f"{where or bids_dir}: {what}{sub} [bids-validator {issue['code']}]"
        if not relevant:
            message += "; metaqsm does not read this file"
        code = issue["code"] + (f"/{issue['subCode']}" if issue.get("subCode") else "")
        findings.append(Finding("error" if relevant else "warning", message, where, subject_of(location),
                                "bids-validator", code))
    return findings


def _pybids_names(bids_dir, participants=None):
    """pybids' validation: dataset_description.json readable, every file under sub-* named per BIDS
    (``participants``: under those participants' ``sub-*`` folders only)."""
    from bids_validator import BIDSValidator

    findings = []
    description = bids_dir / "dataset_description.json"
    try:
        json.loads(description.read_text())
    except (OSError, json.JSONDecodeError) as err:
        findings.append(Finding("error", f"{description}: missing or not valid JSON ({err}); "
                                "a BIDS dataset needs it", "dataset_description.json", None, "pybids",
                                "DATASET_DESCRIPTION"))
    checker = BIDSValidator()
    folders = [f"sub-{label}" for label in subject_dirs(bids_dir)] if participants is None else \
        sorted({f"sub-{bare_label(label)}" for label in participants})
    for path in sorted(p for folder in folders for p in bids_dir.glob(f"{glob.escape(folder)}/**/*")):
        relative = "/" + path.relative_to(bids_dir).as_posix()
        if path.is_file() and not checker.is_bids(relative):
            megre = "MEGRE" in path.name or "part-" in path.name
            findings.append(Finding(
                "error" if megre else "warning",
                f"{relative[1:]}: not a valid BIDS file name; pybids and metaqsm ignore it",
                relative[1:], subject_of(relative), "pybids", "INVALID_NAME"))
    return findings


def _qsm_checks(bids_dir, participants=None):
    """metaqsm's own checks of every MEGRE run (the same ones the participant level applies), of the
    ``participants`` only (labels; None: all)."""
    def relative(message):  # metaqsm's messages start with the file
        path = Path(message.split(": ", 1)[0])
        return path.relative_to(bids_dir).as_posix() if path.is_absolute() and path.is_relative_to(bids_dir) else None

    try:
        layout, unreadable = index_dataset(bids_dir, participants)
    except BIDSInputError as err:
        return [Finding("error", str(err), relative(str(err)), code="MEGRE_RUN")]
    findings = [Finding("error", message, relative(message), subject, code="MEGRE_RUN")
                for subject, messages in unreadable.items() for message in messages]
    for subject in sorted(layout.get_subjects()):
        runs = find_megre_runs(layout, subject)
        if not runs:
            findings.append(Finding("warning", f"sub-{subject}: no *_part-mag/_part-phase_MEGRE files; "
                                    "metaqsm has nothing to process for this participant", f"sub-{subject}", subject,
                                    code="NO_MEGRE"))
        for entities, result in runs:
            if isinstance(result, Exception):
                findings.append(Finding("error", str(result), relative(str(result)), entities[RUN_ENTITIES[0]],
                                        code="MEGRE_RUN"))
    return findings


def ensure_bidsignore(dataset_dir, patterns):
    """Add ``patterns`` missing from ``<dataset_dir>/.bidsignore`` (e.g. reports, transforms); returns the path."""
    from .derivatives import atomic_write

    path = Path(dataset_dir) / ".bidsignore"
    lines = path.read_text().splitlines() if path.exists() else []
    missing = [p for p in patterns if p not in lines]
    if missing:
        text = "\n".join(lines + missing) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
