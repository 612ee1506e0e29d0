"""Write simulated multi-echo GRE runs as a BIDS dataset, with the ground truth as a derivatives dataset.

Raw files: ``sub-<s>[/ses-<ss>]/anat/sub-<s>[_ses-][_acq-][_run-]_echo-<n>_part-{mag,phase}_MEGRE.nii.gz``
with JSON sidecars. Ground truth in ``derivatives/metaqsm-simulate/``, named as metaqsm names the
same outputs (:mod:`metaqsm_bids.io.outputs`): ``Chimap`` (ppm, relative to CSF, 0 outside the brain),
``desc-brain_mask``, ``R2starmap`` (Hz) and, in ``fmap/``, ``desc-total_fieldmap`` (the total field in
Hz whose phase was simulated, 0 where there is no tissue) with its ``desc-total_magnitude``
(M0 exp(-TE1 R2*), no noise) as BIDS asks of a field map; and beside the Chimap, ``dseg`` (QSM
challenge 2.0 labels, see ``dseg.tsv``).
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..io.derivatives import BIDS_VERSION, CODE_URL
from ..io.outputs import output_path, run_name
from ..qsm.core import physics
from . import phantom as ph

DERIVATIVE_NAME = "metaqsm-simulate"
_GENERATED_BY = {"Name": "metaqsm-simulate", "Version": __version__, "CodeURL": CODE_URL}
_LABEL = re.compile(r"^[0-9a-zA-Z]+$")


def _prefix(entities):
    """``sub-X[_ses-Y][_acq-Z][_run-N]`` and the folder ``sub-X[/ses-Y]`` for run ``entities``."""
    unknown = set(entities) - {"subject", "session", "acquisition", "run"}
    if unknown:
        raise ValueError(f"unsupported BIDS entities {sorted(unknown)}: use subject, session, acquisition, run")
    subject = entities.get("subject")
    if subject is None:
        raise ValueError("entities need a 'subject'")
    parts, folder = [], []
    for key, ent in (("subject", "sub"), ("session", "ses"), ("acquisition", "acq"), ("run", "run")):
        value = entities.get(key)
        if value is None:
            continue
        value = str(value)
        if key == "run" and not value.isdigit():
            raise ValueError(f"run must be a non-negative integer, got {value!r}")
        if not _LABEL.match(value):
            raise ValueError(f"BIDS {key} label must be letters and digits only, got {value!r}")
        parts.append(f"{ent}-{value}")
        if key in ("subject", "session"):
            folder.append(f"{ent}-{value}")
    return "_".join(parts), Path(*folder)


def _save_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def _save_pair(nifti, data, affine, sidecar):
    """Write ``nifti`` (``.nii.gz``; scanner-coordinate affine, mm) and its ``.json`` sidecar; returns both paths."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    json_path = nifti.with_name(nifti.name.removesuffix(".nii.gz") + ".json")
    nifti.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, nifti)
    _save_json(json_path, sidecar)
    return [nifti, json_path]


def phase_to_arbitrary(phase_rad):
    """Phase (rad) as Siemens-style int16 in -4096..4095 (4096 counts per pi)."""
    counts = np.rint(np.asarray(phase_rad, float) * (4096 / np.pi)).astype(np.int64)
    return (((counts + 4096) % 8192) - 4096).astype(np.int16)  # +pi wraps to -4096


def write_megre_run(bids_dir, entities, magnitude, phase_rad, affine, echo_times_s, b0_tesla,
                    phase_units="rad", extra_metadata=None):
    """Write one MEGRE run: 3D magnitude and phase NIfTI files per echo plus JSON sidecars.

    ``magnitude`` and ``phase_rad`` are 4D (echo last); ``entities`` holds subject and optionally
    session, acquisition, run. ``phase_units`` 'rad' stores float32 radians, 'arbitrary' int16
    -4096..4095. ``extra_metadata`` overrides or adds sidecar fields. Returns the written paths.
    """
    magnitude = np.asarray(magnitude)
    phase_rad = np.asarray(phase_rad)
    tes = [float(t) for t in np.atleast_1d(echo_times_s)]
    if magnitude.ndim != 4 or magnitude.shape != phase_rad.shape or magnitude.shape[3] != len(tes):
        raise ValueError(f"magnitude {magnitude.shape} and phase {phase_rad.shape} must be 4D with one "
                         f"volume per echo time ({len(tes)})")
    if phase_units not in ("rad", "arbitrary"):
        raise ValueError(f"phase_units must be 'rad' or 'arbitrary', got {phase_units!r}")
    if not (np.all(np.isfinite(magnitude)) and np.all(np.isfinite(phase_rad))):
        raise ValueError("magnitude and phase must be finite (found NaN or inf)")
    prefix, folder = _prefix(entities)
    anat = Path(bids_dir) / folder / "anat"
    common = {
        "Manufacturer": "metaqsm-simulate",
        "ManufacturersModelName": "analytic head phantom",
        "MagneticFieldStrength": float(b0_tesla),
        "ImagingFrequency": round(physics.GAMMA_HZ_PER_T * b0_tesla / 1e6, 6),
        "MRAcquisitionType": "3D",
        "ScanningSequence": "GR",
        "SequenceVariant": "SP",
        "PulseSequenceType": "multi-echo spoiled gradient echo",
        "SequenceName": "megre_simulated",
        "SoftwareVersions": f"metaqsm {__version__}",
        "RepetitionTime": round(max(tes) + 0.01, 6),
        "FlipAngle": 15,
        "ReceiveCoilName": "simulated single channel",
    }
    common.update(extra_metadata or {})
    written = []
    for n, te in enumerate(tes):
        meta = dict(common, EchoTime=te, EchoNumber=n + 1)
        for part, image_type in (("mag", "M"), ("phase", "P")):
            sidecar = dict(meta, ImageType=["ORIGINAL", "PRIMARY", image_type])
            if part == "mag":
                data = magnitude[..., n].astype(np.float32)
            else:
                data = (phase_rad[..., n].astype(np.float32) if phase_units == "rad"
                        else phase_to_arbitrary(phase_rad[..., n]))
                sidecar["Units"] = phase_units
            written += _save_pair(anat / f"{prefix}_echo-{n + 1}_part-{part}_MEGRE.nii.gz", data, affine, sidecar)
    return written


def derivatives_dir(bids_dir):
    """Folder of the ground-truth derivatives dataset inside ``bids_dir``."""
    return Path(bids_dir) / "derivatives" / DERIVATIVE_NAME


def write_ground_truth(bids_dir, entities, phantom, truth, magnitude_te1, b0_tesla):
    """Write the truth of one simulated run to the derivatives dataset; returns the written paths.

    ``truth`` is the :class:`~metaqsm_bids.sim.phantom.SimulationTruth` of the run and
    ``magnitude_te1`` a noise-free first-echo magnitude (the field map's companion image).
    """
    _prefix(entities)  # reject bad labels as the raw files do
    root = derivatives_dir(bids_dir)
    chimap = output_path(root, "chimap", entities)
    tissue = phantom.m0 > 0
    r2star_hz = phantom.r2star_hz * (b0_tesla / ph.R2STAR_REFERENCE_TESLA)
    items = [
        (chimap, (phantom.chi_ppm * phantom.brain_mask).astype(np.float32),
         {"Units": "ppm", "SkullStripped": True,
          "Description": "true magnetic susceptibility relative to CSF in the brain mask, 0 outside it; "
                         "partial-volume averages at edges"}),
        # the labels are no metaqsm output: named beside the Chimap
        (chimap.with_name(f"{run_name(entities)}_dseg.nii.gz"), phantom.seg.astype(np.uint8),
         {"Description": "tissue labels of the QSM challenge 2.0 (dseg.tsv), each voxel labelled with the "
                         "last painted structure covering at least half of it"}),
        (output_path(root, "brain_mask", entities), phantom.brain_mask.astype(np.uint8),
         {"Type": "Brain", "Description": "voxels at least half inside the brain (ventricles included)"}),
        (output_path(root, "r2star", entities), r2star_hz.astype(np.float32),
         {"Units": "Hz", "SkullStripped": False, "MagneticFieldStrength": float(b0_tesla)}),
        (output_path(root, "total_field", entities), (truth.field_hz * tissue).astype(np.float32),
         {"Units": "Hz", "SkullStripped": False, "MagneticFieldStrength": float(b0_tesla),
          "Description": "true total field (tissue, air and bone susceptibility, after a 2nd-order shim) "
                         "whose phase was simulated; 0 where there is no tissue"}),
        (output_path(root, "magnitude", entities), np.asarray(magnitude_te1, np.float32),
         {"SkullStripped": False,
          "Description": "M0 exp(-TE1 R2*) of the phantom: first-echo magnitude without noise"}),
    ]
    written = []
    for path, data, sidecar in items:
        written += _save_pair(path, data, phantom.affine, dict(sidecar, HeadScale=phantom.scale))
    return written


_README = """# {name}

Multi-echo gradient-echo (MEGRE) MRI simulated by `metaqsm-simulate` (metaqsm {version}) from an
analytic head phantom: scalp, skull, sinus and mastoid air, CSF, grey and white matter, deep grey
nuclei, veins and a calcification, with literature susceptibility, M0 and R2* values.

The field is the dipole forward model of the whole head (air +9.4 ppm relative to tissue) with B0
along the scanner z axis, minus a 2nd-order shim fitted over the brain, computed on a grid twice as
fine along every axis; the complex signal `m0 exp(-TE R2*) exp(i(phi0 + 2 pi f TE))` with a smooth phase
offset `phi0` was averaged back to the acquisition grid and complex Gaussian noise added.

The ground truth is in `derivatives/{derivative}/`: susceptibility (`Chimap`, ppm relative to CSF),
labels (`dseg`, QSM challenge 2.0 convention), brain mask, R2* and the total field (`fmap/`, Hz).
The `HeadScale` sidecar field is the factor applied to the phantom's adult head size.
"""


def write_dataset_files(bids_dir, name):
    """Write the dataset-level files of the raw dataset and of its ground-truth derivatives dataset.

    Raw: dataset_description.json, README.md, participants.tsv/.json (the ``sub-*`` folders present).
    Derivatives: dataset_description.json, README.md and dseg.tsv. Returns the written paths.
    """
    bids_dir = Path(bids_dir)
    deriv = derivatives_dir(bids_dir)
    subjects = sorted(p.name for p in bids_dir.glob("sub-*") if p.is_dir())
    files = {
        bids_dir / "dataset_description.json": {
            "Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw", "License": "CC0",
            "Authors": ["metaqsm-simulate"], "GeneratedBy": [_GENERATED_BY],
        },
        bids_dir / "participants.json": {
            "participant_id": {
                "Description": "simulated participant (the same phantom, its own noise and phase offset)"},
        },
        deriv / "dataset_description.json": {
            "Name": f"{name}: ground truth", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [dict(_GENERATED_BY, Description="ground truth of the simulation")],
        },
    }
    for path, content in files.items():
        _save_json(path, content)
    readme = _README.format(name=name, version=__version__, derivative=DERIVATIVE_NAME)
    (bids_dir / "README.md").write_text(readme)
    (deriv / "README.md").write_text(readme)
    (bids_dir / "participants.tsv").write_text("participant_id\n" + "".join(f"{s}\n" for s in subjects))
    (deriv / "dseg.tsv").write_text("index\tname\n" + "".join(
        f"{label}\t{label_name}\n" for label, label_name in sorted(ph.LABEL_NAMES.items())))
    return list(files) + [bids_dir / "README.md", deriv / "README.md", bids_dir / "participants.tsv",
                          deriv / "dseg.tsv"]


@dataclass
class RunSpec:
    """One simulated run: BIDS entities, grid, obliquity (deg about the i axis), echoes, B0, SNR, seed."""

    subject: str
    session: str = None
    acquisition: str = None
    run: int = None
    # the demo: an adult-size head (about 150 x 190 x 130 mm of field of view), so that background removal's
    # 6 mm erosion keeps what it keeps of a real brain, inside the shipped network's training range
    shape: tuple = (128, 160, 56)
    voxel_size_mm: tuple = (1.2, 1.2, 2.4)
    oblique_deg: float = 0.0
    echo_times_s: tuple = (0.004, 0.008, 0.012, 0.016)
    b0_tesla: float = 3.0
    peak_snr: float = 100.0
    phase_units: str = "rad"
    seed: int = 0
    scale: float = None
    lesions: bool = False  # a haemorrhage and a calcification (metaqsm_bids.sim.phantom.LESION_SHAPES)
    extra_metadata: dict = field(default_factory=dict)

    def entities(self):
        """The run's BIDS entities."""
        return {"subject": self.subject, "session": self.session, "acquisition": self.acquisition,
                "run": self.run}


def rotation_about_i(angle_deg):
    """Rotation (3x3) of the voxel axes about the first (i, left-right) axis by ``angle_deg``."""
    c, s = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def is_bids_dataset(path):
    """True if ``path`` holds a dataset_description.json."""
    return (Path(path) / "dataset_description.json").is_file()


def simulate_dataset(bids_dir, runs, name="metaqsm simulated MEGRE"):
    """Simulate ``runs`` (RunSpec or dicts of its fields) into ``bids_dir``; returns the written paths.

    ``bids_dir`` must be missing, empty or already a BIDS dataset (runs are added or replaced).
    """
    bids_dir = Path(bids_dir)
    if bids_dir.exists() and (not bids_dir.is_dir() or (any(bids_dir.iterdir()) and not is_bids_dataset(bids_dir))):
        raise ValueError(f"{bids_dir} is not empty and not a BIDS dataset (no dataset_description.json): "
                         "refusing to write into it")
    specs = [r if isinstance(r, RunSpec) else RunSpec(**r) for r in runs]
    if not specs:
        raise ValueError("no runs to simulate")
    for spec in specs:
        _prefix(spec.entities())  # reject bad labels before spending time on any run
    written = []
    for spec in specs:
        entities = {k: v for k, v in spec.entities().items() if v is not None}
        phantom = ph.sample_head(spec.shape, spec.voxel_size_mm, rotation_about_i(spec.oblique_deg), spec.scale,
                                 lesions=spec.lesions)
        rng = np.random.default_rng(spec.seed)
        magnitude, phase, truth = ph.simulate_megre(phantom, spec.echo_times_s, spec.b0_tesla, spec.peak_snr,
                                                    rng, return_truth=True)
        extra = dict(spec.extra_metadata)
        extra.setdefault("SimulatedPeakSNR", spec.peak_snr)
        written += write_megre_run(bids_dir, entities, magnitude, phase, phantom.affine, spec.echo_times_s,
                                   spec.b0_tesla, spec.phase_units, extra)
        te1 = phantom.m0 * np.exp(-spec.echo_times_s[0] * phantom.r2star_hz * spec.b0_tesla
                                  / ph.R2STAR_REFERENCE_TESLA)
        written += write_ground_truth(bids_dir, entities, phantom, truth, te1, spec.b0_tesla)
    written += write_dataset_files(bids_dir, name)
    return written
