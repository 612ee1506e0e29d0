"""Writing the derivatives dataset: sidecars with provenance, atomic files, the group summary.

The output directory is itself the derivatives dataset (as in fMRIPrep). File names
come from the output spec (:mod:`metaqsm_bids.io.outputs`), because niworkflows'
DerivativesDataSink has no patterns for Chimap, field maps with ``desc`` in ``fmap/``,
or the MEGRE entities. Every file is written to a temporary name in its final folder
and renamed into place, so an interrupted run never leaves a half-written derivative,
and concurrent jobs (SLURM array tasks) never see each other's partial files.
"""
import json
import os
import platform
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from .outputs import OUTPUTS, output_path, parse_output_name, run_name, sidecar_path

CODE_URL = "https://github.com/metaqsm/metaqsm"
BIDS_VERSION = "1.10.0"

#: BackgroundFieldRemoval sidecar keys that describe the reliability map (its thresholds and counts).
RELIABILITY_KEYS = ("MinSignalFraction", "MaxResidualRad", "UnreliableVoxelsExcluded", "UnreliableFractionOfBrain")

#: Key packages whose versions go into every sidecar.
_PACKAGES = ("numpy", "scipy", "nibabel", "nipype", "pybids", "torch")


def software_versions():
    """Versions of metaqsm and the packages whose numbers shape its output, as BIDS ``SoftwareVersions``.

    BIDS defines ``SoftwareVersions`` as one string, e.g. ``"metaqsm 0.1.0, numpy 2.1.0, ..."``.
    """
    versions = {"metaqsm": __version__, "python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return ", ".join(f"{name} {ver}" for name, ver in versions.items())


def bids_uri(dataset, relative_path):
    """A BIDS URI such as ``bids:raw:sub-01/anat/x.nii.gz`` (empty dataset = this dataset)."""
    return f"bids:{dataset}:{Path(relative_path).as_posix()}"


#: Temporary files being written by this process (see :func:`discard_partial_writes`).
_WRITING = set()


def raw_uris(text, bids_dir):
    """``text`` with each absolute path of a file in the raw dataset ``bids_dir`` as its BIDS URI."""
    root = re.escape(f"{Path(bids_dir).resolve()}/")
    return re.sub(root + r"([^\s:;,]+)", lambda match: bids_uri("raw", match.group(1)), text)


def atomic_write(path, writer):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the final extension: nibabel picks gzip compression from it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-", suffix="".join(path.suffixes))
    os.close(fd)
    _WRITING.add(tmp)
    try:
        writer(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _WRITING.discard(tmp)


def discard_partial_writes():
    """Remove the temporary files this process is writing; for a process that is about to exit at once
    (a stopped worker), where :func:`atomic_write` cannot clean up after itself."""
    for tmp in list(_WRITING):
        Path(tmp).unlink(missing_ok=True)


def write_json(path, data):
    """Write JSON atomically (sorted keys, so reruns produce identical files)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


def write_nifti(path, data, affine, dtype=np.float32, header=None):
    """Write a NIfTI image atomically, with spatial units mm (the validator checks them)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def derivative_authors(raw_dir):
    """``Authors`` of the derivatives dataset: those of the raw dataset (whose data these maps are), then metaqsm.

    metaqsm cannot know who ran it; the raw dataset's authors are credited because the maps are
    computed from their data, and the software that computed them is named (as in ``GeneratedBy``).
    """
    try:
        authors = json.loads((Path(raw_dir) / "dataset_description.json").read_text()).get("Authors")
    except (OSError, ValueError, AttributeError):
        authors = None
    authors = [a for a in authors if isinstance(a, str) and a.strip()] if isinstance(authors, list) else []
    return list(dict.fromkeys(authors + [f"metaqsm {__version__} (the software that computed this dataset; "
                                         "see GeneratedBy)"]))


def dataset_description(raw_dir):
    """The ``dataset_description.json`` content of a metaqsm derivatives dataset."""
    generated_by = {"Name": "metaqsm", "Version": __version__, "CodeURL": CODE_URL}
    container = os.environ.get("METAQSM_CONTAINER")  # set in the Docker/Singularity images
    if container:
        kind, _, tag = container.partition(":")
        generated_by["Container"] = {"Type": kind, "Tag": tag or __version__}
    return {
        "Name": "metaqsm: quantitative susceptibility maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "Authors": derivative_authors(raw_dir),
        "GeneratedBy": [generated_by],
        "DatasetLinks": {"raw": Path(raw_dir).resolve().as_uri()},
        "HowToAcknowledge": "Cite the Meta-QSM method paper and the methods named in each sidecar.",
    }


def ensure_dataset_description(output_dir, raw_dir):
    """Create or refresh the derivatives dataset's top-level files, safely under concurrency."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    desc = dataset_description(raw_dir)
    path = output_dir / "dataset_description.json"
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = None
        if current == desc:
            return path
    write_json(path, desc)
    readme = output_dir / "README"
    if not readme.exists():
        atomic_write(readme, lambda tmp: Path(tmp).write_text(
            "Quantitative susceptibility maps (Chimap, ppm) and intermediate field maps computed by metaqsm.\n"
            "Each file's JSON sidecar lists its Sources (BIDS URIs) and the parameters of the step that made it.\n"
        ))
    return path


def group_summary(output_dir, bids_dir):
    """Write ``group_summary.tsv``: one row per Chimap found, and one per participant without any.

    Returns the path and the rows (dicts). The mean and standard deviation of the
    susceptibility are taken inside each run's ``desc-qsm_mask``.
    """
    output_dir, bids_dir = Path(output_dir), Path(bids_dir)
    rows = []
    for chimap in sorted(output_dir.glob(f"sub-*/**/{OUTPUTS['chimap'].datatype}/*{OUTPUTS['chimap'].extension}")):
        parsed = parse_output_name(chimap.name)
        if parsed is None or parsed[0] != "chimap" or "space" in parsed[1]:  # not a Chimap, or a template-space copy
            continue
        entities = parsed[1]
        mask_path = output_path(output_dir, "qsm_mask", entities)
        sidecar = json.loads(sidecar_path(chimap).read_text())
        chi = np.asarray(nib.load(chimap).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(mask_path).dataobj) > 0 if mask_path.exists() else np.isfinite(chi)
        rows.append({
            "participant_id": f"sub-{entities['subject']}",
            "run": run_name(entities),
            "status": "processed",
            "inversion": sidecar.get("DipoleInversion", {}).get("Method", "n/a"),
            "mask_voxels": int(mask.sum()),
            "chi_mean_ppm": round(float(chi[mask].mean()), 6) if mask.any() else "n/a",
            "chi_std_ppm": round(float(chi[mask].std()), 6) if mask.any() else "n/a",
            "chimap": chimap.relative_to(output_dir).as_posix(),
        })
    done = {row["participant_id"] for row in rows}
    for subject_dir in sorted(bids_dir.glob("sub-*")):
        if subject_dir.is_dir() and subject_dir.name not in done:
            rows.append({"participant_id": subject_dir.name, "run": "n/a", "status": "no output",
                         "inversion": "n/a", "mask_voxels": "n/a", "chi_mean_ppm": "n/a",
                         "chi_std_ppm": "n/a", "chimap": "n/a"})
    columns = ["participant_id", "run", "status", "inversion", "mask_voxels", "chi_mean_ppm", "chi_std_ppm",
               "chimap"]
    text = "\t".join(columns) + "\n" + "".join("\t".join(str(r[c]) for c in columns) + "\n" for r in rows)
    path = output_dir / "group_summary.tsv"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path, rows
