"""``metaqsm bids_dir output_dir participant|group``: the BIDS App entry point.

The console gets one line per problem (the file and what is wrong) and one status line per
participant. Tracebacks and nipype's own messages go to the log file in ``<work_dir>/logs/``
and to nipype's crash files in ``<work_dir>/crash/``; ``-v`` adds nipype's progress messages
(not its crash reports) to the console.
"""
import errno
import logging
import os
import re
import signal
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

LOGGER = logging.getLogger("metaqsm")
#: nipype's loggers; each has its own console handler, which :func:`_route_nipype_logging` replaces.
NIPYPE_LOGGERS = ("nipype.workflow", "nipype.interface", "nipype.utils", "nipype.filemanip")
#: Other libraries' loggers that would print to the console; they go to the log file only.
OTHER_LOGGERS = ("nibabel.global", "concurrent.futures")
_CONSOLE_FORMAT = logging.Formatter("%(asctime)s [metaqsm] %(levelname)s: %(message)s", "%H:%M:%S")
_FILE_FORMAT = logging.Formatter("%(asctime)s [%(name)s] %(levelname)s: %(message)s")
_log_handler = None  # the log file's handler, once the work directory is known to be writable


class _LogFile(logging.FileHandler):
    """The log file's handler. Once it cannot write (the disk full), records go on to the console alone: a
    failing log file must not print logging's own tracebacks there, nor raise from a flush."""

    def handleError(self, record):
        pass

    def flush(self):
        try:
            super().flush()
        except OSError:
            pass


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: the run stops (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way, nipype's included, takes it for a failed step)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


#: The signal that stopped the run, once one has arrived.
_stopped_by = []
#: Standard-library packages that hold locks or fork: an exception raised in their code can leave a lock held
#: (e.g. logging's, released after forking a worker) and metaqsm hung; a stop waits until the code has left them.
_NOT_INTERRUPTED = ("logging", "threading", "multiprocessing", "concurrent", "queue", "importlib")
_STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _interruptible(frame):
    """Whether no frame of the stack runs the code of one of :data:`_NOT_INTERRUPTED` or a destructor (``__del__``:
    Python ignores what it raises, printing a traceback, and the stop would wait for the next node)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return False
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(_STDLIB) and path.relative_to(_STDLIB).parts[0].removesuffix(".py") in \
                _NOT_INTERRUPTED or frame.f_code.co_filename.startswith("<frozen importlib"):
            return False
        frame = frame.f_back
    return True


def _raise_stopped(signum, frame):
    """SIGTERM/SIGINT handler: raise :class:`Stopped` in the main thread, at once or, inside code that must not
    be interrupted, as soon as it has left it (checked every 50 ms)."""
    if not _stopped_by:
        for name in (signal.SIGTERM, signal.SIGINT):  # a second signal does not interrupt the stopping
            signal.signal(name, signal.SIG_IGN)
        _stopped_by.append(signum)
    if not _interruptible(frame):
        signal.signal(signal.SIGALRM, _raise_stopped)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    raise Stopped(_stopped_by[0])


def _check_stopped(node, status):
    """nipype's status callback, before and after each node: a node running in this process (Linear) takes
    any exception for its own failure and nipype goes on with the next; this stops it there."""
    if _stopped_by:
        raise Stopped(_stopped_by[0])


def main(argv=None):
    """Run the BIDS App; returns the process exit status (0 = every participant succeeded)."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network check at nipype import: clusters are offline
    from .parser import parse_args

    opts = parse_args(argv)
    # our own logger only: a root handler would print every nipype line twice (nipype has its own)
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(_CONSOLE_FORMAT)
    handler.setLevel(logging.WARNING - 10 * min(opts.verbose + 1, 2))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)  # the log file gets everything, the console what its handler lets through
    LOGGER.propagate = False
    from ..io.inputs import BIDSInputError

    _stopped_by.clear()
    previous = {name: signal.signal(name, _raise_stopped) for name in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGALRM] = signal.getsignal(signal.SIGALRM)
    try:
        if opts.analysis_level == "group":
            return run_group(opts)
        return run_participant(opts)
    except BIDSInputError as err:
        LOGGER.error("%s", err)
        return 1
    except Stopped as stop:  # what the workflow's plugin started has ended (run_participant); every file is whole
        LOGGER.debug("stopped", exc_info=True)
        LOGGER.error("stopped by %s before the run finished; no file was left half-written, and the same command "
                     "resumes the run (finished steps are kept in %s)", signal.Signals(stop.signum).name,
                     opts.work_dir)
        return 128 + stop.signum
    except Exception as err:  # a bug or an environment problem: one line here, the traceback in a file
        where = _save_traceback()
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            LOGGER.error("no space left on the device%s: free some, or give the output folder and the work "
                         "folder (-w %s) room elsewhere; the same command then resumes the run (traceback in %s)",
                         f" writing {err.filename}" if err.filename else "", opts.work_dir, where)
        else:
            LOGGER.error("unexpected %s: %s (traceback in %s)", type(err).__name__, err, where)
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for name, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, left alone
                signal.signal(name, handler)
        if _log_handler is not None:
            _log_handler.flush()


def _save_traceback():
    """Write the current exception's traceback to the log file (or a temporary file); returns its path, or
    "no file" where neither can be written (a full disk)."""
    text = traceback.format_exc()
    try:
        if _log_handler is not None:
            _log_handler.stream.write(text)
            _log_handler.stream.flush()  # raises where the text did not reach the file (_LogFile.flush would not)
            return _log_handler.baseFilename
        fd, path = tempfile.mkstemp(prefix="metaqsm-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    except OSError:
        return "no file: it could not be written"


def _check_writable(path, what):
    """Raise BIDSInputError unless ``path`` is, or can be created as, a writable folder (nothing is created)."""
    from ..io.inputs import BIDSInputError

    existing = Path(path)
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        where = "exists and is a file" if existing == Path(path) else f"cannot be created: {existing} is a file"
        raise BIDSInputError(f"{path}: the {what} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == Path(path) else f" ({existing}, where it would be created)"
        raise BIDSInputError(f"{path}: the {what} is not writable{where}")


def _start_log_file(work_dir):
    """Send this run's log (metaqsm's at DEBUG, nipype's, tracebacks) to ``<work_dir>/logs/``; returns the path."""
    global _log_handler
    logs = Path(work_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"metaqsm_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.log"
    _log_handler = _LogFile(path, delay=False)
    _log_handler.setFormatter(_FILE_FORMAT)
    _log_handler.setLevel(logging.DEBUG)
    LOGGER.addHandler(_log_handler)
    # nibabel says on the console how it fixes a damaged header (metaqsm's checks say what is wrong instead);
    # the process pool logs a traceback for each task of workers that metaqsm stopped (it says it stopped)
    for name in OTHER_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(_log_handler)
        logger.propagate = False
    return path


def _route_nipype_logging(verbose):
    """nipype's messages go to the log file; with ``-v`` also to the console, except its crash reports
    (ERROR, with tracebacks), which the participant's status line and the crash file already give."""
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(lambda record: record.levelno < logging.ERROR)
    for name in NIPYPE_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        if _log_handler is not None:
            logger.addHandler(_log_handler)
        if verbose:
            logger.addHandler(console)
        logger.propagate = False


def _user_masks(mask_dir, runs):
    from ..io.inputs import BIDSInputError
    from ..io.outputs import output_path

    masks = {}
    for run in runs:
        target = output_path(mask_dir, "brain_mask", run.entities)
        for candidate in (target, target.with_name(target.name.replace(".nii.gz", ".nii"))):
            if candidate.exists():
                masks[run.name] = candidate
                break
        else:
            raise BIDSInputError(f"{target}: no brain mask for run {run.name} in --brain-mask-dir")
    return masks


def _collect(opts, layout, subjects, filters, unreadable):
    """Runs per participant, and the participants whose input is unusable, with the reason.

    ``unreadable``: participant -> messages about its MEGRE sidecars that are not valid JSON (left out of
    ``layout``). A participant fails on metaqsm's own checks of its runs only (the input validation's other
    errors in its files are warnings, see :func:`_log_validation_findings`).
    """
    from ..io.inputs import BIDSInputError, find_megre_runs

    runs_by_subject, user_masks, failed = {}, {}, {}
    for subject in subjects:
        found = find_megre_runs(layout, subject, opts.session_label, filters, opts.phase_sign)
        # an unreadable sidecar is the cause of what the run's checks then find wrong: said alone
        errors = unreadable.get(subject) or [str(result) for _, result in found if isinstance(result, Exception)]
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
            failed[subject] = "; ".join(errors)  # said once, in the participant's status line
            LOGGER.debug("sub-%s cannot be processed: %s", subject, failed[subject])
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
        errors = re.findall(r"^\s*(\w+(?:Error|Exception)): (.+)$", text, re.M)  # nipype indents with a tab
        # an empty crash file (a full disk) names its node in the file name only, without the participant's
        named = re.search(r"-(\w+)-[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}\.txt$", crash.name)
        node_name = node.group(1) if node else named.group(1) if named else "?"
        lines = text.strip().splitlines()
        if f"[Errno {errno.ENOSPC}]" in text or not lines:  # the error that follows it is a missing result file
            message = "no space left on the device"
        else:
            message = f"{errors[-1][0]}: {errors[-1][1]}" if errors else lines[-1].strip()
        subject = re.search(r"\.sub_([A-Za-z0-9]+)_wf\.", node_name)  # see subject_workflow_name
        key = subject.group(1) if subject else "?"
        reasons.setdefault(key, f"step {node_name.split('.')[-1]} failed: {message} (details: {crash})")
    return reasons


def _log_validation_findings(bids_dir, findings, sessions):
    """Raise :class:`BIDSInputError` for the dataset-level errors among the input validation's ``findings``;
    log the others, once each, and return nothing.

    metaqsm's own run checks (MEGRE_RUN) go to the log file only: :func:`_collect` repeats them on the
    selected runs and fails the participant with their message. The validator's errors in a participant's
    files concern BIDS keys or names that metaqsm does not need (e.g. ``SkullStripped``): they are said as
    one WARNING per participant and issue, and do not fail it (a participant's failure is decided by what
    metaqsm needs, not by BIDS conformance). Errors in files of sessions not in ``sessions`` (labels; empty:
    all) are not said. ``findings`` are about the selected participants only (see :func:`run_participant`).
    """
    from ..io.inputs import BIDSInputError

    dataset_errors = [f.message for f in findings if f.subject is None and f.severity == "error"]
    if dataset_errors:
        raise BIDSInputError(f"{bids_dir}: not a valid BIDS dataset: {'; '.join(dataset_errors)} "
                             "(--skip-bids-validation skips this check)")
    grouped = {}
    for finding in findings:
        session = re.search(r"(?:^|/)ses-([A-Za-z0-9]+)/", finding.path or "")
        if finding.code == "MEGRE_RUN":
            LOGGER.debug("%s", finding)
        elif finding.severity != "error":
            LOGGER.warning("%s", finding.message)
        elif not (sessions and session and session.group(1) not in sessions):
            grouped.setdefault((finding.subject, finding.code), []).append(finding)
    for (subject, _), same in grouped.items():
        more = f" (and {len(same) - 1} more file(s) of sub-{subject} with the same issue)" if len(same) > 1 else ""
        LOGGER.warning("%s%s; metaqsm does not need it and goes on", same[0].message, more)


def qsm_options(opts):
    """The keyword arguments of :func:`~metaqsm_bids.workflows.qsm.init_qsm_wf` that the parsed ``opts`` give
    (every run alike; the workflow tests build the graph from them as the CLI does)."""
    from ..qsm.background.registry import BACKGROUND_REMOVALS
    from ..qsm.inversion.registry import INVERSIONS
    from .parser import method_parameters

    return dict(bids_dir=opts.bids_dir, output_dir=opts.output_dir, inversion=opts.inversion,
                inversion_params=method_parameters(opts, INVERSIONS[opts.inversion]), bfr=opts.bfr,
                bfr_params=method_parameters(opts, BACKGROUND_REMOVALS[opts.bfr]),
                bipolar=opts.bipolar, device=opts.device, omp_nthreads=opts.omp_nthreads,
                output_spaces=opts.output_spaces, r2star_method=opts.r2star_method, reference=opts.reference,
                swi_phase_sign=opts.swi_phase_sign, mip_slab_mm=opts.mip_slab_mm)


def pipeline_settings(opts):
    """The keyword arguments of :func:`~metaqsm_bids.steps.pipeline.reconstruct` (the in-process pipeline) that the
    parsed ``opts`` give: those of :func:`qsm_options` it takes, so that it runs what the CLI runs."""
    from inspect import signature

    from ..steps.pipeline import reconstruct

    taken = signature(reconstruct).parameters
    return {name: value for name, value in qsm_options(opts).items() if name in taken}


def run_participant(opts):
    """Participant level: reconstruct every selected run; one failure does not stop the others."""
    _check_writable(opts.output_dir, "output directory")
    _check_writable(opts.work_dir, "work directory")
    runs_by_subject, user_masks, failed = _select_runs(opts)
    if failed and opts.stop_on_first_crash:
        runs_by_subject = {}  # nothing is processed
    if runs_by_subject:
        _run_workflow(opts, runs_by_subject, user_masks, failed)
    _report_subjects(opts, runs_by_subject, failed)
    return 1 if failed else 0


def _select_runs(opts):
    """The selected runs by subject, the user's masks and the subjects already failed (subject -> reason), after
    checking the participants' folders, the filters and (unless skipped) validating the dataset."""
    from ..io.inputs import (bare_label, check_bids_filters, check_participant_folders, index_dataset,
                             load_bids_filters, participant_labels)
    from ..io.validation import validate_input

    filters = load_bids_filters(opts.bids_filter_file) if opts.bids_filter_file else {}  # before the long indexing
    log_file = _start_log_file(opts.work_dir)
    LOGGER.debug("metaqsm %s; log file %s", " ".join(sys.argv), log_file)
    # the selected participants' files and the dataset-level ones only: a one-participant task of a large study
    # (a SLURM array task) reads its own participant, not the whole dataset
    participants = [bare_label(label) for label in opts.participant_label] if opts.participant_label else None
    # said as such before the validator sees a view of the dataset without that participant's folder
    check_participant_folders(opts.bids_dir, participants)
    if not opts.skip_bids_validation:
        sessions = [re.sub(r"^ses-", "", s) for s in opts.session_label or []]
        _log_validation_findings(opts.bids_dir, validate_input(opts.bids_dir, participants=participants), sessions)
    layout, unreadable = index_dataset(opts.bids_dir, participants)
    if filters:
        check_bids_filters(filters, opts.bids_filter_file, layout)
    subjects = participant_labels(layout, opts.participant_label)
    return _collect(opts, layout, subjects, filters, unreadable)


def _configure_nipype(opts, crash_dir):
    """nipype's execution (crash files in ``crash_dir``, a short poll), monitoring and logging settings for the run."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

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
        "logging": {level: ("INFO", "INFO", "DEBUG")[min(opts.verbose, 2)]
                    for level in ("workflow_level", "interface_level", "utils_level")},
    })
    nipype_logging.update_logging(nipype_config)
    _route_nipype_logging(opts.verbose)


def _run_workflow(opts, runs_by_subject, user_masks, failed):
    """Build and run the workflow of ``runs_by_subject``; a subject whose step crashed moves from
    ``runs_by_subject`` to ``failed`` (in place) with the crash's reason."""
    from ..io.derivatives import ensure_dataset_description
    from ..io.inputs import BIDSInputError
    from ..workflows.base import init_metaqsm_wf
    from .plugins import add_resource_hints, make_runner, stop_runner

    try:
        ensure_dataset_description(opts.output_dir, opts.bids_dir)
    except OSError as err:
        raise BIDSInputError(f"{err.filename or opts.output_dir}: cannot write the output directory: "
                             f"{err.strerror or err}") from err
    crash_dir = opts.work_dir / "crash"
    crash_dir.mkdir(parents=True, exist_ok=True)
    _configure_nipype(opts, crash_dir)
    wf = init_metaqsm_wf(runs_by_subject, work_dir=opts.work_dir, user_masks=user_masks, **qsm_options(opts))
    add_resource_hints(wf, opts.plugin)
    started = time.time() - 1
    runner = make_runner(opts.plugin, {**opts.plugin_args, "status_callback": _check_stopped})
    try:
        wf.run(plugin=runner)
    except (Stopped, Exception) as err:  # nipype: "Workflow did not execute cleanly" (or the node's error)
        if _stopped_by:  # stopped; or a step run in this process took the stop for its own failure
            stop_runner(runner)
            raise Stopped(_stopped_by[0]) from err
        reasons = _crash_reasons(crash_dir, started)
        if not reasons:
            raise
        LOGGER.debug("nipype: %s", err, exc_info=True)
        unattributed = reasons.pop("?", None)  # a crash file naming no participant: none of them is known whole
        for subject in runs_by_subject if unattributed else ():
            reasons.setdefault(subject, unattributed)
        for subject, reason in reasons.items():
            failed[subject] = reason
            runs_by_subject.pop(subject, None)


def _report_subjects(opts, runs_by_subject, failed):
    """Each subject's report (where it has outputs) and its console line, OK or FAILED with the reason."""
    from ..reports import write_subject_report

    for subject in sorted(set(runs_by_subject) | set(failed)):
        if (opts.output_dir / f"sub-{subject}").exists():
            write_subject_report(opts.output_dir, subject, opts.bids_dir)
        if subject in failed:
            LOGGER.debug("sub-%s: FAILED: %s", subject, failed[subject])
            print(f"sub-{subject}: FAILED: {failed[subject]}", file=sys.stderr)
        else:
            print(f"sub-{subject}: OK ({len(runs_by_subject[subject])} run(s)) -> {opts.output_dir}")


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
