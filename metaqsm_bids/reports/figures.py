"""Quality-control figures of one run: orthogonal views, susceptibility, R2* and SWI mIP mosaics (PNG, matplotlib Agg).

Every image is reoriented to the closest RAS axes of its affine (nibabel's
``as_closest_canonical``) before plotting, so flipped or permuted storage orders
display the same way; oblique acquisitions are shown in their own slice planes
and the figure says by how much they are tilted. Panels follow the neurological
convention: the subject's left is on the viewer's left, with L/R (and A/P, S/I)
letters on every panel. Voxels are drawn at their true aspect ratio (mm).
"""
from dataclasses import dataclass

import matplotlib
import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from nibabel.affines import obliquity

#: Fixed display range of the susceptibility (ppm), so maps compare across runs and subjects.
CHI_RANGE_PPM = (-0.15, 0.15)
#: Fixed display range of R2* (1/s at 3 T, scaled with B0): grey matter 15-20, white matter 20-25, the iron-rich
#: nuclei 30-50; CSF near 0; veins and haemorrhages saturate.
R2STAR_RANGE_HZ_AT_3T = (0.0, 60.0)
#: Fixed display range of the echo-fit residual (rad): twice the default reliability threshold (0.5 rad).
RESIDUAL_RANGE_RAD = (0.0, 1.0)
#: Colour of the voxels the reliability map excludes, drawn over the magnitude.
EXCLUDED_COLOUR = (1.0, 0.85, 0.0)  # yellow: apart from the red brain-mask outline

#: Margin (mm) kept around the brain mask when cropping the views.
_CROP_MARGIN_MM = 8.0
_FIELD_CMAP = "RdBu_r"
_BACKGROUND = "black"


@dataclass
class RunImages:
    """The images of one run in RAS-closest voxel order; any entry may be None when its file is missing.

    ``zooms_mm`` is the voxel size along the displayed axes (x: left-right, y: posterior-anterior,
    z: inferior-superior); ``oblique_deg`` the largest angle between a voxel axis and the scanner axes.
    The images are named as the output spec names their kinds (:data:`metaqsm_bids.io.outputs.OUTPUTS`), in
    their files' units: fields in Hz, the echo-fit residual in rad, the Chimap in ppm, R2* in 1/s.
    """

    magnitude: np.ndarray = None
    brain_mask: np.ndarray = None
    reliable_mask: np.ndarray = None
    qsm_mask: np.ndarray = None
    total_field: np.ndarray = None
    fit_residual: np.ndarray = None
    local_field: np.ndarray = None
    chimap: np.ndarray = None
    r2star: np.ndarray = None
    swi: np.ndarray = None
    mip: np.ndarray = None
    zooms_mm: tuple = (1.0, 1.0, 1.0)
    oblique_deg: float = 0.0


def load_run_images(paths):
    """Load a run's images (``paths``: kind -> NIfTI path or None) reoriented to the closest RAS axes.

    Kinds: the fields of :class:`RunImages` but the geometry (masks become boolean). Raises
    ValueError if the images do not share one grid, since overlays would then be misplaced.
    """
    images, reference = RunImages(), None
    for kind, path in paths.items():
        if path is None:
            continue
        img = nib.load(str(path))
        if reference is None:
            reference = (kind, img)
            canonical = nib.as_closest_canonical(img)
            images.zooms_mm = tuple(float(z) for z in canonical.header.get_zooms()[:3])
            images.oblique_deg = float(np.rad2deg(obliquity(img.affine)).max())
        elif img.shape[:3] != reference[1].shape[:3] or not np.allclose(img.affine, reference[1].affine, atol=1e-3):
            raise ValueError(f"{path}: grid differs from the run's {reference[0]} image; cannot overlay them")
        data = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)
        if kind.endswith("mask"):
            data = data > 0
        setattr(images, kind, data)
    return images


def nice_limit(value):
    """Smallest of 1, 2, 2.5, 5 x 10^n not below ``value`` (> 0), for readable colour bars."""
    if not np.isfinite(value) or value <= 0:
        return 1.0
    exponent = np.floor(np.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * 10**exponent >= value * (1 - 1e-9):
            return float(step * 10**exponent)
    return float(10 ** (exponent + 1))


def field_range_hz(field_hz, mask):
    """Symmetric display limit (Hz): the 99th percentile of |field| in ``mask``, rounded up to a nice number."""
    if field_hz is None:
        return 1.0
    values = field_hz[mask] if mask is not None and mask.any() else field_hz
    values = np.abs(values[np.isfinite(values)])
    return nice_limit(np.percentile(values, 99)) if values.size else 1.0


def _crop_box(images):
    """Voxel slices around the brain mask (plus a margin), or the whole grid without a mask."""
    shape = next(a.shape for a in (images.magnitude, images.brain_mask, images.chimap, images.total_field,
                                   images.local_field, images.qsm_mask, images.r2star) if a is not None)
    mask = images.brain_mask
    if mask is None or not mask.any():
        return tuple(slice(0, n) for n in shape)
    box = []
    for axis, zoom in enumerate(images.zooms_mm):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        margin = int(np.ceil(_CROP_MARGIN_MM / zoom))
        box.append(slice(max(hit[0] - margin, 0), min(hit[-1] + margin + 1, shape[axis])))
    return tuple(box)


def _centre(images, box):
    """Slice indices (within ``box``) through the centre of mass of the mask, or the box centre."""
    mask = images.qsm_mask if images.qsm_mask is not None and images.qsm_mask.any() else images.brain_mask
    if mask is None or not mask.any():
        return tuple((b.stop - b.start) // 2 for b in box)
    centre = np.argwhere(mask[box]).mean(axis=0)
    return tuple(int(round(c)) for c in centre)


# (name, fixed axis, horizontal axis, letters at left/right/bottom/top); the array is (x, y, z) = RAS
_VIEWS = (
    ("sagittal", 0, 1, ("P", "A", "I", "S")),
    ("coronal", 1, 0, ("L", "R", "I", "S")),
    ("axial", 2, 0, ("L", "R", "P", "A")),
)


def section(volume, view, index):
    """The 2D section of a RAS-closest ``volume`` shown in ``view`` ("sagittal", "coronal", "axial").

    Columns run left to right on screen (posterior to anterior for sagittal, the subject's left to
    right otherwise: neurological convention); row 0 is drawn at the bottom (``origin="lower"``).
    """
    axis = {name: axis for name, axis, _, _ in _VIEWS}[view]
    return np.take(volume, index, axis=axis).T


def _draw_letters(ax, letters):
    style = dict(color="white", fontsize=11, fontweight="bold", transform=ax.transAxes,
                 bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.6, linewidth=0))
    left, right, bottom, top = letters
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)


def _view_aspect(zooms, axis, horizontal):
    vertical = ({0, 1, 2} - {axis, horizontal}).pop()
    return zooms[vertical] / zooms[horizontal]


def _masked(volume, mask):
    if volume is None:
        return None
    if mask is None:
        return volume
    return np.where(mask, volume, np.nan)


def plot_overview(images, out_path, chi_range_ppm=CHI_RANGE_PPM, title=""):
    """Orthogonal views of magnitude + mask outlines, total field, local field and Chimap; saves a PNG.

    Returns the display ranges used: ``{"total_field": lim, "local_field": lim, "chimap": (lo, hi)}``
    (fields are shown on +-lim, the 99th percentile of |field| in the mask, rounded up to a nice number).
    """
    box = _crop_box(images)
    centre = _centre(images, box)
    total_lim = field_range_hz(images.total_field, images.brain_mask)
    local_lim = field_range_hz(images.local_field, images.qsm_mask)
    magnitude = _crop(images.magnitude, box)
    rows = [
        ("Magnitude (RSS)\nred: brain mask\ncyan: QSM mask", magnitude,
         dict(cmap="gray", vmin=0, vmax=_magnitude_limit(magnitude, _crop(images.brain_mask, box))), "a.u."),
        ("Total field\n(brain mask)", _masked(_crop(images.total_field, box), _crop(images.brain_mask, box)),
         dict(cmap=_FIELD_CMAP, vmin=-total_lim, vmax=total_lim), "Hz"),
        ("Local field\n(QSM mask)", _masked(_crop(images.local_field, box), _crop(images.qsm_mask, box)),
         dict(cmap=_FIELD_CMAP, vmin=-local_lim, vmax=local_lim), "Hz"),
        ("Susceptibility\n(Chimap, QSM mask)", _masked(_crop(images.chimap, box), _crop(images.qsm_mask, box)),
         dict(cmap="gray", vmin=chi_range_ppm[0], vmax=chi_range_ppm[1]), "ppm"),
    ]
    fig = Figure(figsize=(11.0, 12.4), dpi=100, facecolor="white")
    grid = fig.add_gridspec(len(rows), 5, width_ratios=[0.9, 1, 1, 1, 0.07], wspace=0.06, hspace=0.12,
                            left=0.01, right=0.93, top=0.90, bottom=0.02)
    panels = [(view, centre[axis], view) for view, axis, _, _ in _VIEWS]

    def outline_masks(ax, view, index):
        for mask, colour in ((images.brain_mask, "red"), (images.qsm_mask, "cyan")):
            if mask is not None and mask[box].any():
                ax.contour(section(mask[box], view, index).astype(np.float32), levels=[0.5], colors=colour,
                           linewidths=1.0, origin="lower")

    _draw_rows(fig, grid, rows, panels, images.zooms_mm, outline_masks, label_size=12, small_size=11)
    fig.suptitle(title, fontsize=14, y=0.985)
    fig.text(0.5, 0.935, _orientation_note(images), ha="center", va="center", fontsize=11)
    fig.savefig(out_path, format="png", metadata={"Software": None})
    return {"total_field": total_lim, "local_field": local_lim, "chimap": tuple(chi_range_ppm)}


def _axial_slices(mask, n_slices):
    """Up to ``n_slices`` axial indices spread over the slices that ``mask`` fills (all slices if none)."""
    filled = np.flatnonzero(mask.any(axis=(0, 1)))
    if filled.size == 0:
        filled = np.arange(mask.shape[2])
    # skip the first and last tenth: the mask's caps hold too few voxels to judge
    inner = filled[int(0.1 * filled.size): max(int(np.ceil(0.9 * filled.size)), int(0.1 * filled.size) + 1)]
    return np.unique(np.linspace(inner[0], inner[-1], min(n_slices, inner.size)).round().astype(int))


def plot_chi_mosaic(images, out_path, chi_range_ppm=CHI_RANGE_PPM, n_slices=12, columns=6, title=""):
    """Axial mosaic of the Chimap on the fixed ppm range, slices spread over the QSM mask; saves a PNG.

    Returns the slice indices shown (along the RAS-closest inferior-superior axis).
    """
    if images.chimap is None:
        raise ValueError("no Chimap to plot")
    mask = images.qsm_mask if images.qsm_mask is not None else np.isfinite(images.chimap)
    return _plot_mosaic(images, images.chimap, mask, chi_range_ppm, "ppm", "gray", out_path, n_slices, columns,
                        title)


def plot_r2star_mosaic(images, out_path, r2star_range_hz=R2STAR_RANGE_HZ_AT_3T, n_slices=12, columns=6, title=""):
    """Axial mosaic of the R2* map (1/s) on a fixed range, slices spread over the brain mask (where R2* is
    defined); saves a PNG. Returns the slice indices shown."""
    if images.r2star is None:
        raise ValueError("no R2* map to plot")
    mask = images.brain_mask if images.brain_mask is not None else images.r2star > 0
    return _plot_mosaic(images, images.r2star, mask, r2star_range_hz, "R2* (1/s)", "inferno", out_path,
                        n_slices, columns, title)


def mip_range(images):
    """Display range (arbitrary units) of the SWI's mIP: 0 to the 99th percentile in the brain mask (the
    magnitude's scale is the scanner's), rounded up to a nice number."""
    mask = images.brain_mask if images.brain_mask is not None and images.brain_mask.any() else images.mip > 0
    values = images.mip[mask & np.isfinite(images.mip)]
    return 0.0, nice_limit(np.percentile(values, 99)) if values.size else 1.0


def plot_mip_mosaic(images, out_path, display_range, n_slices=12, columns=6, title=""):
    """Axial mosaic of the SWI's minimum-intensity projection (arbitrary units, grey: veins dark) on
    ``display_range`` in the brain mask; saves a PNG. Returns the slice indices shown."""
    if images.mip is None:
        raise ValueError("no SWI mIP to plot")
    mask = images.brain_mask if images.brain_mask is not None else np.isfinite(images.mip)
    return _plot_mosaic(images, images.mip, mask, display_range, "SWI mIP (arbitrary units)", "gray", out_path,
                        n_slices, columns, title)


def _plot_mosaic(images, volume, mask, display_range, unit, cmap, out_path, n_slices, columns, title):
    """Axial mosaic of ``volume`` in ``mask`` (black outside) on the fixed ``display_range`` with a colour bar
    labelled ``unit``; slices spread over the mask. Returns the slice indices shown."""
    box = _crop_box(images)
    shown = _masked(volume[box], mask[box])
    slices = _axial_slices(mask[box], n_slices)
    columns = min(columns, slices.size)
    rows = int(np.ceil(slices.size / columns))
    # one tiled image (rows: posterior-anterior, columns: left-right), so panels need no axes of their own
    ny, nx = shown.shape[1], shown.shape[0]
    tiled = np.full((rows * ny, columns * nx), np.nan, dtype=np.float32)
    for n, k in enumerate(slices):
        r, c = rows - 1 - n // columns, n % columns  # first slice at the top left (origin is lower)
        tiled[r * ny:(r + 1) * ny, c * nx:(c + 1) * nx] = shown[:, :, k].T
    aspect = images.zooms_mm[1] / images.zooms_mm[0]
    width = 11.0
    image_h = width * 0.9 * (rows * ny * aspect) / (columns * nx)
    fig = Figure(figsize=(width, image_h + 1.1), dpi=100, facecolor="white")
    ax = fig.add_axes((0.01, 0.02, 0.86, image_h / (image_h + 1.1)))
    image = ax.imshow(tiled, origin="lower", cmap=_cmap(cmap), vmin=display_range[0], vmax=display_range[1],
                      aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for edge in range(1, columns):
        ax.axvline(edge * nx - 0.5, color="white", linewidth=1.5)
    for edge in range(1, rows):
        ax.axhline(edge * ny - 0.5, color="white", linewidth=1.5)
    for n, k in enumerate(slices):
        r, c = rows - 1 - n // columns, n % columns
        ax.text(c * nx + 1, (r + 1) * ny - 1.5, f"z={box[2].start + k}", color="yellow", fontsize=9,
                ha="left", va="top")
    style = dict(color="white", fontsize=11, fontweight="bold")
    top = rows * ny
    ax.text(1, top - ny / 2, "L", ha="left", va="center", **style)
    ax.text(nx - 2, top - ny / 2, "R", ha="right", va="center", **style)
    ax.text(nx / 2, top - 2, "A", ha="center", va="top", **style)
    ax.text(nx / 2, top - ny + 1, "P", ha="center", va="bottom", **style)
    bar = fig.colorbar(image, cax=fig.add_axes((0.885, 0.04, 0.015, image_h / (image_h + 1.1) - 0.04)))
    bar.set_label(_range_label({"vmin": display_range[0], "vmax": display_range[1]}, unit), fontsize=11)
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=13, y=1 - 0.25 / height)
    fig.text(0.5, 1 - 0.65 / height, "Axial slices from inferior (top left) to superior. "
             + _orientation_note(images), ha="center", va="center", fontsize=10)
    fig.savefig(out_path, format="png", metadata={"Software": None})
    return [int(box[2].start + k) for k in slices]


def plot_reliability(images, out_path, n_slices=6, title=""):
    """Axial slices of the reliability map: the magnitude with the brain mask outlined and the voxels the map
    excludes filled in :data:`EXCLUDED_COLOUR`, and below it the echo-fit residual on :data:`RESIDUAL_RANGE_RAD`
    in the brain mask (when there is one); saves a PNG. The slices are those with the most excluded voxels,
    then slices spread over the brain mask, ``n_slices`` in all. Returns the slice indices shown (RAS-closest
    inferior-superior axis)."""
    if images.reliable_mask is None or images.brain_mask is None:
        raise ValueError("no reliability map and brain mask to plot")
    box = _crop_box(images)
    brain = images.brain_mask[box]
    excluded = brain & ~images.reliable_mask[box]
    per_slice = excluded.sum(axis=(0, 1))
    worst = [int(k) for k in np.argsort(-per_slice, kind="stable")[:n_slices] if per_slice[k] > 0]
    spread = [int(k) for k in _axial_slices(brain, n_slices) if k not in worst]
    slices = np.sort(np.array(worst + spread[:n_slices - len(worst)], dtype=int))
    magnitude = _crop(images.magnitude, box)
    rows = [("Magnitude (RSS)\nred: brain mask\nyellow: excluded", magnitude,
             dict(cmap="gray", vmin=0, vmax=_magnitude_limit(magnitude, brain)), "a.u.")]
    if images.fit_residual is not None:
        rows.append(("Echo-fit residual\n(brain mask)", _masked(images.fit_residual[box], brain),
                     dict(cmap="viridis", vmin=RESIDUAL_RANGE_RAD[0], vmax=RESIDUAL_RANGE_RAD[1]), "rad"))
    overlay = np.zeros(excluded.shape + (4,), np.float32)
    overlay[excluded] = (*EXCLUDED_COLOUR, 1.0)
    aspect = _view_aspect(images.zooms_mm, 2, 0)
    panel_h = 1.7 * aspect * brain.shape[1] / brain.shape[0]
    fig = Figure(figsize=(11.0, len(rows) * panel_h + 1.2), dpi=100, facecolor="white")
    grid = fig.add_gridspec(len(rows), slices.size + 2, width_ratios=[1.1] + [1] * slices.size + [0.07],
                            wspace=0.05, hspace=0.08, left=0.01, right=0.93, top=1 - 1.0 / fig.get_figheight(),
                            bottom=0.02)
    # two lines: "z=123: 12345 excluded" on one is wider than a panel
    panels = [("axial", k, f"z={box[2].start + k}\n{per_slice[k]} excluded") for k in slices]

    def mark_excluded(ax, view, index):
        ax.imshow(np.transpose(overlay[:, :, index], (1, 0, 2)), origin="lower", interpolation="nearest",
                  aspect=aspect)
        if brain[:, :, index].any():
            ax.contour(section(brain, view, index).astype(np.float32), levels=[0.5], colors="red",
                       linewidths=0.8, origin="lower")

    _draw_rows(fig, grid, rows, panels, images.zooms_mm, mark_excluded, label_size=11, small_size=9)
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=13, y=1 - 0.2 / height)
    fig.text(0.5, 1 - 0.5 / height, f"{int(excluded.sum())} brain-mask voxels excluded. "
             + _orientation_note(images), ha="center", va="center", fontsize=10)
    fig.savefig(out_path, format="png", metadata={"Software": None})
    return [int(box[2].start + k) for k in slices]


def _draw_rows(fig, grid, rows, panels, zooms_mm, overlay, label_size, small_size):
    """Draw rows of image panels into ``grid``: a label column, one column per panel, a colour bar per row.

    ``rows``: (label, volume, style, unit), style holding cmap/vmin/vmax; ``panels``: (view, slice index,
    column title); ``overlay(ax, view, index)`` draws over the panels of the first row.
    """
    geometry = {name: (axis, horizontal, letters) for name, axis, horizontal, letters in _VIEWS}
    for r, (label, volume, style, unit) in enumerate(rows):
        label_ax = fig.add_subplot(grid[r, 0])
        label_ax.axis("off")
        label_ax.text(0.95, 0.5, label, ha="right", va="center", fontsize=label_size, transform=label_ax.transAxes)
        image = None
        for c, (view, index, column_title) in enumerate(panels):
            axis, horizontal, letters = geometry[view]
            ax = fig.add_subplot(grid[r, c + 1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor(_BACKGROUND)
            if r == 0:
                ax.set_title(column_title, fontsize=small_size)
            if volume is None:
                ax.text(0.5, 0.5, "file missing", color="white", ha="center", va="center", transform=ax.transAxes)
                continue
            image = ax.imshow(section(volume, view, index), origin="lower", interpolation="nearest",
                              aspect=_view_aspect(zooms_mm, axis, horizontal), vmin=style["vmin"],
                              vmax=style["vmax"], cmap=_cmap(style["cmap"]))
            if r == 0:
                overlay(ax, view, index)
            _draw_letters(ax, letters)
        if image is not None:
            bar = fig.colorbar(image, cax=fig.add_subplot(grid[r, len(panels) + 1]))
            bar.set_label(_range_label(style, unit), fontsize=small_size)
            bar.ax.tick_params(labelsize=small_size - 1)


def _magnitude_limit(magnitude, mask):
    """Upper display limit: the 99.5th percentile in the mask, so a few bright vessels do not set the scale."""
    if magnitude is None:
        return 1.0
    values = magnitude[mask] if mask is not None and mask.any() else magnitude.ravel()
    return float(np.percentile(values, 99.5)) if values.size else 1.0


def _crop(volume, box):
    return None if volume is None else volume[box]


def _cmap(name):
    return matplotlib.colormaps[name].with_extremes(bad=_BACKGROUND)  # NaN: outside the mask


def _range_label(style, unit):
    return f"{unit}   (range {style['vmin']:.3g} to {style['vmax']:.3g})"


def _orientation_note(images):
    note = "Neurological convention: subject's left on image left"
    if images.oblique_deg > 1.0:
        note += f"; oblique slab tilted {images.oblique_deg:.0f}\u00b0"
    return note
