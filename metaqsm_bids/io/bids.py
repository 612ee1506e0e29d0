"""Finding multi-echo GRE runs in a BIDS dataset and checking they can be processed.

Everything a run needs is gathered here, before any workflow is built, so a
participant with broken input fails with one message naming the file, and the
others still run (fMRIPrep's ``collect_data`` plays the same role).
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..qsm.physics import GAMMA_HZ_PER_T
from .integrity import check_image

#: Entities that identify one MEGRE run (everything except echo and part).
RUN_ENTITIES = ("subject", "session", "acquisition", "reconstruction", "run")


class BIDSInputError(ValueError):
    """Input data that cannot be processed; the message names the file and the problem."""


@dataclass
class MEGRERun:
    """One multi-echo GRE run: per-echo magnitude and phase files and the acquisition facts."""

    entities: dict
    magnitude_files: list
    phase_files: list
    echo_times_s: list
    field_strength_t: float
    phase_units: str = None
    metadata: dict = field(default_factory=dict)

    @property
    def name(self):
        """BIDS-style prefix, e.g. ``sub-01_ses-2_run-1``."""
        keys = {"subject": "sub", "session": "ses", "acquisition": "acq", "reconstruction": "rec", "run": "run"}
        return "_".join(f"{keys[k]}-{self.entities[k]}" for k in RUN_ENTITIES if self.entities.get(k))


def _read_sidecar(layout, path):
    """Merged JSON metadata of ``path`` following the BIDS inheritance principle."""
    return layout.get_metadata(str(path))


def _field_strength_t(meta, path):
    if "MagneticFieldStrength" in meta:
        return float(meta["MagneticFieldStrength"])
    if "ImagingFrequency" in meta:  # MHz
        return float(meta["ImagingFrequency"]) * 1e6 / GAMMA_HZ_PER_T
    raise BIDSInputError(
        f"{path}: sidecar has neither MagneticFieldStrength nor ImagingFrequency; "
        "QSM needs the field strength to convert the field to ppm"
    )


def _check_geometry(reference, others):
    ref = nib.load(str(reference))
    for path in others:
        img = nib.load(str(path))
        if img.shape[:3] != ref.shape[:3]:
            raise BIDSInputError(f"{path}: shape {img.shape} differs from {Path(reference).name} {ref.shape}")
        if not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise BIDSInputError(
                f"{path}: affine differs from {Path(reference).name}; all echoes and parts must share one grid"
            )
    if len(ref.shape) > 3 and ref.shape[3] > 1:
        raise BIDSInputError(f"{reference}: expected a 3D volume per echo, got shape {ref.shape}")


def _echo_files(layout, part, run_entities, filters):
    query = {k: v for k, v in run_entities.items() if v is not None}
    files = layout.get(
        suffix="MEGRE", part=part, extension=[".nii", ".nii.gz"], datatype="anat", return_type="object",
        **{**filters, **query},
    )
    # pybids matches a missing entity as "any"; keep only files whose run entities are exactly these
    return {
        int(f.entities["echo"]): f.path
        for f in files
        if all(f.entities.get(k) == run_entities.get(k) for k in RUN_ENTITIES) and "echo" in f.entities
    }


def collect_megre_run(layout, run_entities, filters=None):
    """Build and validate one :class:`MEGRERun`; raise :class:`BIDSInputError` on any problem."""
    filters = dict(filters or {})
    mags = _echo_files(layout, "mag", run_entities, filters)
    phases = _echo_files(layout, "phase", run_entities, filters)
    name = "_".join(f"{k}-{v}" for k, v in run_entities.items() if v)
    for echo in sorted(set(mags) | set(phases)):
        if echo not in phases:
            raise BIDSInputError(f"{mags[echo]}: no matching part-phase file for echo {echo}")
        if echo not in mags:
            raise BIDSInputError(f"{phases[echo]}: no matching part-mag file for echo {echo}")
    echoes = sorted(mags)
    if echoes != list(range(1, len(echoes) + 1)):
        raise BIDSInputError(f"{name}: echo indices {echoes} are not 1..{len(echoes)}; an echo is missing")

    echo_times, strengths, units = [], set(), set()
    for echo in echoes:
        for path in (mags[echo], phases[echo]):
            meta = _read_sidecar(layout, path)
            if "EchoTime" not in meta:
                raise BIDSInputError(f"{path}: sidecar has no EchoTime (required for MEGRE)")
            strengths.add(round(_field_strength_t(meta, path), 3))
        phase_meta = _read_sidecar(layout, phases[echo])
        mag_te = float(_read_sidecar(layout, mags[echo])["EchoTime"])
        te = float(phase_meta["EchoTime"])
        if not np.isclose(te, mag_te, rtol=1e-4):
            raise BIDSInputError(f"{phases[echo]}: EchoTime {te} s differs from its magnitude's {mag_te} s")
        if not 0 < te < 1:
            raise BIDSInputError(f"{phases[echo]}: EchoTime {te} is not in seconds (expected 0 < TE < 1)")
        echo_times.append(te)
        units.add(phase_meta.get("Units"))  # None: inferred from the value range (the caller warns)
    if len(strengths) > 1:
        raise BIDSInputError(f"{name}: echoes disagree on the field strength: {sorted(strengths)} T")
    if any(b <= a for a, b in zip(echo_times, echo_times[1:])):
        raise BIDSInputError(f"{name}: echo times {echo_times} s do not increase with the echo index")
    if len(units) > 1:
        raise BIDSInputError(f"{name}: phase echoes disagree on Units: {sorted(map(str, units))}")
    phase_units = units.pop()
    if phase_units not in (None, "rad", "arbitrary"):
        raise BIDSInputError(f"{phases[echoes[0]]}: phase Units '{phase_units}' is not 'rad' or 'arbitrary'")

    mag_list = [mags[e] for e in echoes]
    phase_list = [phases[e] for e in echoes]
    for path in mag_list + phase_list:  # every file read in full once: truncated gzip, NaN, empty magnitude
        try:
            check_image(path, magnitude=path in mag_list)
        except ValueError as err:
            raise BIDSInputError(str(err)) from err
    _check_geometry(mag_list[0], mag_list[1:] + phase_list)
    return MEGRERun(
        entities=dict(run_entities),
        magnitude_files=mag_list,
        phase_files=phase_list,
        echo_times_s=echo_times,
        field_strength_t=strengths.pop(),
        phase_units=phase_units,
        metadata=_read_sidecar(layout, phase_list[0]),
    )


def find_megre_runs(layout, subject, sessions=None, filters=None):
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
            results.append((run_entities, collect_megre_run(layout, run_entities, filters)))
        except BIDSInputError as err:
            results.append((run_entities, err))
    return results


def load_bids_filters(path):
    """Read a ``--bids-filter-file``: a JSON object of pybids entity queries for the MEGRE files."""
    try:
        filters = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BIDSInputError(f"{path}: cannot read the BIDS filter file: {err}") from err
    if not isinstance(filters, dict):
        raise BIDSInputError(f"{path}: the BIDS filter file must hold a JSON object")
    # fMRIPrep-style files nest the query under a key naming the data type
    if "megre" in filters and isinstance(filters["megre"], dict):
        filters = filters["megre"]
    bad = [k for k in filters if k in ("suffix", "part", "echo", "extension")]
    if bad:
        raise BIDSInputError(f"{path}: filters may not override {bad}; metaqsm selects those itself")
    return filters


def check_bids_filters(layout, filters, path):
    """Raise :class:`BIDSInputError` naming ``path`` if a filter names an entity the dataset does not know."""
    known = set(layout.get_entities())
    unknown = sorted(set(filters) - known)
    if unknown:
        entities = ", ".join(sorted(k for k in known if k.islower()))
        raise BIDSInputError(f"{path}: unknown entity {', '.join(map(repr, unknown))} in the BIDS filter file "
                             f"(pybids names, e.g. 'acquisition', not 'acq'); this dataset knows: {entities}")


def participant_labels(layout, requested=None):
    """Subjects to process; unknown labels raise a :class:`BIDSInputError` listing what exists."""
    available = sorted(layout.get_subjects())
    if not requested:
        return available
    wanted = [re.sub(r"^sub-", "", label) for label in requested]
    missing = [label for label in wanted if label not in available]
    if missing:
        raise BIDSInputError(
            f"{layout.root}: participant label(s) {missing} not found; the dataset has {available}"
        )
    return wanted
