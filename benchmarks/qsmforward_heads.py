"""qsm-forward (a peer's simulator) on the MNI head phantom at the benchmark protocols, with its defaults.

Shim field and phase offset on, peak SNR 100, ``save_field=True`` and ``save_shimmed_field=True``:
the true shimmed total field is what field mapping should recover, the true local field what
background removal should. Known traps of qsm-forward handled here:

* its ``generate_field`` pads 2x in float64 (~20 GB for a 0.5 mm head) and its shim evaluates
  a 20-column polynomial model on every voxel at once: both are replaced during the run by
  float32 / chunked versions computing the same thing (checked against the originals on a small
  grid in ``tests/test_qsm_forward_e2e.py``);
* with B0 not along the slice axis its output affines are wrong: every output is rewritten
  with an affine whose rotation takes the B0 direction in voxel axes to world z, so that
  ``metaqsm_bids.qsm.physics.b0_direction_voxel`` gives back the simulated direction;
* its kernel scales axis 0 by voxel_size[1] (equal in-plane sizes keep it right) and its resize
  drops the affine's translation (the phantom has none).

Usage as a module: :func:`simulate` (cached on disk); ``python benchmarks/qsmforward_heads.py OUT
[--lesions] [--realistic-magnitude] [--warped] [--protocols NAME ...]`` simulates every protocol (or those
named; ``--lesions``: the head with :data:`~metaqsm_bids.sim.mni_head.LESIONS`; ``--realistic-magnitude``:
the head whose magnitude is no oracle for chi, ``mni_head(realistic_magnitude=True)``; ``--warped``: another
anatomy, the head deformed smoothly, ``mni_head(warp_seed=WARP_SEED)``, on which to check that a network's
gain does not come from the MNI152 anatomy its training crops are cut from).
"""
import contextlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import qsm_forward.qsm_forward as qf
import scipy.fft as sfft

from metaqsm_bids.sim.mni_head import mni_head

#: qsm-forward's gyromagnetic ratio (MHz/T), with which its phase was made from its ppm field.
QF_GAMMA_MHZ_PER_T = 42.58
B0_TESLA = 3.0
#: The one participant of each head's dataset (qsm-forward's ``subject``), as pybids entities.
SUBJECT = {"subject": "1"}
#: The deformation of the ``warped`` heads (``mni_head``'s ``warp_seed``).
WARP_SEED = 1


@dataclass(frozen=True)
class Protocol:
    name: str
    voxel_mm: tuple  # acquisition grid
    phantom_mm: tuple  # the grid the field is computed on (finer or equal)
    echo_times_s: tuple
    b0_dir: tuple = (0.0, 0.0, 1.0)  # in voxel axes


def _tilted(deg):
    return (0.0, float(np.sin(np.radians(deg))), float(np.cos(np.radians(deg))))


PROTOCOLS = {p.name: p for p in (
    Protocol("0.5x0.5x2", (0.5, 0.5, 2.0), (0.5, 0.5, 1.0), tuple(5e-3 * n for n in range(1, 6))),
    Protocol("0.76x0.76x3", (0.76, 0.76, 3.0), (0.76, 0.76, 1.0), tuple(12.6e-3 + 4.1e-3 * n for n in range(7))),
    # the field on the acquisition grid: with an oblique B0, qsm-forward's resize misregisters the
    # signal against its saved truth (BENCHMARKS.md, "Why 1 mm oblique ...")
    Protocol("1mm-oblique", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), tuple(4e-3 + 6e-3 * n for n in range(5)),
             b0_dir=_tilted(11.0)),
    Protocol("0.75x0.75x1.5", (0.75, 0.75, 1.5), (0.75, 0.75, 0.75), tuple(4e-3 + 5e-3 * n for n in range(6))),
)}


def generate_field_float32(chi, mask=None, voxel_size=(1, 1, 1), B0_dir=(0, 0, 1)):
    """qsm-forward's ``generate_field`` (its kernel, its 2x padding with the corner value) in float32 rfft."""
    dims = np.array(chi.shape)
    full = 2 * dims
    padded = np.full(full, chi[-1, -1, -1], dtype=np.float32)
    padded[:dims[0], :dims[1], :dims[2]] = chi
    spectrum = sfft.rfftn(padded, workers=-1)
    del padded
    # its kernel on the rfft half grid: array axis 1 is its "kx" (scaled by voxel_size[0]) paired
    # with B0_dir[1], axis 0 its "ky" (scaled by voxel_size[1]) paired with B0_dir[0]. Its Nyquist
    # frequencies are -1/2; taking the real part of its ifftn averages D(k) and D(-k), which cancels
    # the cross terms between a Nyquist component and the others: done here explicitly, for irfftn
    freqs = [np.fft.fftfreq(n) for n in full[:2]] + [np.fft.rfftfreq(full[2])]
    scale = (voxel_size[1], voxel_size[0], voxel_size[2])
    pair = (B0_dir[0], B0_dir[1], B0_dir[2])
    k2 = np.float32(0)
    projection = {True: np.float32(0), False: np.float32(0)}  # Nyquist part, the rest
    for axis, (f, d, b) in enumerate(zip(freqs, scale, pair)):
        f = f.copy()
        nyquist = np.isclose(np.abs(f), 0.5)
        f[nyquist] = -0.5
        shape = [1, 1, 1]
        shape[axis] = -1
        k = (f / d).astype(np.float32).reshape(shape)
        k2 = k2 + k ** 2
        for is_nyq in (True, False):
            projection[is_nyq] = projection[is_nyq] + np.where(nyquist.reshape(shape) == is_nyq, k, 0) * np.float32(b)
    k2[0, 0, 0] = np.finfo(float).eps
    kernel = np.float32(1 / 3) - (projection[True] ** 2 + projection[False] ** 2) / k2
    del k2
    spectrum *= kernel
    del kernel
    field = sfft.irfftn(spectrum, s=full, workers=-1)[:dims[0], :dims[1], :dims[2]].astype(np.float64)
    if mask is not None:
        field = field - np.mean(field[mask != 0])
    return field


def generate_shimmed_field_chunked(field, mask, order=2):
    """qsm-forward's ``generate_shimmed_field`` with the fitted polynomial evaluated a slab at a time."""
    dim = field.shape
    x1, y1, z1 = np.nonzero(mask)
    model = qf._create_model(x1, y1, z1, dim, order)
    b = np.linalg.pinv(model) @ field[x1, y1, z1]
    del model
    fit = np.empty(dim)
    for k in range(dim[2]):
        i, j = np.meshgrid(range(dim[0]), range(dim[1]), indexing="ij")
        fit[:, :, k] = (qf._create_model(i.ravel(), j.ravel(), np.full(i.size, k), dim, order) @ b).reshape(dim[:2])
    return fit, field - fit, b


@contextlib.contextmanager
def lean_qsm_forward():
    """qsm-forward with :func:`generate_field_float32` and :func:`generate_shimmed_field_chunked`."""
    saved = qf.generate_field, qf.generate_shimmed_field
    qf.generate_field, qf.generate_shimmed_field = generate_field_float32, generate_shimmed_field_chunked
    try:
        yield
    finally:
        qf.generate_field, qf.generate_shimmed_field = saved


def b0_affine(voxel_mm, b0_dir):
    """Affine (no translation) whose rotation takes ``b0_dir`` (voxel axes) to world +z."""
    rotation = qf.rotation_matrix_from_vectors(np.asarray(b0_dir, float), np.array([0.0, 0.0, 1.0]))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(voxel_mm)
    return affine


@dataclass
class Simulation:
    """Paths and truth of one simulated protocol (arrays on the acquisition grid)."""

    protocol: Protocol
    bids_dir: Path
    affine: np.ndarray
    chi_ppm: np.ndarray
    seg: np.ndarray
    brain_mask: np.ndarray
    total_field_hz: np.ndarray  # the true shimmed total field
    local_field_hz: np.ndarray
    magnitude: np.ndarray  # echo last
    phase_rad: np.ndarray  # echo last

    @property
    def derivatives(self):
        return self.bids_dir / "derivatives" / "qsm-forward" / "sub-1" / "anat"


def _rewrite_affines(folder, affine):
    for path in sorted(Path(folder).rglob("*.nii")):
        data = np.asanyarray(nib.load(path, mmap=False).dataobj)  # in memory: the file is rewritten in place
        out = nib.Nifti1Image(data, affine)
        out.header.set_xyzt_units("mm", "sec")
        nib.save(out, path)


def simulate(protocol, cache_dir, seed=0, lesions=False, realistic_magnitude=False, warped=False):
    """Simulate ``protocol`` (a :class:`Protocol` or its name) once into ``cache_dir/<name>`` (``<name>-lesions``
    for the head with :data:`~metaqsm_bids.sim.mni_head.LESIONS`, then ``-realmag`` for the head whose magnitude
    is no oracle for chi: ``mni_head``'s ``realistic_magnitude``, then ``-warped`` for the deformed anatomy);
    load it."""
    protocol = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
    root = Path(cache_dir) / (protocol.name + ("-lesions" if lesions else "")
                              + ("-realmag" if realistic_magnitude else "") + ("-warped" if warped else ""))
    bids_dir = root / "bids"
    done = root / "done.json"
    affine = b0_affine(protocol.voxel_mm, protocol.b0_dir)
    settings = {"protocol": json.loads(json.dumps(asdict(protocol))), "seed": seed,
                **({"lesions": True} if lesions else {}),
                **({"realistic_magnitude": True} if realistic_magnitude else {}),
                **({"warp_seed": WARP_SEED} if warped else {})}
    if done.exists() and json.loads(done.read_text()) != settings:  # a cache of other settings
        shutil.rmtree(root)
    if not done.exists():
        paths = mni_head(protocol.phantom_mm, seed=seed, lesions=lesions, realistic_magnitude=realistic_magnitude,
                         warp_seed=WARP_SEED if warped else None).save(root / "phantom")
        tissue = qf.TissueParams(chi=paths["chi"], M0=paths["M0"], R1=paths["R1"], R2star=paths["R2star"],
                                 mask=paths["mask"], seg=paths["seg"], voxel_size=np.array(protocol.phantom_mm))
        recon = qf.ReconParams(subject=SUBJECT["subject"], voxel_size=np.array(protocol.voxel_mm),
                               TEs=np.array(protocol.echo_times_s), B0=B0_TESLA, B0_dir=np.array(protocol.b0_dir),
                               peak_snr=100, random_seed=11 + seed)
        with lean_qsm_forward():
            qf.generate_bids(tissue, recon, str(bids_dir), save_field=True, save_shimmed_field=True)
        _rewrite_affines(bids_dir, affine)
        # BIDS needs what qsm-forward leaves out; the validator must pass on the input
        description = json.loads((bids_dir / "dataset_description.json").read_text())
        description["Authors"] = ["metaqsm benchmark"]
        (bids_dir / "dataset_description.json").write_text(json.dumps(description))
        done.write_text(json.dumps(settings))
    return load(protocol, bids_dir, affine)


def load(protocol, bids_dir, affine):
    deriv = Path(bids_dir) / "derivatives" / "qsm-forward" / "sub-1" / "anat"
    anat = Path(bids_dir) / "sub-1" / "anat"

    def read(path):
        return np.asarray(nib.load(path).dataobj, dtype=np.float32)

    ppm_to_hz = B0_TESLA * QF_GAMMA_MHZ_PER_T
    # the label map comes back as floats a little off the labels (7.969 for 8): rounded, not truncated
    n_echo = len(protocol.echo_times_s)
    return Simulation(
        protocol, Path(bids_dir), affine,
        chi_ppm=read(deriv / "sub-1_Chimap.nii"), seg=np.rint(read(deriv / "sub-1_dseg.nii")).astype(np.int32),
        brain_mask=read(deriv / "sub-1_mask.nii") > 0.5,
        total_field_hz=read(deriv / "sub-1_desc-shimmed_fieldmap.nii") * np.float32(ppm_to_hz),
        local_field_hz=read(deriv / "sub-1_fieldmap-local.nii") * np.float32(ppm_to_hz),
        magnitude=np.stack([read(anat / f"sub-1_echo-{n}_part-mag_MEGRE.nii") for n in range(1, n_echo + 1)], -1),
        phase_rad=np.stack([read(anat / f"sub-1_echo-{n}_part-phase_MEGRE.nii") for n in range(1, n_echo + 1)], -1),
    )


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--lesions", action="store_true")
    parser.add_argument("--realistic-magnitude", action="store_true")
    parser.add_argument("--warped", action="store_true")
    parser.add_argument("--protocols", nargs="+", choices=sorted(PROTOCOLS), default=list(PROTOCOLS))
    args = parser.parse_args()
    for name in args.protocols:
        sim = simulate(name, args.out, lesions=args.lesions, realistic_magnitude=args.realistic_magnitude,
                       warped=args.warped)
        print(name, sim.chi_ppm.shape, int(sim.brain_mask.sum()))
