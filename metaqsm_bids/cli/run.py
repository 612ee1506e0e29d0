"""``metaqsm bids_dir output_dir participant|group``: the BIDS App entry point."""
import logging
import os
import re
import sys
import time
from pathlib import Path

LOGGER = logging.getLogger("metaqsm")


def main(argv=None):
    """Run the BIDS App; returns the process exit status (0 = every participant succeeded)."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network check at nipype import: clusters are offline
    from .parser import parse_args

    opts = parse_args(argv)
    # our own logger only: a root handler would print every nipype line twice (nipype has its own)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [metaqsm] %(levelname)s: %(message)s", "%H:%M:%S"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.WARNING - 10 * min(opts.verbose + 1, 2))
    from ..io.bids import BIDSInputError

    try:
        if opts.analysis_level == "group":
            return run_group(opts)
        return run_participant(opts)
    except BIDSInputError as err:
        LOGGER.error("%s", err)
        return 1


def _user_masks(mask_dir, runs):
    from ..io.bids import BIDSInputError
    from ..io.derivatives import derivative_path

    masks = {}
    for run in runs:
        target = derivative_path(mask_dir, {**run.entities, "desc": "brain"}, "mask", "anat")
        for candidate in (target, target.with_name(target.name.replace(".nii.gz", ".nii"))):
            if candidate.exists():
                masks[run.name] = candidate
                break
        else:
            raise BIDSInputError(f"{target}: no brain mask for run {run.name} in --brain-mask-dir")
    return masks


def _collect(opts, layout, subjects):
    """Runs per participant, and the participants whose input is unusable, with the reason."""
    from ..io.bids import BIDSInputError, find_megre_runs, load_bids_filters

    filters = load_bids_filters(opts.bids_filter_file) if opts.bids_filter_file else {}
    runs_by_subject, user_masks, failed = {}, {}, {}
    for subject in subjects:
        found = find_megre_runs(layout, subject, opts.session_label, filters, opts.phase_sign)
        errors = [str(result) for _, result in found if isinstance(result, Exception)]
        if not found:
            sessions = f" in session(s) {opts.session_label}" if opts.session_label else ""
            errors = [f"sub-{subject}: no *_MEGRE.nii[.gz] files (part-mag + part-phase or part-real + part-imag) "
                      f"found{sessions}"]
        if not errors and opts.brain_mask_dir:
            try:
                user_masks.update(_user_masks(opts.brain_mask_dir, [run for _, run in found]))
            except BIDSInputError as err:
                errors = [str(err)]
        if errors:
            failed[subject] = "; ".join(errors)
            LOGGER.error("sub-%s cannot be processed: %s", subject, failed[subject])
            if opts.stop_on_first_crash:
                break
            continue
        runs_by_subject[subject] = [run for _, run in found]
        for _, run in found:
            for warning in run.warnings:
                LOGGER.warning("%s", warning)
        LOGGER.info("sub-%s: %d run(s): %s", subject, len(found), ", ".join(run.name for _, run in found))
    return runs_by_subject, user_masks, failed


def _crash_reasons(crash_dir, since):
    """Participant -> error message, read from the nipype crash files written after ``since``."""
    reasons = {}
    for crash in sorted(Path(crash_dir).glob("crash-*.txt")):
        if crash.stat().st_mtime < since:
            continue
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (\S+)", text, re.M)
        errors = re.findall(r"^(\w+(?:Error|Exception)): (.+)$", text, re.M)
        node_name = node.group(1) if node else "?"
        message = f"{errors[-1][0]}: {errors[-1][1]}" if errors else text.strip().splitlines()[-1]
        subject = re.search(r"\.sub_([A-Za-z0-9]+)_wf\.", node_name)  # see subject_workflow_name
        key = subject.group(1) if subject else "?"
        reasons.setdefault(key, f"step {node_name.split('.')[-1]} failed: {message} (details: {crash})")
    return reasons


def run_participant(opts):
    """Participant level: reconstruct every selected run; one failure does not stop the others."""
    from bids import BIDSLayout
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    from ..io.bids import BIDSInputError, participant_labels
    from ..io.validation import format_findings, validate_input
    from ..reports import write_subject_report
    from ..io.derivatives import ensure_dataset_description
    from ..workflows.base import init_metaqsm_wf
    from .plugins import add_resource_hints

    if not opts.skip_bids_validation:
        findings = validate_input(opts.bids_dir)
        for finding in findings:
            (LOGGER.error if finding.severity == "error" else LOGGER.warning)("%s", finding)
        dataset_errors = [f for f in findings if f.subject is None and f.severity == "error"]
        if dataset_errors:
            raise BIDSInputError(f"{opts.bids_dir} is not a valid BIDS dataset:\n{format_findings(dataset_errors)}"
                                 "\n(--skip-bids-validation skips this check)")
    layout = BIDSLayout(str(opts.bids_dir), validate=False)
    subjects = participant_labels(layout, opts.participant_label)
    runs_by_subject, user_masks, failed = _collect(opts, layout, subjects)
    if failed and opts.stop_on_first_crash:
        return 1

    if runs_by_subject:
        ensure_dataset_description(opts.output_dir, opts.bids_dir)
        crash_dir = opts.work_dir / "crash"
        crash_dir.mkdir(parents=True, exist_ok=True)
        nipype_config.update_config({
            "execution": {
                "crashdump_dir": str(crash_dir),
                "crashfile_format": "txt",
                "stop_on_first_crash": opts.stop_on_first_crash,
                "create_report": False,
                "write_provenance": False,
                # nipype's default 2 s scheduler poll dominates small runs (25 s -> 6 s for the demo);
                # cluster plugins poll the scheduler on their own interval
                "poll_sleep_duration": 0.1,
            },
            "monitoring": {"enabled": False},
            "logging": {level: ("WARNING", "INFO", "DEBUG")[min(opts.verbose, 2)]
                        for level in ("workflow_level", "interface_level", "utils_level")},
        })
        nipype_logging.update_logging(nipype_config)
        inversion_params = {"tkd": {"threshold": opts.tkd_threshold},
                            "medi": {"lambda_": opts.medi_lambda},
                            "metaqsm": {"orientations": opts.network_orientations},
                            "mesaqsm": {"orientations": opts.network_orientations}}.get(opts.inversion, {})
        wf = init_metaqsm_wf(
            runs_by_subject, work_dir=opts.work_dir, user_masks=user_masks,
            bids_dir=opts.bids_dir, output_dir=opts.output_dir, inversion=opts.inversion,
            inversion_params=inversion_params, bfr=opts.bfr, bfr_radius_mm=opts.bfr_radius_mm,
            bipolar=opts.bipolar,
            device=opts.device, omp_nthreads=opts.omp_nthreads, output_spaces=opts.output_spaces,
        )
        add_resource_hints(wf, opts.plugin)
        started = time.time() - 1
        try:
            wf.run(plugin=opts.plugin, plugin_args=opts.plugin_args)
        except RuntimeError as err:
            reasons = _crash_reasons(crash_dir, started)
            if not reasons:
                raise
            LOGGER.debug("nipype: %s", err)
            for subject, reason in reasons.items():
                failed[subject] = reason
                runs_by_subject.pop(subject, None)

    for subject in sorted(set(runs_by_subject) | set(failed)):
        if (opts.output_dir / f"sub-{subject}").exists():
            write_subject_report(opts.output_dir, subject, opts.bids_dir)
        if subject in failed:
            print(f"sub-{subject}: FAILED: {failed[subject]}", file=sys.stderr)
        else:
            print(f"sub-{subject}: OK ({len(runs_by_subject[subject])} run(s)) -> {opts.output_dir}")
    return 1 if failed else 0


def run_group(opts):
    """Group level: tabulate every Chimap found in ``output_dir``, and participants with none."""
    from ..reports import write_group_report

    report = write_group_report(opts.output_dir, opts.bids_dir)  # also writes group_summary.tsv
    summary = opts.output_dir / "group_summary.tsv"
    print(summary.read_text(), end="")
    print(f"wrote {summary} and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
