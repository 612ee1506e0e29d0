"""Every derivative metaqsm writes, declared once, and the one function that names their files.

:data:`OUTPUTS` holds one :class:`Output` per derivative kind: its BIDS datatype folder, ``desc``
label, suffix and extension, how it is resampled to a template (linear for maps, nearest neighbour
for masks) and whether it is, and a description (the sidecar's ``Description`` where that does not
depend on the run). The sink (``interfaces/sink.py``), the template spaces (``spatial/template.py``),
the reports, the group summary and the tests name and find files through :func:`output_name`,
:func:`output_path` and :func:`parse_output_name`, never by writing a name or a regular expression
of their own (fMRIPrep keeps the same facts in ``fmriprep/data/io_spec.json``).

A name is the run's entities, then ``space``/``res`` (template outputs) or ``from``/``to``/``mode``
(transforms), then the kind's ``desc``, in BIDS order, and the suffix:
``sub-01_ses-2_run-1_space-MNI152NLin2009cAsym_res-2_desc-qsm_mask.nii.gz``.
"""
from dataclasses import dataclass, field
from pathlib import Path

from .inputs import ENTITY_KEYS, RUN_ENTITIES

#: Every entity a derivative name can hold (pybids name -> BIDS key), in BIDS order: the run's
#: (:data:`~metaqsm_bids.io.inputs.RUN_ENTITIES`, ``chunk`` placed after ``space`` as BIDS orders it), then
#: the template space and resolution, the transform's ``from``/``to``/``mode``, and ``desc``.
ENTITY_ORDER = {
    **{key: ENTITY_KEYS[key] for key in RUN_ENTITIES if key != "chunk"},
    "space": "space", "chunk": "chunk", "res": "res", "from": "from", "to": "to", "mode": "mode",
    "desc": "desc",
}
_BY_SHORT = {short: key for key, short in ENTITY_ORDER.items()}
#: Template resampling, as the spec names it -> as ANTs names it.
INTERPOLATIONS = {"linear": "linear", "nearest": "nearestNeighbor"}


@dataclass(frozen=True)
class Output:
    """One derivative kind: how its files are named and treated.

    key: the kind's name in the code (the sink's ``out_files`` keys, the report's images).
    datatype, desc, suffix, extensions: the file name (the first extension is the default).
    interpolation: ``linear`` (maps) or ``nearest`` (masks, kept binary) when resampled to a template.
    template: whether it is resampled to each template output space (``--output-spaces``).
    description: one line; the sidecar's ``Description`` unless the sink words it for the run.
    written: when the sink writes it (``always``, ``two echoes or more``, ``reference csf``), or
    ``template spaces`` for what only the template spaces write.
    entities: fixed entities of the kind (the transform's ``from-orig``, ``mode-image``).
    bidsignore: ``.bidsignore`` patterns, for kinds BIDS has no name for (the validator must skip them).
    """

    key: str
    datatype: str
    suffix: str
    desc: str = None
    interpolation: str = "linear"
    template: bool = False
    description: str = ""
    written: str = "always"
    extensions: tuple = (".nii.gz",)
    entities: dict = field(default_factory=dict)
    bidsignore: tuple = ()

    @property
    def extension(self):
        """The default extension (the image's)."""
        return self.extensions[0]

    @property
    def mask(self):
        """A binary mask (uint8 on disk, resampled by nearest neighbour)."""
        return self.suffix == "mask"

    @property
    def tail(self):
        """The name after the run's entities without extension, e.g. ``desc-qsm_mask`` or ``Chimap``."""
        return f"desc-{self.desc}_{self.suffix}" if self.desc else self.suffix


def _outputs(*outputs):
    return {output.key: output for output in outputs}


#: Every derivative kind, in the order the sink writes them.
OUTPUTS = _outputs(
    Output("brain_mask", "anat", "mask", "brain", "nearest", template=True,
           description="Brain mask computed from the magnitude images."),
    Output("magnitude", "fmap", "magnitude", "total", template=True,
           description="Root-sum-of-squares magnitude over echoes (the total field map's magnitude)."),
    Output("total_field", "fmap", "fieldmap", "total",
           description="Total field map: multi-echo fit of the unwrapped phase, phase offset at TE=0 removed."),
    Output("fit_residual", "fmap", "residual", "echofit",
           description="Magnitude-weighted RMS residual of the phase about its fitted line over echo time (the "
                       "total field's echo fit); 0 with one or two echoes.",
           # BIDS field maps are in Hz, rad/s or T: a residual in rad has no BIDS suffix
           bidsignore=("*_residual.nii.gz", "*_residual.json")),
    Output("reliable_mask", "anat", "mask", "reliable", "nearest",
           description="Reliability map: the brain mask's voxels whose field is trusted, with an RSS magnitude of "
                       "at least MinSignalFraction x its median in the brain mask and an echo-fit residual of at "
                       "most MaxResidualRad (rad). The others (bone or air inside the brain mask, lesions whose "
                       "signal decays within the first echoes, phase off the echo-time line) are left out of "
                       "background field removal's fit; their local field is completed from the reliable voxels' "
                       "(see the local field)."),
    Output("local_magnitude", "fmap", "magnitude", "local",
           description="Root-sum-of-squares magnitude inside the mask where the local field is defined."),
    Output("local_field", "fmap", "fieldmap", "local",
           description="Local field map after background field removal; in the QSM mask's voxels outside the "
                       "reliability map (CompletedVoxels), the field of the susceptibility fitted to the reliable "
                       "voxels' local field."),
    Output("qsm_mask", "anat", "mask", "qsm", "nearest", template=True,
           description="Where the local field and the susceptibility map are defined: the brain mask less its "
                       "signal voids that reach its surface (bone, sinus air) with TFI and PDF; with RESHARP, "
                       "V-SHARP and LBV, the reliability map less what they could not keep (the kernel's erosion, "
                       "LBV's boundary layer), its inner holes filled."),
    Output("chimap", "anat", "Chimap", template=True,
           description="Magnetic susceptibility map (ppm), relative to the reference region "
                       "(SusceptibilityReference)."),
    # BIDS has no SWI suffix: a T2*-weighted image (T2starw) with a desc-, as fMRIPrep names what BIDS lacks
    Output("swi", "anat", "T2starw", "swi",
           description="Susceptibility-weighted image (Haacke et al. 2004): the root-sum-of-squares magnitude times "
                       "the phase mask of the local field at EchoTimeUsed raised to PhaseMaskPower "
                       "(metaqsm_bids.qsm.field.swi); outside the QSM mask, the magnitude."),
    Output("mip", "anat", "T2starw", "mip",
           description="Minimum-intensity projection of the SWI over a slab of SlabSlices slices (SlabThicknessMm) "
                       "centred on each slice along voxel axis SlabAxis, on the SWI's grid."),
    Output("reference_mask", "anat", "mask", "reference", "nearest", written="reference csf",
           description="Reference region of the Chimap (its mean susceptibility is 0 there): the ventricular CSF, "
                       "found from the R2* map (see SusceptibilityReference)."),
    Output("r2star", "anat", "R2starmap", written="two echoes or more",
           description="Effective transverse relaxation rate R2* of the multi-echo magnitude, fitted per voxel "
                       "(mono-exponential decay; method in R2starFit), clipped to R2starRangeHz; 0 outside the "
                       "brain mask."),
    Output("t2star", "anat", "T2starmap", written="two echoes or more",
           description="Effective transverse relaxation time T2* = 1/R2* (see the R2starmap), at most "
                       "T2starMaxSeconds where R2* is near 0; 0 outside the brain mask."),
    Output("transform", "anat", "xfm", written="template spaces", extensions=(".mat", ".h5"),
           entities={"from": "orig", "mode": "image"}, bidsignore=("*_xfm.*",),
           description="Transform from the run's voxel grid (orig) to a template (entity to-), for "
                       "antsApplyTransforms (ITK format: .mat affine, .h5 composite)."),
)
#: The kinds resampled to each template output space.
TEMPLATE_OUTPUTS = tuple(key for key, output in OUTPUTS.items() if output.template)


def output_name(kind, entities, extension=None):
    """The file name of a derivative of ``kind`` (a key of :data:`OUTPUTS`).

    entities: pybids names (``subject``, ``session``, ..., and ``space``/``res`` for a template output,
    ``to`` for a transform); None values are left out; ``subject`` is required. The kind's ``desc`` and fixed
    entities come from the spec. extension: one of the kind's, or ``.json`` (its sidecar); default: the first.
    Raises ValueError for an unknown kind, entity or extension.
    """
    output = OUTPUTS[kind] if kind in OUTPUTS else None
    if output is None:
        raise ValueError(f"unknown derivative kind {kind!r}; the kinds are {sorted(OUTPUTS)}")
    extension = output.extension if extension is None else extension
    if extension not in (*output.extensions, ".json"):
        raise ValueError(f"{kind}: extension {extension!r} is not one of {[*output.extensions, '.json']}")
    given = {k: v for k, v in entities.items() if v is not None}
    if "desc" in given:
        raise ValueError(f"{kind}: the desc- label comes from the output spec ({output.desc!r}), not the entities")
    given.update(output.entities, **({"desc": output.desc} if output.desc else {}))
    unknown = sorted(set(given) - set(ENTITY_ORDER))
    if unknown:
        raise ValueError(f"{kind}: entities {unknown} have no place in a derivative name ({list(ENTITY_ORDER)})")
    if "subject" not in given:
        raise ValueError(f"{kind}: entities need a 'subject': {entities}")
    parts = [f"{short}-{given[key]}" for key, short in ENTITY_ORDER.items() if key in given]
    return "_".join(parts + [output.suffix]) + extension


def output_folder(root, entities, kind):
    """``root/sub-<label>[/ses-<label>]/<datatype>``: the folder of a derivative of ``kind``."""
    folder = Path(root) / f"sub-{entities['subject']}"
    if entities.get("session") is not None:
        folder = folder / f"ses-{entities['session']}"
    return folder / OUTPUTS[kind].datatype


def output_path(root, kind, entities, extension=None):
    """The path of a derivative of ``kind`` in the derivatives dataset ``root`` (see :func:`output_name`)."""
    return output_folder(root, entities, kind) / output_name(kind, entities, extension)


def sidecar_path(path):
    """The JSON sidecar of a derivative's image ``path`` (its extension, ``.nii.gz`` or other, replaced)."""
    path = Path(path)
    extensions = sorted({e for output in OUTPUTS.values() for e in output.extensions} | {".nii"}, key=len,
                        reverse=True)
    for extension in extensions:
        if path.name.endswith(extension):
            return path.with_name(path.name[: -len(extension)] + ".json")
    raise ValueError(f"{path}: not a derivative image (extensions {extensions})")


def parse_output_name(name):
    """``(kind, entities)`` of a derivative's image file name (the inverse of :func:`output_name`), else None.

    entities: pybids names -> labels (strings), without the kind's own ``desc`` and fixed entities, so that
    ``output_name(kind, entities)`` gives ``name`` back; a name that does not (entities out of order,
    unknown ones, another desc) is not a metaqsm derivative: None.
    """
    for key, output in OUTPUTS.items():
        for extension in output.extensions:
            end = f"_{output.suffix}{extension}"
            if not name.endswith(end):
                continue
            entities = {}
            for part in name[: -len(end)].split("_"):
                short, dash, label = part.partition("-")
                if not dash or short not in _BY_SHORT or _BY_SHORT[short] in entities:
                    return None
                entities[_BY_SHORT[short]] = label
            if entities.get("desc") != output.desc or any(entities.get(k) != v for k, v in output.entities.items()):
                continue  # another kind with this suffix (the masks), or not ours
            entities = {k: v for k, v in entities.items() if k != "desc" and k not in output.entities}
            try:
                if output_name(key, entities, extension) == name:
                    return key, entities
            except ValueError:
                return None
    return None


def run_name(entities):
    """The run's prefix, ``sub-01_ses-2_run-1``: its entities in BIDS order (no space, res, desc)."""
    return "_".join(f"{ENTITY_KEYS[key]}-{entities[key]}" for key in RUN_ENTITIES if entities.get(key) is not None)
