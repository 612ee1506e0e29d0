"""``metaqsm-train``: train Meta-QSM (or Mesa-QSM) on synthetic data, resume, and export to package data."""
import argparse
import shlex
import sys
from pathlib import Path

from ..qsm.network.deepqsm import MODELS_DIR


def build_parser():
    from ..training.train import DEFAULTS

    p = argparse.ArgumentParser(prog="metaqsm-train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, logs); keep it out of the repo")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="train until this many steps in total")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--patch", type=int, nargs=3, default=DEFAULTS["patch"], metavar=("I", "J", "K"),
                   help="training crop size in voxels (each a multiple of fold * 2**(levels - 1))")
    p.add_argument("--channels", type=int, nargs="+", default=DEFAULTS["channels"],
                   help="U-Net width of each level, top first (their number is the number of levels)")
    p.add_argument("--fold", type=int, default=DEFAULTS["fold"],
                   help="voxel block edge folded into channels before the first convolution (1: none)")
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help="WP-Conv predictor hidden width")
    p.add_argument("--arch", choices=("meta", "mesa"), default=DEFAULTS["arch"],
                   help="meta: weight-predicting convolutions; mesa: plain convolutions at one resolution")
    p.add_argument("--fixed-voxel-size", type=float, nargs=3, metavar=("DI", "DJ", "DK"),
                   help="train at this voxel size (mm) only (required for --arch mesa)")
    p.add_argument("--conditioning", choices=("voxel", "voxel+b0"), default=DEFAULTS["conditioning"],
                   help="what the weight predictor sees: voxel size, or voxel size and B0 direction")
    p.add_argument("--input", choices=("field", "field+tkd"), default=DEFAULTS["input"],
                   help="network input: the local field (the paper's), or the field and its TKD inverse "
                        "with the network learning TKD's correction (residual)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="initial RMSprop learning rate")
    p.add_argument("--lr-decay", type=float, default=DEFAULTS["lr_decay"], help="learning-rate factor per decay period")
    p.add_argument("--lr-decay-steps", type=int, default=DEFAULTS["lr_decay_steps"], help="decay period (steps)")
    p.add_argument("--l2", type=float, default=DEFAULTS["l2"], help="L2 strength on the convolution/predictor weights")
    p.add_argument("--val-every", type=int, default=DEFAULTS["val_every"], help="validate every N steps")
    p.add_argument("--ckpt-every", type=int, default=DEFAULTS["ckpt_every"], help="checkpoint every N steps")
    p.add_argument("--val-samples", type=int, default=DEFAULTS["val_samples"], help="validation crops per resolution")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--export", metavar="NAME", help="after training, export the best checkpoint as NAME")
    p.add_argument("--export-dir", type=Path, default=MODELS_DIR, help="where --export writes NAME.pt and NAME.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    return p


def main(argv=None):
    """Entry point of ``metaqsm-train``; returns the exit status."""
    args = build_parser().parse_args(argv)
    import torch

    from ..qsm.network.device import resolve_device
    from ..training.train import export_model, train

    if args.arch == "mesa" and args.fixed_voxel_size is None:
        print("metaqsm-train: --arch mesa needs --fixed-voxel-size", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = {
        "arch": args.arch, "channels": args.channels, "fold": args.fold, "hidden": args.hidden,
        "conditioning": args.conditioning, "fixed_voxel_size_mm": args.fixed_voxel_size, "input": args.input, "steps": args.steps,
        "batch_size": args.batch_size, "patch": list(args.patch), "lr": args.lr, "lr_decay": args.lr_decay,
        "lr_decay_steps": args.lr_decay_steps, "l2": args.l2, "val_every": args.val_every,
        "ckpt_every": args.ckpt_every, "val_samples": args.val_samples, "seed": args.seed,
    }
    multiple = args.fold * 2 ** (len(args.channels) - 1)
    if any(n % multiple for n in args.patch):
        print(f"metaqsm-train: --patch sizes must be multiples of {multiple} for --fold {args.fold} and "
              f"{len(args.channels)} levels", file=sys.stderr)
        return 2
    command = shlex.join(["metaqsm-train", *(sys.argv[1:] if argv is None else argv)])
    try:
        device = resolve_device(args.device)
        state = train(cfg, args.out, resume=args.resume, device=device, progress=not args.no_progress,
                      command=command)
        print(f"step {state['step']}, best validation NRMSE {state['best_nrmse']:.1f} %, "
              f"{state['wall_s'] / 60:.1f} min of training in {args.out}")
        if args.export:
            print(f"exported {export_model(args.out, args.export, args.export_dir)}")
    except ValueError as err:
        print(f"metaqsm-train: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
