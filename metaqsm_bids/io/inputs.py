"""Finding multi-echo GRE runs in a BIDS dataset and checking they can be processed.

Everything a run needs is gathered here, before any workflow is built, so a
participant with broken input fails with one message naming the file, and the
others still run (fMRIPrep's ``collect_data`` plays the same role).
"""
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..qsm.core.physics import GAMMA_HZ_PER_T
from ..qsm.field.phase_sign import PhaseSign, resolve_phase_sign
from .integrity import AFFINE_ATOL_MM, check_header, check_image

#: Entities (pybids names) that tell MEGRE runs apart: every entity BIDS allows on MEGRE except echo and part.
RUN_ENTITIES = ("subject", "session", "acquisition", "ceagent", "reconstruction", "run", "flip", "inv", "mt", "chunk")
#: Their short BIDS keys, in BIDS order.
ENTITY_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "ceagent": "ce", "reconstruction": "rec",
               "run": "run", "flip": "flip", "inv": "inv", "mt": "mt", "chunk": "chunk"}
#: The ``part`` pairs a run can be read from, in order of preference.
PART_PAIRS = (("mag", "phase"), ("real", "imag"))


class BIDSInputError(ValueError):
    """Input data that cannot be processed; the message names the file and the problem."""


@dataclass
class MEGRERun:
    """One multi-echo GRE run: its files and the acquisition facts.

    The images are either ``magnitude_files`` + ``phase_files`` or ``real_files`` + ``imag_files``
    (then the other two lists are empty): one 3D file per echo, or one 4D file (echo on the
    4th axis) per part.
    """

    entities: dict
    magnitude_files: list
    phase_files: list
    echo_times_s: list
    field_strength_t: float
    phase_units: str = None
    metadata: dict = field(default_factory=dict)
    #: where ``field_strength_t`` (T) came from, and the sidecar's nominal MagneticFieldStrength (T) if any
    field_strength_source: str = None
    nominal_field_strength_t: float = None
    #: what the user should know about this run's input (one line each, naming the file)
    warnings: list = field(default_factory=list)
    real_files: list = field(default_factory=list)
    imag_files: list = field(default_factory=list)
    #: the factor applied to the phase and why (see metaqsm_bids.qsm.field.phase_sign)
    phase_sign: PhaseSign = None

    @property
    def name(self):
        """BIDS-style prefix, e.g. ``sub-01_ses-2_run-1``."""
        return "_".join(f"{ENTITY_KEYS[k]}-{self.entities[k]}" for k in RUN_ENTITIES if self.entities.get(k))

    @property
    def reference_file(self):
        """The first image file (magnitude, or real part): the grid of every derivative."""
        return (self.magnitude_files or self.real_files)[0]

    @property
    def source_files(self):
        """Every raw image file the run is read from."""
        return self.magnitude_files + self.phase_files + self.real_files + self.imag_files


def _read_sidecar(layout, path):
    """Merged JSON metadata of ``path`` following the BIDS inheritance principle."""
    return layout.get_metadata(str(path))


#: Relative difference between ImagingFrequency / gamma and the nominal MagneticFieldStrength above which
#: the run gets a warning (a Siemens "3 T" system at 123.2 MHz is 2.894 T, 3.5 % below its nominal value).
FIELD_STRENGTH_TOLERANCE = 0.01


@dataclass(frozen=True)
class FieldStrength:
    """B0 (T) used to convert Hz to ppm, where it came from, and what the sidecar says nominally."""

    tesla: float
    source: str
    nominal_tesla: float = None
    warning: str = None


def _sidecar_number(meta, key, path, unit):
    try:
        value = float(meta[key])
    except (TypeError, ValueError):
        raise BIDSInputError(f"{path}: {key} {meta[key]!r} is not a number ({unit})") from None
    if not np.isfinite(value) or value <= 0:
        raise BIDSInputError(f"{path}: {key} {value:g} {unit} must be a positive number")
    return value


def field_strength(meta, path):
    """The :class:`FieldStrength` of a sidecar: ``ImagingFrequency`` (MHz) / gamma, else the nominal value.

    The proton Larmor frequency the scanner actually ran at (``ImagingFrequency``) gives the true B0;
    ``MagneticFieldStrength`` is the nominal (marketing) value, used only when the frequency is missing.
    ``warning`` is set when only one of the two is present or they differ by more than
    :data:`FIELD_STRENGTH_TOLERANCE`. Raises :class:`BIDSInputError` when neither is usable.
    """
    nominal = _sidecar_number(meta, "MagneticFieldStrength", path, "T") if "MagneticFieldStrength" in meta else None
    if "ImagingFrequency" in meta:
        mhz = _sidecar_number(meta, "ImagingFrequency", path, "MHz")
        tesla = mhz * 1e6 / GAMMA_HZ_PER_T
        if not 0.01 <= tesla <= 30:
            raise BIDSInputError(f"{path}: ImagingFrequency {mhz:g} gives B0 = {tesla:g} T; it must be the proton "
                                 "Larmor frequency in MHz (e.g. 123.2 at 3 T)")
        source = f"ImagingFrequency {mhz:g} MHz / gamma {GAMMA_HZ_PER_T / 1e6:.10g} MHz/T"
        warning = None
        if nominal is None:
            warning = (f"{path}: no MagneticFieldStrength to cross-check ImagingFrequency {mhz:g} MHz; "
                       f"using B0 = {tesla:.4f} T")
        elif abs(tesla - nominal) > FIELD_STRENGTH_TOLERANCE * nominal:
            warning = (f"{path}: ImagingFrequency {mhz:g} MHz gives B0 = {tesla:.4f} T, "
                       f"{100 * (tesla - nominal) / nominal:+.1f}% from the nominal MagneticFieldStrength "
                       f"{nominal:g} T; using {tesla:.4f} T (chi scales as 1/B0)")
        return FieldStrength(round(tesla, 6), source, nominal, warning)
    if nominal is not None:
        return FieldStrength(nominal, "MagneticFieldStrength (nominal; the sidecar has no ImagingFrequency)", nominal,
                             f"{path}: no ImagingFrequency: using the nominal MagneticFieldStrength {nominal:g} T; "
                             "the true B0 can differ by a few % (a Siemens 3 T system runs at 2.89 T), and chi "
                             "with it")
    raise BIDSInputError(
        f"{path}: sidecar has neither MagneticFieldStrength nor ImagingFrequency; "
        "QSM needs the field strength to convert the field to ppm"
    )


def _load_header(path):
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises several types for unreadable or truncated files
        raise BIDSInputError(f"{path}: cannot be read as NIfTI: {err}") from err


def _check_geometry(files, affines, n_echoes):
    """All files share the first one's grid (``affines``: path -> affine, from :func:`check_header`);
    4D files hold ``n_echoes`` volumes."""
    reference = files[0]
    ref = _load_header(reference)
    for path in files:
        img = _load_header(path)
        if img.shape[:3] != ref.shape[:3]:
            raise BIDSInputError(f"{path}: shape {img.shape} differs from {Path(reference).name} {ref.shape}")
        if not np.allclose(affines[path], affines[reference], atol=AFFINE_ATOL_MM):
            raise BIDSInputError(
                f"{path}: affine differs from {Path(reference).name}; all echoes and parts must share one grid"
            )
        volumes = img.shape[3] if len(img.shape) > 3 else 1
        if len(img.shape) > 4 or (len(files) > 2 and volumes > 1):
            raise BIDSInputError(f"{path}: expected a 3D volume per echo, got shape {img.shape}")
        if len(files) <= 2 and volumes != n_echoes:
            raise BIDSInputError(f"{path}: {volumes} volume(s) on the 4th axis but the sidecar gives "
                                 f"{n_echoes} EchoTime value(s); a 4D MEGRE file holds one echo per volume")


def _run_files(layout, run_entities, filters):
    """The run's MEGRE image files by part: ``{part: [(echo or None, path)]}``; files without ``part`` are
    ignored next to files with one, and refused when they are all the run has."""
    query = {k: v for k, v in run_entities.items() if v is not None}
    files = layout.get(suffix="MEGRE", extension=[".nii", ".nii.gz"], datatype="anat", return_type="object",
                       **{**filters, **query})
    by_part, partless = {}, []
    for f in files:
        # pybids matches a missing entity as "any"; keep only files whose run entities are exactly these
        if any(f.entities.get(k) != run_entities.get(k) for k in RUN_ENTITIES):
            continue
        part = f.entities.get("part")
        if part is None:  # a magnitude-only or complex-valued file, or a misnamed one (the validator says which)
            partless.append(f.path)
            continue
        echo = f.entities.get("echo")
        by_part.setdefault(part, []).append((int(echo) if echo is not None else None, f.path))
    if not by_part and partless:
        raise BIDSInputError(f"{sorted(partless)[0]}: MEGRE file without a part- entity; metaqsm reads part-mag + "
                             "part-phase or part-real + part-imag files (complex-valued NIfTI is not supported)")
    return by_part


def _echo_times(meta, path):
    """EchoTime of one sidecar as a list of seconds (a 4D file's sidecar holds a list)."""
    if "EchoTime" not in meta:
        raise BIDSInputError(f"{path}: sidecar has no EchoTime (required for MEGRE)")
    values = meta["EchoTime"] if isinstance(meta["EchoTime"], list) else [meta["EchoTime"]]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise BIDSInputError(f"{path}: EchoTime {meta['EchoTime']!r} is not a number or a list of numbers (s)") \
            from None
    for te in values:
        if not 0 < te < 1:
            raise BIDSInputError(f"{path}: EchoTime {te} is not in seconds (expected 0 < TE < 1)")
    return values


def _part_echoes(part, entries):
    """Files of one part in echo order: either one per echo (echo-1..N) or one file without an echo entity."""
    with_echo = sorted((e, p) for e, p in entries if e is not None)
    without = [p for e, p in entries if e is None]
    if with_echo and without:
        raise BIDSInputError(f"{without[0]}: part-{part} file without echo- next to echo-numbered files "
                             f"({Path(with_echo[0][1]).name}); use one 4D file or one file per echo")
    if len(without) > 1:
        raise BIDSInputError(f"{without[1]}: more than one part-{part} file without an echo- entity in this run")
    if without:
        return [None], without
    echoes = [e for e, _ in with_echo]
    if len(set(echoes)) != len(echoes):
        raise BIDSInputError(f"{with_echo[0][1]}: echo numbers repeat among the part-{part} files")
    return echoes, [p for _, p in with_echo]


def _paired_files(by_part, name):
    """The run's part pair (mag + phase, or real + imag) and its files in echo order, checked to match:
    ``(pair, echoes of the first part, files of the first part, files of the second part)``."""
    if "phase" in by_part or "mag" in by_part and not ("real" in by_part or "imag" in by_part):
        pair = PART_PAIRS[0]
    elif "real" in by_part or "imag" in by_part:
        pair = PART_PAIRS[1]
    else:
        some = sorted(path for entries in by_part.values() for _, path in entries)
        raise BIDSInputError(f"{some[0] if some else name}: no part-mag + part-phase or part-real + part-imag "
                             "files for this run")
    first, second = pair
    echoes = {part: _part_echoes(part, by_part.get(part, [])) if part in by_part else ([], []) for part in pair}
    (echoes_a, files_a), (echoes_b, files_b) = echoes[first], echoes[second]
    if echoes_a != echoes_b:
        if [None] in (echoes_a, echoes_b) and echoes_a and echoes_b:
            raise BIDSInputError(f"{files_b[0]}: part-{second} and part-{first} files differ in layout (one 4D file "
                                 "vs one file per echo)")
        for echo in sorted(set(echoes_a) | set(echoes_b), key=str):
            for (part, echoes, files), (other, other_echoes, other_files) in itertools.permutations(
                    ((first, echoes_a, files_a), (second, echoes_b, files_b))):
                if echo in other_echoes and echo not in echoes:  # named as it would be: the missing file
                    present = Path(other_files[other_echoes.index(echo)])
                    missing = present.with_name(present.name.replace(f"_part-{other}_", f"_part-{part}_"))
                    hint = "; QSM needs the phase (part-phase, or part-real + part-imag)" \
                        if part == second and not echoes else ""
                    raise BIDSInputError(f"{missing}: missing: no matching part-{part} file for {present.name}{hint}")
    if echoes_a != [None] and echoes_a != list(range(1, len(echoes_a) + 1)):
        raise BIDSInputError(f"{files_a[0]}: echo indices {echoes_a} are not 1..{len(echoes_a)}; an echo is missing")
    return pair, echoes_a, files_a, files_b


def _echo_sidecars(layout, files_a, files_b, one_file_per_echo, phase_part):
    """The run's echo times (s) and phase Units (None where unrecorded; ``phase_part``: files_b are phases), from
    the sidecars of each file pair; raises :class:`BIDSInputError` where they disagree or do not increase."""
    echo_times, strengths, units = [], {}, set()
    for path_a, path_b in zip(files_a, files_b):
        meta_a, meta_b = _read_sidecar(layout, path_a), _read_sidecar(layout, path_b)
        tes_a, tes_b = _echo_times(meta_a, path_a), _echo_times(meta_b, path_b)
        if len(tes_a) != len(tes_b) or not np.allclose(tes_a, tes_b, rtol=1e-4):
            raise BIDSInputError(f"{path_b}: EchoTime {tes_b} s differs from {Path(path_a).name}'s {tes_a} s")
        if one_file_per_echo and len(tes_a) != 1:
            raise BIDSInputError(f"{path_a}: EchoTime {tes_a} is a list but the file is one echo (echo- entity)")
        echo_times += tes_b
        for path, meta in ((path_a, meta_a), (path_b, meta_b)):
            strengths.setdefault(field_strength(meta, path).tesla, path)
        if phase_part:
            units.add(meta_b.get("Units"))
    if max(strengths) - min(strengths) > 1e-4 * max(strengths):
        raise BIDSInputError(f"{strengths[max(strengths)]}: field strength {max(strengths):g} T differs from "
                             f"{strengths[min(strengths)]}'s {min(strengths):g} T; all echoes of a run share one B0")
    if any(b <= a for a, b in zip(echo_times, echo_times[1:])):
        raise BIDSInputError(f"{files_b[0]}: echo times {echo_times} s do not increase with the echo index")
    if len(units) > 1:
        raise BIDSInputError(f"{files_b[0]}: phase echoes disagree on Units: {sorted(map(str, units))}")
    phase_units = units.pop() if units else None
    if phase_units not in (None, "rad", "arbitrary"):
        raise BIDSInputError(f"{files_b[0]}: phase Units '{phase_units}' is not 'rad' or 'arbitrary'")
    return echo_times, phase_units


def _check_images(files_a, files_b, mag_phase, n_echoes):
    """Headers, contents and grids of every image file (``mag_phase``: files_a are magnitudes); returns the
    header warnings."""
    affines, grid_warnings = {}, []
    try:
        for path in files_a + files_b:  # the headers as stored: voxel sizes, affines (before nibabel fixes them)
            affines[path], warning = check_header(path)
            grid_warnings += [warning] if warning else []
        for path in files_a + files_b:  # every file read in full once: truncated gzip, NaN, empty magnitude
            check_image(path, magnitude=mag_phase and path in files_a)
    except ValueError as err:
        raise BIDSInputError(str(err)) from err
    _check_geometry(files_a + files_b, affines, n_echoes)
    return grid_warnings


def collect_megre_run(layout, run_entities, filters=None, phase_sign="auto"):
    """Build and validate one :class:`MEGRERun`; raise :class:`BIDSInputError` on any problem.

    ``phase_sign`` is the ``--phase-sign`` choice, resolved here against the sidecar's
    ``Manufacturer`` (:func:`~metaqsm_bids.qsm.field.phase_sign.resolve_phase_sign`).
    """
    filters = dict(filters or {})
    by_part = _run_files(layout, run_entities, filters)
    name = "_".join(f"{ENTITY_KEYS[k]}-{v}" for k, v in run_entities.items() if v)
    pair, echoes_a, files_a, files_b = _paired_files(by_part, name)
    second = pair[1]
    echo_times, phase_units = _echo_sidecars(layout, files_a, files_b, echoes_a != [None], second == "phase")
    grid_warnings = _check_images(files_a, files_b, pair == PART_PAIRS[0], len(echo_times))
    metadata = _read_sidecar(layout, files_b[0])
    b0 = field_strength(metadata, files_b[0])
    sign = resolve_phase_sign(phase_sign, metadata.get("Manufacturer"), where=files_b[0])
    warnings = [w for w in (b0.warning, sign.warning) if w]
    if grid_warnings:
        more = f" (so do {len(grid_warnings) - 1} more file(s) of this run)" if len(grid_warnings) > 1 else ""
        warnings.append(grid_warnings[0] + more)
    if second == "phase" and phase_units is None:
        others = f" nor in the other {len(files_b) - 1} echoes' sidecars" if len(files_b) > 1 else ""
        warnings.append(f"{files_b[0]}: no Units in this phase sidecar{others} (BIDS requires it for "
                        "part-phase): metaqsm infers them from the value range (rad if within [-pi, pi] or "
                        "[0, 2*pi], else one turn over the range, as for vendor integers); add \"Units\": \"rad\" "
                        "or \"arbitrary\" to be sure")
    if len(echo_times) == 1:
        warnings.append(f"{files_b[0]}: one echo only: the phase offset at TE = 0 cannot be removed (that needs two "
                        "or more echoes), so the coil and transmit phase stays in the field map and in chi, and "
                        "no R2*/T2* map is written (a decay needs two echoes or more); use multi-echo data")
    files = {"magnitude_files": files_a, "phase_files": files_b} if pair == PART_PAIRS[0] else \
        {"real_files": files_a, "imag_files": files_b, "magnitude_files": [], "phase_files": []}
    return MEGRERun(
        entities=dict(run_entities),
        echo_times_s=echo_times,
        field_strength_t=b0.tesla,
        phase_units=phase_units,
        metadata=metadata,
        field_strength_source=b0.source,
        nominal_field_strength_t=b0.nominal_tesla,
        warnings=warnings,
        phase_sign=sign,
        **files,
    )


def find_megre_runs(layout, subject, sessions=None, filters=None, phase_sign="auto"):
    """All MEGRE runs of one subject as ``(run_entities, MEGRERun or BIDSInputError)`` pairs.

    Errors are returned, not raised, so the caller decides whether one broken run
    stops the participant (it does) and whether it stops the others (only with
    ``--stop-on-first-crash``).
    """
    filters = dict(filters or {})
    query = {**filters, "subject": subject, "suffix": "MEGRE", "extension": [".nii", ".nii.gz"]}
    if sessions:
        query["session"] = sessions
    keys = set()
    for f in layout.get(return_type="object", **query):
        keys.add(tuple(f.entities.get(k) for k in RUN_ENTITIES))
    results = []
    for key in sorted(keys, key=lambda k: tuple(str(v) for v in k)):
        run_entities = dict(zip(RUN_ENTITIES, key))
        try:
            results.append((run_entities, collect_megre_run(layout, run_entities, filters, phase_sign)))
        except BIDSInputError as err:
            results.append((run_entities, err))
    return results


def load_bids_filters(path):
    """Read and check a ``--bids-filter-file`` (before the dataset is indexed): a JSON object of pybids
    entity queries for the MEGRE files; raises :class:`BIDSInputError` naming ``path``."""
    if not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "no such file"
        raise BIDSInputError(f"{path}: the BIDS filter file (--bids-filter-file) {what}")
    try:
        filters = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BIDSInputError(f"{path}: cannot read the BIDS filter file: {err}") from err
    if not isinstance(filters, dict):
        raise BIDSInputError(f"{path}: the BIDS filter file must hold a JSON object")
    # fMRIPrep-style files nest the query under a key naming the data type
    if "megre" in filters and isinstance(filters["megre"], dict):
        filters = filters["megre"]
    bad = [k for k in filters if k in ("suffix", "part", "echo", "extension")]
    if bad:
        raise BIDSInputError(f"{path}: filters may not override {bad}; metaqsm selects those itself")
    check_bids_filters(filters, path)
    return filters


def check_bids_filters(filters, path, layout=None):
    """Raise :class:`BIDSInputError` naming ``path`` if a filter names an unknown entity.

    Without ``layout`` (before indexing): the lower-case keys against pybids' BIDS entities (sidecar
    keys, capitalised, are left for later); with it: every key against the entities and sidecar keys
    of the indexed dataset.
    """
    from bids.layout import Config

    entities = set(Config.load("bids").entities)
    known = set(layout.get_entities()) if layout is not None else entities
    unknown = sorted(k for k in set(filters) - known if layout is not None or not k[:1].isupper())
    if unknown:
        raise BIDSInputError(f"{path}: unknown entity {', '.join(map(repr, unknown))} in the BIDS filter file "
                             f"(pybids names, e.g. 'acquisition', not 'acq'); this dataset knows: "
                             f"{', '.join(sorted(entities))}")


#: Top-level folders pybids does not index (its DEFAULT_LOCATIONS_TO_IGNORE) and derivatives, indexed apart.
_NOT_INDEXED = ("code", "models", "sourcedata", "stimuli", "derivatives")


def subject_dirs(bids_dir):
    """The participant labels of the dataset's ``sub-<label>`` folders, sorted (a directory listing, nothing read)."""
    return sorted(entry.name[4:] for entry in os.scandir(bids_dir) if entry.name.startswith("sub-") and entry.is_dir())


def _selected(bids_dir, participants):
    """``(top-level folder names left out, pybids ignore patterns)`` for the ``sub-*`` folders of the
    participants not in ``participants`` (labels, with or without ``sub-``; None: all participants)."""
    if participants is None:
        return set(), []
    wanted = {bare_label(label) for label in participants}
    others = {f"sub-{label}" for label in subject_dirs(bids_dir) if label not in wanted}
    if not others:
        return set(), []
    # one pattern: pybids tries every pattern on every file and folder
    keep = "|".join(re.escape(label) for label in sorted(wanted)) or "(?!)"
    return others, [re.compile(rf"^/sub-(?!(?:{keep})(?:/|$))")]


def unreadable_sidecars(bids_dir, participants=None):
    """``{path: what is wrong}`` for the JSON files of the dataset that pybids would index and cannot read.

    ``participants`` (labels; None: all): only their ``sub-*`` folders are read, besides the dataset-level files.
    """
    bids_dir = Path(bids_dir)
    left_out, _ = _selected(bids_dir, participants)
    broken = {}
    for top, dirs, files in os.walk(bids_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (
            Path(top) == bids_dir and (d in _NOT_INDEXED or d in left_out)))
        for name in sorted(files):
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = Path(top) / name
            try:
                content = json.loads(path.read_bytes())
            except OSError as err:
                broken[path] = f"cannot be read ({err.strerror or err})"
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                broken[path] = f"not valid JSON ({err}); fix or regenerate this sidecar"
            else:
                if not isinstance(content, dict):
                    broken[path] = f"a JSON sidecar must hold an object, not a {type(content).__name__}"
    return broken


def subject_of(relative):
    """The participant label of a file whose path relative to the dataset is under ``sub-<label>/``, else None."""
    match = re.match(r"^/?sub-([A-Za-z0-9]+)/", relative or "")
    return match.group(1) if match else None


def index_dataset(bids_dir, participants=None):
    """Index the dataset with pybids, leaving out the sidecars it cannot read.

    Returns ``(layout, {participant: [message]})``: a participant's unreadable MEGRE sidecar fails that
    participant (message starting with the file), without stopping the others; unreadable sidecars of
    other files are left out of the index (metaqsm does not read them). Raises :class:`BIDSInputError`
    for an unreadable ``dataset_description.json`` or dataset-level MEGRE sidecar (every participant
    inherits it). ``participants`` (labels; None: all): the other participants' ``sub-*`` folders are
    left out of the index, so that a one-participant task reads that participant's files and the
    dataset-level ones only.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    bids_dir = Path(bids_dir)
    broken = unreadable_sidecars(bids_dir, participants)
    by_subject = {}
    for path, what in broken.items():
        subject = subject_of(path.relative_to(bids_dir).as_posix())
        if subject is None and (path.name == "dataset_description.json" or path.name.endswith("_MEGRE.json")):
            raise BIDSInputError(f"{path}: {what}")
        if path.name.endswith("_MEGRE.json"):
            by_subject.setdefault(subject, []).append(f"{path}: {what}")
    ignore = [*DEFAULT_LOCATIONS_TO_IGNORE, *_selected(bids_dir, participants)[1],
              *(re.compile("^/" + re.escape(path.relative_to(bids_dir).as_posix()) + "$") for path in broken)]
    return BIDSLayout(str(bids_dir), validate=False, indexer=BIDSLayoutIndexer(ignore=ignore)), by_subject


def bare_label(label):
    """A participant label as given on the command line, with or without ``sub-``, without it."""
    return re.sub(r"^sub-", "", label)


def check_participant_folders(bids_dir, requested):
    """Raise a :class:`BIDSInputError` listing what exists unless every requested participant label (with or
    without ``sub-``) has a ``sub-<label>`` folder in ``bids_dir``; a directory listing, before any indexing."""
    available = subject_dirs(bids_dir)
    missing = [label for label in map(bare_label, requested or []) if label not in available]
    if missing:
        raise BIDSInputError(f"{bids_dir}: participant label(s) {missing} not found; the dataset has {available}")


def participant_labels(layout, requested=None):
    """Subjects to process; unknown labels raise a :class:`BIDSInputError` listing what exists.

    A requested participant is known when ``layout`` (indexed for the requested ones, see
    :func:`index_dataset`) has files of it; the message lists the others by their ``sub-*`` folders.
    """
    indexed = sorted(layout.get_subjects())
    if not requested:
        return indexed
    wanted = [bare_label(label) for label in requested]
    missing = [label for label in wanted if label not in indexed]
    if missing:
        available = sorted(set(indexed) | set(subject_dirs(layout.root)) - set(wanted))
        raise BIDSInputError(
            f"{layout.root}: participant label(s) {missing} not found; the dataset has {available}"
        )
    return wanted
