"""``metaqsm-simulate``: write a simulated multi-echo GRE BIDS dataset with its ground truth."""
import argparse
import time
from pathlib import Path

from .. import __version__
from ..sim.dataset import DERIVATIVE_NAME, RunSpec, simulate_dataset


def _positive(kind):
    def parse(value):
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value}: must be > 0")
        return number
    return parse


def build_parser():
    """The ``metaqsm-simulate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="metaqsm-simulate",
        description="Simulate multi-echo GRE MRI of an analytic head phantom and write it as a BIDS dataset, "
                    f"with the ground truth (susceptibility, labels, mask, R2*, field) in "
                    f"OUT_DIR/derivatives/{DERIVATIVE_NAME}/. The defaults make a demo dataset of two adult-size "
                    "heads in under a minute.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="dataset folder: new, empty, or an existing BIDS dataset")
    parser.add_argument("--participants", nargs="+", default=["01", "02"], metavar="LABEL",
                        help="participant labels (with or without 'sub-')")
    parser.add_argument("--sessions", nargs="+", metavar="LABEL", help="session labels (None: no ses- level)")
    parser.add_argument("--shape", nargs=3, type=_positive(int), default=list(RunSpec.shape), metavar="N",
                        help="voxels along i, j, k")
    parser.add_argument("--voxel-size", nargs=3, type=_positive(float), default=list(RunSpec.voxel_size_mm),
                        metavar="MM",
                        help="voxel size (mm) along i, j, k")
    parser.add_argument("--echo-times", nargs="+", type=_positive(float), default=[0.004, 0.008, 0.012, 0.016],
                        metavar="S", help="echo times (s)")
    parser.add_argument("--field-strength", type=_positive(float), default=3.0, metavar="T", help="B0 (tesla)")
    parser.add_argument("--oblique-deg", nargs="+", type=float, default=[0.0, 15.0], metavar="DEG",
                        help="slab tilt about the left-right axis, per participant (the list is cycled)")
    parser.add_argument("--peak-snr", type=_positive(float), default=100.0,
                        help="max first-echo magnitude over the noise standard deviation")
    parser.add_argument("--phase-units", choices=["rad", "arbitrary"], default="rad",
                        help="'rad': float radians; 'arbitrary': int16 -4096..4095 (Siemens style)")
    parser.add_argument("--head-scale", type=_positive(float), metavar="FACTOR",
                        help="size of the head relative to an adult's (None: shrink it to fit the in-plane FOV)")
    parser.add_argument("--lesions", action="store_true",
                        help="add an acute haemorrhage (0.8 ppm, 16 x 22 x 18 mm, basal ganglia) and a dense "
                             "calcification (-0.5 ppm, 8 mm, frontal white matter) to every head")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the first run (noise, phase offset); each next run adds 1")
    parser.add_argument("--name", default="metaqsm simulated MEGRE", help="dataset name")
    parser.add_argument("--version", action="version", version=f"metaqsm-simulate {__version__}")
    return parser


def main(argv=None):
    """Entry point of ``metaqsm-simulate``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    subjects = [p[4:] if p.startswith("sub-") else p for p in args.participants]
    sessions = [s[4:] if s.startswith("ses-") else s for s in args.sessions] if args.sessions else [None]
    runs = []
    for p, subject in enumerate(subjects):
        for session in sessions:
            runs.append(RunSpec(subject=subject, session=session, shape=tuple(args.shape),
                                voxel_size_mm=tuple(args.voxel_size),
                                oblique_deg=args.oblique_deg[p % len(args.oblique_deg)],
                                echo_times_s=tuple(args.echo_times), b0_tesla=args.field_strength,
                                peak_snr=args.peak_snr, phase_units=args.phase_units,
                                seed=args.seed + len(runs), scale=args.head_scale, lesions=args.lesions))
    start = time.perf_counter()
    try:
        written = simulate_dataset(args.out_dir, runs, name=args.name)
    except ValueError as err:
        parser.error(str(err))
    for spec in runs:
        label = f"sub-{spec.subject}" + (f" ses-{spec.session}" if spec.session else "")
        print(f"{label}: {len(spec.echo_times_s)} echoes, {'x'.join(map(str, spec.shape))} voxels of "
              f"{'x'.join(f'{v:g}' for v in spec.voxel_size_mm)} mm, oblique {spec.oblique_deg:g} deg, "
              f"B0 {spec.b0_tesla:g} T, peak SNR {spec.peak_snr:g}, phase in {spec.phase_units}"
              + (", with lesions" if spec.lesions else ""))
    root = Path(args.out_dir)
    for path in written:
        print(f"  {Path(path).relative_to(root)}")
    print(f"wrote {len(written)} files to {root} (ground truth in derivatives/{DERIVATIVE_NAME}/) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
