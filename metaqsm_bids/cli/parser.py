"""Command-line arguments of ``metaqsm`` (BIDS-Apps convention)."""
import argparse
import os
from dataclasses import fields
from pathlib import Path

from .. import __version__
from ..qsm.background.registry import BACKGROUND_REMOVALS, DEFAULT_BACKGROUND_REMOVAL
from ..qsm.field.bipolar import BIPOLAR_MODES, BIPOLAR_THRESHOLD_RAD, DEFAULT_BIPOLAR
from ..qsm.field.relaxometry import DEFAULT_METHOD as DEFAULT_R2STAR_METHOD, METHOD_CHOICES as R2STAR_METHODS
from ..qsm.field.phase_sign import PHASE_SIGN_CHOICES
from ..qsm.inversion.registry import DEFAULT_INVERSION, INVERSIONS
from ..qsm.network.device import DEFAULT_DEVICE, DEVICE_CHOICES
from ..qsm.field.swi import DEFAULT_SWI_PHASE_SIGN, MIP_SLAB_MM, SWI_MASK_POWER, SWI_PHASE_SIGNS, SWI_TARGET_TE_S
from ..qsm.reference import DEFAULT_REFERENCE, REFERENCE_CHOICES
from .plugins import plugin_settings


def _existing_dir(value):
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: not a directory")
    return path


def _existing_file(value):
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return path


def _positive_float(value):
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value}: must be > 0")
    return number


def _positive_int(value):
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value}: must be a whole number > 0") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value}: must be a whole number > 0")
    return number


def _lambda_or_off(value):
    """A positive finite weight, or 0 for off (returned as None)."""
    number = float(value)
    if not (number >= 0 and number < float("inf")):
        raise argparse.ArgumentTypeError(f"{value}: must be > 0, or 0 for off")
    return number or None


def _count_or_off(value):
    """A whole number > 0, or 0 for off (returned as None)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value}: must be a whole number > 0, or 0 for off") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be a whole number > 0, or 0 for off")
    return number or None


#: Argument types of the parameters' checks (:data:`metaqsm_bids.qsm.spec.CHECKS`).
_CHECK_TYPES = {"positive": _positive_float, "positive_int": _positive_int, "positive_or_off": _lambda_or_off,
                "count_or_off": _count_or_off, None: float}


def _dest(option):
    """The attribute of the parsed arguments that holds ``option``'s value."""
    return option.lstrip("-").replace("-", "_")


def _add_method_arguments(group, option, methods, default, help_text):
    """The option choosing one of ``methods`` (a registry), then each option of their parameters, once (methods
    may share one), named after the methods that take it."""
    group.add_argument(option, choices=sorted(methods), default=default, help=help_text + ": " + "; ".join(
        f"'{name}': {spec.description}" for name, spec in sorted(methods.items())))
    options = {}
    for spec in methods.values():
        for field in fields(spec.parameters):
            options.setdefault(spec.option(field), (field, []))[1].append(spec.name)
    for name, (field, users) in options.items():
        meta = field.metadata
        unit = f" ({meta['unit']})" if meta["unit"] else ""
        off = " (0: off)" if meta["check"] in ("positive_or_off", "count_or_off") else ""
        kind = {"choices": meta["choices"]} if meta["choices"] else {"type": _CHECK_TYPES[meta["check"]]}
        group.add_argument(name, default=field.default, metavar=meta["metavar"], **kind,
                           help=f"{meta['help']}{unit}{off}; with {option} {', '.join(users)}")


def method_parameters(opts, spec):
    """The parameters of the method ``spec`` that the parsed ``opts`` give, by name."""
    return {field.name: getattr(opts, _dest(spec.option(field))) for field in fields(spec.parameters)}


def _output_space(value):
    from ..spatial.template import parse_output_space

    try:
        parse_output_space(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return value


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already names its default or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser():
    """The ``metaqsm`` argument parser.

    Long by design: one flat list of the options in the order ``--help`` prints them.
    """
    parser = argparse.ArgumentParser(
        prog="metaqsm",
        description="Quantitative susceptibility mapping (ppm) from multi-echo GRE BIDS data. "
                    "The output directory becomes a BIDS derivatives dataset.",
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=_existing_dir, help="the root of the input BIDS dataset")
    parser.add_argument("output_dir", type=lambda p: Path(p).expanduser().resolve(),
                        help="the derivatives dataset to write (created if missing)")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="'participant' reconstructs each run; 'group' writes a dataset-level summary table "
                             "(group_summary.tsv) of the runs found in output_dir")
    parser.add_argument("--version", action="version", version=f"metaqsm {__version__}")

    bids = parser.add_argument_group("Selecting data")
    bids.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                      help="participants to process (with or without 'sub-'); default: all")
    bids.add_argument("--session-label", nargs="+", metavar="LABEL", help="sessions to process; default: all")
    bids.add_argument("--bids-filter-file", type=lambda p: Path(p).expanduser().resolve(), metavar="FILE",
                      help="JSON object of pybids entity filters applied to the MEGRE files, "
                           "e.g. {\"acquisition\": \"highres\"}")
    bids.add_argument("--skip-bids-validation", action="store_true",
                      help="do not validate the input dataset (bids-validator-deno if installed, else pybids)")
    bids.add_argument("--brain-mask-dir", type=_existing_dir, metavar="DIR",
                      help="a derivatives dataset with *_desc-brain_mask.nii[.gz] files named like the runs; "
                           "those masks replace the computed ones")

    scanner = parser.add_argument_group("Data from your scanner (see the README)")
    scanner.add_argument("--phase-sign", choices=PHASE_SIGN_CHOICES, default="auto",
                         help="sign of the stored phase relative to metaqsm's convention (phase = phi0 + 2 pi f TE, "
                              "f > 0 in paramagnetic tissue): 'auto' negates it for Manufacturer Siemens and "
                              "Philips, keeps it for GE, and keeps it with a warning for any other vendor")
    scanner.add_argument("--bipolar", choices=BIPOLAR_MODES, default=DEFAULT_BIPOLAR,
                         help="odd/even echo phase error of bipolar (alternating) readouts, an offset plus a linear "
                              "gradient: 'auto' estimates it with 3+ equally spaced echoes and removes it when it "
                              f"exceeds {BIPOLAR_THRESHOLD_RAD} rad somewhere in the brain; 'on' always removes it")

    qsm = parser.add_argument_group("Reconstruction")
    _add_method_arguments(qsm, "--inversion", INVERSIONS, DEFAULT_INVERSION, "dipole inversion")
    _add_method_arguments(qsm, "--bfr", BACKGROUND_REMOVALS, DEFAULT_BACKGROUND_REMOVAL,
                          "background field removal")
    qsm.add_argument("--r2star-method", choices=R2STAR_METHODS, default=DEFAULT_R2STAR_METHOD,
                     help="fit of the R2*/T2* maps with 3+ echoes: 'loglinear' (least squares of log |S| weighted "
                          "by |S|^2, any echo spacing) or 'arlo' (Pei et al. 2015; equally spaced echoes, else "
                          "loglinear); 2 echoes take the closed form, 1 echo gives no R2* map")
    qsm.add_argument("--reference", choices=REFERENCE_CHOICES, default=DEFAULT_REFERENCE,
                     help="region whose mean susceptibility is 0 in the Chimap: 'brain' (the QSM mask; what the "
                          "inversion gives, as the 2024 QSM consensus recommends reporting), 'csf' (the ventricles, "
                          "found by their low R2*; 2+ echoes; written as desc-reference_mask) or 'none' (the "
                          f"inversion's output); the mean subtracted is in the Chimap's sidecar (default: "
                          f"{DEFAULT_REFERENCE})")

    swi = parser.add_argument_group("SWI (always written: under a second)")
    swi.add_argument("--swi-phase-sign", choices=SWI_PHASE_SIGNS, default=DEFAULT_SWI_PHASE_SIGN,
                     help="sign of the SWI phase (-2 pi x local field x TE, the echo nearest "
                          f"{SWI_TARGET_TE_S * 1000:g} ms) that the phase mask (power {SWI_MASK_POWER}) darkens: "
                          "'negative' darkens paramagnetic tissue (veins, iron: standard SWI), 'positive' diamagnetic "
                          "(calcifications); the vendor's phase sign is --phase-sign's business "
                          f"(default: {DEFAULT_SWI_PHASE_SIGN})")
    swi.add_argument("--mip-slab-mm", type=_positive_float, default=MIP_SLAB_MM,
                     help="thickness (mm) of the slab of the SWI's minimum-intensity projection along the slice axis "
                          "(the odd number of slices nearest to it)")

    spaces = parser.add_argument_group("Output spaces")
    spaces.add_argument("--output-spaces", nargs="+", default=["orig"], type=_output_space, metavar="SPACE",
                        help="'orig' (the run's grid; always written) and/or templateflow templates as "
                             "NAME[:res-N] (e.g. MNI152NLin2009cAsym:res-2; res-2 when omitted): the magnitude is "
                             "registered to each template with ANTs and the Chimap, masks and magnitude are "
                             "resampled there (space-<NAME>_res-<N> files, *_xfm.* transforms). Needs "
                             "pip install 'metaqsm[templates]' and the template in TEMPLATEFLOW_HOME (or network); default: orig")

    perf = parser.add_argument_group("Execution")
    perf.add_argument("-w", "--work-dir", type=lambda p: Path(p).expanduser().resolve(),
                      default=Path("work").resolve(), help="nipype working directory: the cache that reruns reuse, logs/ and crash/; default: ./work")
    perf.add_argument("--nprocs", "--nthreads", type=int, default=os.cpu_count(),
                      help="processes nipype's MultiProc plugin may run at once (1 = Linear plugin)")
    perf.add_argument("--nipype-plugin-file", type=_existing_file, metavar="FILE",
                      help="YAML file {plugin: MultiProc|Linear|SLURM|SLURMGraph, plugin_args: {...}} "
                           "(as in fMRIPrep); overrides the MultiProc/Linear choice of --nprocs")
    perf.add_argument("--omp-nthreads", type=int, default=None,
                      help="threads per process for FFTs and torch (default: --nprocs, capped at 8)")
    perf.add_argument("--device", choices=DEVICE_CHOICES, default=DEFAULT_DEVICE,
                      help="where torch-based inversions run; auto = CUDA when available")
    perf.add_argument("--stop-on-first-crash", action="store_true",
                      help="stop at the first failing participant instead of processing the rest")
    perf.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat for more)")
    return parser


def parse_args(argv=None):
    """Parse and cross-check the arguments."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.output_dir == opts.bids_dir or opts.bids_dir in opts.output_dir.parents and \
            "derivatives" not in opts.output_dir.relative_to(opts.bids_dir).parts:
        parser.error("output_dir must not be the BIDS dataset itself (use e.g. <bids_dir>/derivatives/metaqsm)")
    if opts.nprocs < 1:
        parser.error("--nprocs must be >= 1")
    if opts.omp_nthreads is None:
        opts.omp_nthreads = min(opts.nprocs, 8)
    if opts.omp_nthreads < 1:
        parser.error("--omp-nthreads must be >= 1")
    try:
        opts.plugin, opts.plugin_args = plugin_settings(opts.nprocs, opts.nipype_plugin_file)
    except ValueError as err:
        parser.error(str(err))
    opts.output_spaces = _check_output_spaces(parser, opts.output_spaces)
    return opts


def _check_output_spaces(parser, values):
    """``--output-spaces`` values -> ``[(name, resolution)]`` without repeats ("X" and "X:res-2" are one space).

    Template spaces are checked here, before any processing: antspyx, templateflow and the files.
    """
    if values == ["orig"]:  # the default: nothing to import
        return [("orig", None)]
    from ..spatial.template import check_output_spaces, parse_output_space

    spaces = list(dict.fromkeys(map(parse_output_space, values)))
    templates = [space for space in spaces if space[0] != "orig"]
    if templates:
        try:
            check_output_spaces(templates)
        except ValueError as err:
            parser.error(f"--output-spaces: {err}")
    return spaces
