"""What a report says about a run, read back from the derivatives dataset: files, checks, timings, methods.

Everything is read post hoc from the output directory (and optionally the raw dataset),
so a report can be written after a crash-resume, for one session, or long after the run.
"""
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..io.derivatives import RELIABILITY_KEYS
from ..io.outputs import OUTPUTS, parse_output_name, run_name, sidecar_path
from ..qsm.background.registry import BACKGROUND_REMOVALS
from ..qsm.inversion.registry import INVERSIONS
from ..qsm.network.models import PAPER
from ..qsm.spec import find
from .figures import RunImages

#: Derivative kinds a report reads (keys of the output spec, :data:`~metaqsm_bids.io.outputs.OUTPUTS`): the images
#: of :class:`~metaqsm_bids.reports.figures.RunImages`.
KINDS = tuple(f.name for f in fields(RunImages) if f.name in OUTPUTS)
#: Kinds a run has only with two echoes or more (one echo has no decay to fit): not missing without them.
MULTI_ECHO_KINDS = tuple(kind for kind in KINDS if OUTPUTS[kind].written == "two echoes or more")

#: Pipeline steps in processing order (sidecar keys holding each step's parameters).
STEP_ORDER = ("PhaseScaling", "BrainMask", "TotalField", "BackgroundFieldRemoval", "DipoleInversion")

# QC thresholds. A brain mask below 1% of the field of view is a failed mask; above 60% it
# holds background or scalp (a whole-head FOV puts the brain at 10-40%). PDF keeps the reliable
# voxels, RESHARP erodes them by its kernel radius: keeping under half the brain means the
# reliability map dropped much of it, or the radius is large for the FOV. Brain tissue lies
# within +-0.5 ppm (veins and iron-rich nuclei included), so more than 0.5% of the QSM mask
# beyond +-1 ppm points at unwrapping errors, streaks or bad masking.
MASK_FRACTION_RANGE = (0.01, 0.60)
QSM_MASK_MIN_FRACTION_OF_BRAIN = 0.5
CHI_EXTREME_PPM = 1.0
#: Phase-sign check: veins and iron-rich deep grey matter make chi's positive tail (99.5th percentile minus
#: the median, in the QSM mask) longer than its negative one; a negative tail this many times longer than
#: the positive one says the map looks inverted. Measured on the small heads of tests/test_scanner_data.py: 0.67
#: right (1.04 with one echo), 1.50 inverted, since calcifications stay in the map (an inverted one lengthens
#: the positive tail); before that 0.37 right, 2.7 inverted on the demo.
CHI_INVERTED_TAIL_RATIO = 1.3
CHI_EXTREME_MAX_FRACTION = 0.005


@dataclass
class RunOutputs:
    """The derivatives of one run found in an output directory.

    name: run prefix such as ``sub-01_ses-2_run-1``; entities: its BIDS key -> label (``{"sub": "01", ...}``);
    paths: kind (see :data:`KINDS`) -> NIfTI path or None; sidecars: kind -> parsed JSON sidecar ({} if absent).
    spaces: template space (``<template>_res-<n>``) -> {kind: NIfTI path} of the maps resampled there;
    transforms: template -> (transform path, its parsed JSON sidecar).
    """

    name: str
    entities: dict
    paths: dict
    sidecars: dict = field(default_factory=dict)
    spaces: dict = field(default_factory=dict)
    transforms: dict = field(default_factory=dict)

    @property
    def session(self):
        """Session label, or None."""
        return self.entities.get("ses")

    @property
    def provenance(self):
        """The sidecar with every step's parameters: the Chimap's, else the most complete one found."""
        candidates = [self.sidecars.get(kind) or {} for kind in ("chimap", "qsm_mask", "local_field",
                                                                 "brain_mask", "total_field", "magnitude")]
        return max(candidates, key=lambda s: sum(key in s for key in STEP_ORDER))


def run_entities(name):
    """``sub-01_ses-2_run-1`` -> ``{"sub": "01", "ses": "2", "run": "1"}``."""
    return dict(part.split("-", 1) for part in name.split("_"))


def subject_label(subject):
    """``"sub-01"`` or ``"01"`` -> ``"01"``; raises ValueError on labels BIDS does not allow."""
    label = re.sub(r"^sub-", "", str(subject))
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise ValueError(f"invalid participant label {subject!r}: BIDS labels are letters and digits only")
    return label


def _sidecar(path):
    sidecar = sidecar_path(path)
    return json.loads(sidecar.read_text()) if sidecar.exists() else {}


def find_run_outputs(output_dir, subject):
    """Runs of ``subject`` with at least one orig-space derivative in ``output_dir``, sorted by name,
    with their template-space maps and transforms (each file's kind and entities from the output spec)."""
    output_dir = Path(output_dir)
    label = subject_label(subject)
    found, spaces, transforms = {}, {}, {}
    for path in sorted((output_dir / f"sub-{label}").glob("**/*")):
        parsed = parse_output_name(path.name)
        if parsed is None or parsed[1].get("subject") != label:
            continue
        kind, entities = parsed
        run = run_name(entities)
        if kind == "transform":
            transforms.setdefault(run, {})[entities["to"]] = (path, _sidecar(path))
        elif kind not in KINDS:
            continue
        elif "space" in entities:
            space = entities["space"] + (f"_res-{entities['res']}" if "res" in entities else "")
            spaces.setdefault(run, {}).setdefault(space, {})[kind] = path
        else:
            found.setdefault(run, {})[kind] = path
    runs = []
    for prefix, paths in sorted(found.items()):
        sidecars = {kind: _sidecar(path) for kind, path in paths.items()}
        runs.append(RunOutputs(prefix, run_entities(prefix), {k: paths.get(k) for k in KINDS}, sidecars,
                               spaces.get(prefix, {}), transforms.get(prefix, {})))
    return runs


def find_raw_runs(bids_dir, subject):
    """Names (``sub-01_ses-2_run-1``) of the MEGRE runs of ``subject`` in the raw dataset, sorted."""
    label = subject_label(subject)
    names = set()
    for path in Path(bids_dir).glob(f"sub-{label}/**/anat/sub-{label}_*_MEGRE.nii*"):
        stem = re.sub(r"\.nii(\.gz)?$", "", path.name)
        names.add("_".join(p for p in stem.split("_")[:-1] if not p.startswith(("echo-", "part-"))))
    return sorted(names)


#: What each step's ``ElapsedSeconds`` measures (the wall time of the step's computation, inside its node),
#: for the report's timing table.
STEP_MEASURES = {
    "PhaseScaling": "phase scaling: reading and decompressing every echo's NIfTI files, stacking the echoes, "
                    "scaling the phase to rad",
    "BrainMask": "brain mask: RSS magnitude, threshold and morphology",
    "TotalField": "total field: unwrapping and the fit over echoes",
    "BackgroundFieldRemoval": "background field removal",
    "DipoleInversion": "dipole inversion",
    "SusceptibilityReference": "susceptibility reference: finding the region, subtracting its mean",
}


def step_timings(sidecar):
    """``[(step, seconds)]`` for every step with ``ElapsedSeconds`` in ``sidecar``, in processing order."""
    steps = [(key, float(value["ElapsedSeconds"])) for key, value in sidecar.items()
             if isinstance(value, dict) and "ElapsedSeconds" in value]
    order = {name: n for n, name in enumerate(STEP_ORDER)}
    return sorted(steps, key=lambda item: (order.get(item[0], len(order)), item[0]))


def run_timings(run):
    """:func:`step_timings` of the run's provenance, then each template space's registration and resampling."""
    return step_timings(run.provenance) + [
        (f"Template space {template}", float(sidecar["ElapsedSeconds"]))
        for template, (_, sidecar) in sorted(run.transforms.items()) if "ElapsedSeconds" in sidecar]


def sidecar_warnings(run):
    """Messages from ``Warnings`` entries (a string or list) at the top level or inside any step of any sidecar."""
    messages = []

    def collect(value, where):
        for message in [value] if isinstance(value, str) else value or []:
            text = f"{where}: {message}" if where else str(message)
            if text not in messages:
                messages.append(text)

    for sidecar in [*run.sidecars.values(), *(sidecar for _, sidecar in run.transforms.values())]:
        collect(sidecar.get("Warnings"), "")
        for key, value in sidecar.items():
            if isinstance(value, dict):
                collect(value.get("Warnings"), key)
    return messages


def run_checks(run, images):
    """Statistics of a run's maps and the warnings they raise (see the thresholds in this module).

    ``images`` is the run's :class:`~metaqsm_bids.reports.figures.RunImages`. Returns ``(stats, warnings)``:
    stats holds mask sizes (voxels, mL, fractions), the brain-mask voxels the reliability map excludes, and chi
    statistics in the QSM mask (ppm).
    """
    single_echo = len(run.provenance.get("EchoTime") or []) == 1
    warnings = [f"missing derivative: {OUTPUTS[kind].tail}" for kind, path in run.paths.items()
                if path is None and not (single_echo and kind in MULTI_ECHO_KINDS)]
    stats = {}
    voxel_ml = float(np.prod(images.zooms_mm)) / 1000.0
    brain, qsm, chi = images.brain_mask, images.qsm_mask, images.chimap
    if brain is not None:
        stats["brain_mask_voxels"] = int(brain.sum())
        stats["brain_volume_ml"] = stats["brain_mask_voxels"] * voxel_ml
        stats["brain_fraction_of_fov"] = float(brain.mean())
        low, high = MASK_FRACTION_RANGE
        if stats["brain_fraction_of_fov"] < low:
            warnings.append(f"brain mask covers only {100 * brain.mean():.2f}% of the field of view "
                            f"(expected >= {100 * low:g}%): masking probably failed")
        elif stats["brain_fraction_of_fov"] > high:
            warnings.append(f"brain mask covers {100 * brain.mean():.0f}% of the field of view (expected <= "
                            f"{100 * high:g}%): it probably includes scalp or background")
    if brain is not None and images.reliable_mask is not None and brain.any():
        stats["unreliable_voxels"] = int((brain & ~images.reliable_mask).sum())
        stats["unreliable_fraction_of_brain"] = stats["unreliable_voxels"] / stats["brain_mask_voxels"]
    if qsm is not None:
        stats["qsm_mask_voxels"] = int(qsm.sum())
        if brain is not None and brain.any():
            stats["qsm_fraction_of_brain"] = float(qsm.sum() / brain.sum())
            if stats["qsm_fraction_of_brain"] < QSM_MASK_MIN_FRACTION_OF_BRAIN:
                warnings.append(f"the QSM mask keeps only {100 * stats['qsm_fraction_of_brain']:.0f}% of the brain "
                                "mask: many voxels without signal reach the brain mask's surface (see the "
                                "reliability map), or the background-removal kernel is large for this field of view (with --bfr resharp "
                                "or vsharp; TFI, the default, and PDF do not erode)")
        if not qsm.any():
            warnings.append("the QSM mask is empty: no susceptibility values")
    for kind in ("total_field", "local_field", "chimap", "r2star"):
        volume = getattr(images, kind)
        if volume is not None and not np.isfinite(volume).all():
            warnings.append(f"{OUTPUTS[kind].tail} holds {int((~np.isfinite(volume)).sum())} NaN or infinite voxels")
    if chi is not None and qsm is not None and qsm.any():
        values = chi[qsm & np.isfinite(chi)]
        stats.update(chi_mean_ppm=float(values.mean()), chi_sd_ppm=float(values.std()),
                     chi_p1_ppm=float(np.percentile(values, 1)), chi_p99_ppm=float(np.percentile(values, 99)),
                     chi_extreme_fraction=float((np.abs(values) > CHI_EXTREME_PPM).mean()))
        median = float(np.median(values))
        positive, negative = np.percentile(values, 99.5) - median, median - np.percentile(values, 0.5)
        stats["chi_tail_ratio"] = float(negative / positive) if positive > 0 else float("inf")
        if stats["chi_tail_ratio"] > CHI_INVERTED_TAIL_RATIO:
            sign = run.provenance.get("PhaseScaling", {})
            warnings.append(f"the Chimap looks inverted: its negative tail is {stats['chi_tail_ratio']:.1f}x its "
                            "positive one, but veins and iron-rich deep grey matter should be the strongest "
                            "positive values (phase sign used: "
                            f"{sign.get('PhaseSignReason', 'not recorded')}); check the veins and, if they are "
                            "dark, rerun with the other --phase-sign")
        if stats["chi_extreme_fraction"] > CHI_EXTREME_MAX_FRACTION:
            warnings.append(f"{100 * stats['chi_extreme_fraction']:.1f}% of the QSM mask lies beyond "
                            f"+-{CHI_EXTREME_PPM:g} ppm (tissue is within +-0.5 ppm): look for phase-unwrapping "
                            "errors, streaking or a mask that includes non-brain tissue")
    resharp = run.provenance.get("BackgroundFieldRemoval", {})
    if resharp.get("Iterations") is not None and resharp.get("MaxIterations") is not None \
            and resharp["Iterations"] >= resharp["MaxIterations"]:
        warnings.append(f"background field removal stopped at its iteration limit ({resharp['MaxIterations']}) "
                        f"with relative residual {resharp.get('RelativeResidual', float('nan')):.2g}")
    return stats, warnings + sidecar_warnings(run)


#: References the methods paragraph cites besides the methods' own (their specs' ``citations``), by key.
CITATIONS = {
    "metaqsm": PAPER,
    "pei2015": "Pei M, Nguyen TD, Thimmappa ND, Salustri C, Dong F, Cooper MA, Li J, Prince MR, Wang Y. Algorithm "
               "for fast monoexponential fitting based on auto-regression on linear operations (ARLO) of data. "
               "Magn Reson Med. 2015;73(2):843-850.",
    "schofield2003": "Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric applications. "
                     "Opt Lett. 2003;28(14):1194-1196.",
}
#: The registries of the steps whose method has a spec: sidecar step key -> (registry, unknown method's words).
_METHOD_STEPS = {"BackgroundFieldRemoval": (BACKGROUND_REMOVALS, "{}"),
                 "DipoleInversion": (INVERSIONS, "the '{}' dipole inversion")}


def references():
    """Every reference the methods paragraph may cite, by key: :data:`CITATIONS` and the methods' own."""
    refs = dict(CITATIONS)
    for methods, _ in _METHOD_STEPS.values():
        for spec in methods.values():
            refs.update(spec.citations)
    return refs


#: Step keys that are bookkeeping, not user-chosen parameters.
_NOT_PARAMETERS = {"Method", "Units", "ElapsedSeconds", "B0DirectionVoxel", "VoxelSizeMm", "MagneticFieldStrength",
                   "Warnings", "EchoTime", "Input", "Voxels", "Iterations", "RelativeResidual",
                   # the reliability map's and the completion's: they have a sentence of their own, their counts
                   # differ per run
                   *RELIABILITY_KEYS, "UnreliableVoxels", "CompletedVoxels", "CompletionIterations"}


def format_value(value):
    """A sidecar value as text: floats with %g (a rounded -0 as 0), lists comma-separated, true/false as yes/no,
    a record as its "key value" pairs separated by semicolons (lists in it in brackets)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value + 0.0:g}"  # -0.0 + 0.0 is 0.0
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{key} [{format_value(v)}]" if isinstance(v, (list, tuple)) else f"{key} {format_value(v)}"
                         for key, v in value.items())
    return str(value)


#: How the step parameters that no method's spec declares read in prose: key -> (words before, unit after).
_PARAMETER_WORDS = {"Tikhonov": ("Tikhonov regularisation", ""),
                    "Tolerance": ("tolerance", ""), "MaxIterations": ("at most", " iterations"),
                    "OrientationPasses": ("network passes", ""), "Lambda": ("lambda", ""),
                    "Threshold": ("threshold", ""), "Rho": ("ADMM penalty", ""),
                    "PolynomialOrder": ("a background polynomial of degree", ""),
                    "PadVoxels": ("room for the outside dipoles", " voxels per side"),
                    "Preconditioner": ("preconditioner outside the mask", ""),
                    "FirstCGIterations": ("CG iterations in the first step", ""),
                    "CGIterations": ("in each later one", ""), "CoarseFactors": ("coarse-grid blocks of", " voxels"),
                    "EdgePercentage": ("MEDI's edge percentage", ""),
                    "Weighting": ("weighting", "")}


def _parameters_text(step, spec=None):
    """The step's parameters in brackets: those of its method's ``spec`` first, in their order."""
    items = []
    own = spec.parameter_words() if spec else {}
    prose = {**own, **{k: words for k, words in _PARAMETER_WORDS.items() if k not in own}}
    keys = [k for k in prose if k in step] + sorted(k for k in step if k not in prose)
    for key, value in ((k, step[k]) for k in keys):
        # a method's own setting is said even where its key is elsewhere a diagnostic (TV-ADMM's Iterations)
        if (key in own or key not in _NOT_PARAMETERS) and value is not None:  # None: a step switched off, not said
            words, unit = prose.get(key, (key, ""))
            items.append(f"{words} {format_value(value)}{unit}")
    return f" ({'; '.join(items)})" if items else ""


def _method_text(key, step, unrecorded):
    """``(text, citation keys)``: the words for the method of the sidecar's step ``key`` (its spec's description
    and citations, found by the sidecar's ``Method``), then its parameters."""
    methods, unknown = _METHOD_STEPS[key]
    method = str(step.get("Method", unrecorded))
    spec = find(methods, method)
    keys = list(spec.citations) if spec else []
    description = spec.description if spec else unknown.format(method)
    return description + "".join(f" [{k}]" for k in keys) + _parameters_text(step, spec), keys


def _phase_text(scaling):
    """The methods sentence on how the phase was read: its storage, scale and sign."""
    if "real" in str(scaling.get("Input", "")):
        text = "Magnitude and phase were computed from the real and imaginary images."
    else:
        units, convention = scaling.get("PhaseUnits", "unrecorded units"), scaling.get("PhaseConvention")
        if units == "inferred from range":
            text = ("Phase images without recorded units were scaled to radians, the units inferred from their "
                    f"value range{f' ({convention})' if convention else ''}.")
        elif units == "rad" or str(convention).startswith("radians"):
            text = "Phase images were stored in radians."
        else:
            text = (f"Phase images stored as {convention or 'vendor integer units'} were scaled to radians with "
                    "one scale for all echoes.")
    if scaling.get("PhaseSignFactor") == -1:
        text += (" The phase was negated (the vendor's sign convention), so that the field is positive in "
                 "paramagnetic tissue.")
    return text


def _b0_text(sidecar, nominal):
    """How the B0 that scales ppm was obtained, when it is not simply the nominal field strength."""
    b0, source = sidecar.get("B0Tesla"), str(sidecar.get("B0Source", ""))
    if b0 is None or not source.startswith("ImagingFrequency"):
        return ""
    if nominal and abs(b0 - nominal) <= 1e-4 * nominal:
        return ""
    return f" (B0 = {b0:.4f} T from the imaging frequency, used to convert the field to ppm)"


def _reference_text(reference):
    """What the Chimap's values are relative to, from the sidecar's ``SusceptibilityReference``."""
    region = reference.get("Region", "brain")
    if region == "csf":
        return (f"relative to the mean of the ventricular cerebrospinal fluid ({reference.get('Voxels', 0)} voxels "
                "of low R2* deep in the mask)")
    if region == "none":
        return "as the inversion returned it (its mean within the mask where the local field is defined is 0)"
    return "relative to its mean within the mask where the local field is defined (the whole brain)"


def _acquisition_text(sidecar, echo_times):
    """The methods' opening sentence: metaqsm's version, the echoes and the field strength."""
    version = _software_version(sidecar.get("SoftwareVersions", ""), "metaqsm")
    te_text = ", ".join(f"{1000 * te:g}" for te in echo_times)
    field = sidecar.get("MagneticFieldStrength")
    return (f"Quantitative susceptibility maps were reconstructed with metaqsm{' ' + version if version else ''} "
            f"[metaqsm] from {len(echo_times)} echo{'es' if len(echo_times) != 1 else ''} (TE = {te_text} ms) of a "
            f"{'multi-echo ' if len(echo_times) > 1 else ''}gradient-echo acquisition"
            f"{f' at {field:g} T' if field else ''}{_b0_text(sidecar, field)}.")


def _mask_text(mask):
    """The sentences on the brain mask, from the sidecar's ``BrainMask``."""
    if mask.get("Method") == "user-provided":
        return ["The brain mask was provided by the user."]
    # prose without the trailing code reference, e.g. "(metaqsm_bids.qsm.mask.brain.brain_mask)" or
    # "(metaqsm brain_mask)"
    method = re.sub(r"\s*\((?:metaqsm )?[\w.]+\)$", "", mask.get("Method", "method not recorded"))
    method = method.replace(" + ", " and ")
    sentences = [f"A brain mask was computed from the {mask.get('Input', 'magnitude')} ({method})."]
    if str(mask.get("ExtracerebralCSF", "")).startswith("removed"):
        sentences.append("The cerebrospinal fluid between brain and skull was removed from it by its slow "
                         "signal decay (R2*) and, near its surface, by its low signal extrapolated "
                         "to TE = 0 (S0).")
    return sentences


def _total_field_text(total, echo_times):
    """The sentences on the total field (``TotalField``) and the citation keys they add."""
    method = total.get("Method", "a method not recorded")
    cite, cited = "", []
    if "laplacian" in method.lower():
        cite = " [schofield2003]"
        cited.append("schofield2003")
    method = method.replace(" + ", " and ")
    bipolar = total.get("BipolarCorrection") or {}
    sentences = []
    if bipolar.get("Applied"):
        sentences.append("The phase difference between odd and even echoes of the bipolar readout, a constant "
                         f"({bipolar.get('OffsetRad', 0):.3f} rad) plus a linear gradient, was estimated from the "
                         "second differences of the echo phases and removed from the even echoes.")
    if len(echo_times) == 1:
        sentences.append(f"The total field map was estimated from the single echo by {method}{cite}; the phase "
                         "offset at TE = 0 (coil and transmit phase) could not be separated from the field, so it "
                         "could not be removed (that needs two or more echoes) and remains in the field map and the "
                         "susceptibility map.")
    else:
        echoes = f"all {len(echo_times)} echoes" if echo_times else "all echoes"
        sentences.append(f"The total field map was estimated from {echoes} by {method}{cite}, which removes the "
                         "phase offset at TE = 0.")
    return sentences, cited


def _reliability_text(bfr):
    """The sentence on the reliability map, from ``BackgroundFieldRemoval``'s thresholds."""
    residual = (f" or a magnitude-weighted RMS residual of the echo fit above {bfr['MaxResidualRad']:g} rad"
                if "MaxResidualRad" in bfr else "")
    return (f"Voxels of the brain mask with a root-sum-of-squares magnitude below "
            f"{bfr['MinSignalFraction']:g} times its median in the mask{residual} were considered "
            "unreliable and left out of background field removal's fit; their local field was completed "
            "from the reliable voxels' (the field of a susceptibility distribution fitted to it by weighted "
            "least squares), so that strong sources whose signal decays fast (haemorrhages, "
            "calcifications, veins) stay in the susceptibility map; only signal voids reaching the brain "
            "mask's surface (bone, sinus air) were left out of it.")


def _r2star_text(fit):
    """The sentence on the R2* and T2* maps (``R2starFit``) and the citation keys it adds."""
    method = str(fit.get("Method", ""))
    description = {"weighted log-linear fit": "a log-linear least-squares fit weighted by the squared magnitude",
                   "two-echo closed form": "the closed form ln(S1/S2)/(TE2 - TE1) of the two echoes"}.get(
        method, "auto-regression on linear operations (ARLO) [pei2015]" if method == "ARLO" else method)
    low, high = fit.get("R2starRangeHz", [0, 0])
    return (f"R2* was fitted to the magnitude of the echoes in the brain mask by {description}, clipped to "
            f"{low:g}-{high:g} s^-1; T2* is its inverse, at most {fit.get('T2starMaxSeconds', 1):g} s.",
            ["pei2015"] if method == "ARLO" else [])


def methods_paragraph(sidecar):
    """A pasteable methods paragraph for one run and the citation keys it cites, in order of citation.

    Built from the provenance sidecar (see :attr:`RunOutputs.provenance`), one step after the other;
    citations appear as ``[key]`` placeholders, numbered by :func:`number_citations`.
    """
    cited = ["metaqsm"]
    echo_times = sidecar.get("EchoTime") or sidecar.get("TotalField", {}).get("EchoTime") or []
    echo_times = echo_times if isinstance(echo_times, list) else [echo_times]
    parts = [_acquisition_text(sidecar, echo_times)]
    if sidecar.get("PhaseScaling"):
        parts.append(_phase_text(sidecar["PhaseScaling"]))
    if sidecar.get("BrainMask"):
        parts += _mask_text(sidecar["BrainMask"])
    if sidecar.get("TotalField"):
        sentences, keys = _total_field_text(sidecar["TotalField"], echo_times)
        parts += sentences
        cited += keys
    bfr = sidecar.get("BackgroundFieldRemoval")
    if bfr and "MinSignalFraction" in bfr:
        parts.append(_reliability_text(bfr))
    if bfr:
        text, keys = _method_text("BackgroundFieldRemoval", bfr, "a method not recorded")
        cited += [key for key in keys if key not in cited]
        parts.append(f"Background fields were removed with {text}.")
    inversion = sidecar.get("DipoleInversion")
    if inversion:
        text, keys = _method_text("DipoleInversion", inversion, "unknown")
        cited += [key for key in keys if key not in cited]
        b0 = " with the B0 direction in voxel axes taken from the image orientation" \
            if "B0DirectionVoxel" in inversion else ""
        parts.append(f"Susceptibility was computed by {text}{b0}, and is reported in ppm "
                     f"{_reference_text(sidecar.get('SusceptibilityReference') or {})}.")
    if sidecar.get("R2starFit"):
        sentence, keys = _r2star_text(sidecar["R2starFit"])
        parts.append(sentence)
        cited += keys
    return " ".join(parts), cited


def number_citations(paragraphs):
    """Replace ``[key]`` placeholders by ``[n]`` numbered in order of first citation.

    ``paragraphs``: list of ``(text, keys)`` from :func:`methods_paragraph`. Returns the numbered
    texts and the reference list ``[(n, reference text)]``.
    """
    order = []
    for _, keys in paragraphs:
        order += [key for key in keys if key not in order]
    numbers = {key: n + 1 for n, key in enumerate(order)}
    texts = []
    for text, _ in paragraphs:
        for key, n in numbers.items():
            text = text.replace(f"[{key}]", f"[{n}]")
        texts.append(re.sub(r"\[(\d+)\] \[(\d+)\]", r"[\1, \2]", text))  # "[3] [4]" -> "[3, 4]"
    refs = references()
    return texts, [(numbers[key], refs[key]) for key in order]


def _software_version(versions, name):
    match = re.search(rf"(?:^|, ){re.escape(name)} ([^,]+)", versions or "")
    return match.group(1) if match else ""
