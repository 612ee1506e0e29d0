"""``metaqsm-train``: train Meta-QSM (or Mesa-QSM) on synthetic data, resume, continue from an exported
model, and export to package data."""
import argparse
import math
import shlex
import sys
from pathlib import Path

from ..qsm.inversion.tv import WEIGHTINGS
from ..qsm.network.models import INPUTS, MODELS_DIR, TV_INPUT_DEFAULTS
from ..qsm.network.networks import extends_input

#: Architecture options (argparse dest -> network config key): with --init-from they come from the parent.
ARCHITECTURE_OPTIONS = {"arch": "arch", "channels": "channels", "fold": "fold", "hidden": "hidden",
                        "conditioning": "conditioning", "fixed_voxel_size": "fixed_voxel_size_mm", "input": "input"}
#: Learning-rate schedule options: with --init-from they default to the parent's recipe.
SCHEDULE_OPTIONS = ("lr", "lr_decay", "lr_decay_steps")
#: Input options: with --init-from they default to the parent's, and may differ from it (the weights do not change).
INPUT_OPTIONS = tuple(TV_INPUT_DEFAULTS)


def build_parser():
    """The ``metaqsm-train`` argument parser; long by design: one flat list of the options in ``--help`` order."""
    from ..training.train import DEFAULTS

    p = argparse.ArgumentParser(prog="metaqsm-train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, help="run directory (checkpoints, logs); keep it out of the repo (required "
                                           "unless --average)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--init-from", metavar="NAME",
                   help="start a new run from the weights of model NAME (one in the package data, or the path "
                        "of an exported NAME.pt with its NAME.json beside it), with its architecture "
                        "(architecture options may only repeat it, but --input may extend its input or swap its "
                        "estimate) and, unless given, its learning-rate schedule; batches and the learning rate continue from its step count. The optimiser "
                        "restarts warm: fresh RMSprop state (the state is not exported: it would double a "
                        "model's size), learning rate continued from the parent's schedule position. The "
                        "exported .json records init_from and the cumulative steps and wall time")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help="train until this many steps in the run (with --init-from: on top of the parent's)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--reuse", type=int, default=DEFAULTS["reuse"], metavar="R",
                   help="use each made batch for R consecutive steps, each time with random axis reversals (B0 "
                        "following) and sign: making samples costs more than the step on a CPU")
    p.add_argument("--patch", type=int, nargs=3, default=DEFAULTS["patch"], metavar=("I", "J", "K"),
                   help="training crop size in voxels (each a multiple of fold * 2**(levels - 1))")
    p.add_argument("--small-patch", type=int, nargs=3, default=DEFAULTS["small_patch"], metavar=("I", "J", "K"),
                   help="a second, smaller crop size in voxels (same multiple as --patch) for --small-patch-fraction "
                        "of the batches: volumes about as small as the network's view (slabs, small fields of view)")
    p.add_argument("--small-patch-fraction", type=float, default=DEFAULTS["small_patch_fraction"], metavar="P",
                   help="fraction of batches made of --small-patch crops (validation keeps --patch)")
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
    p.add_argument("--input", choices=sorted(INPUTS), default=DEFAULTS["input"],
                   help="network input: the local field (the paper's); the field and its TKD inverse "
                        "with the network learning TKD's correction (residual); or those and the magnitude "
                        "image (where edges are); or TV-ADMM's map in TKD's place. With --init-from it may extend "
                        "the parent's input (the new channels start with zero weights) or swap TKD and TV-ADMM "
                        "(the same weights)")
    p.add_argument("--tv-iterations", type=int, default=DEFAULTS["tv_iterations"], metavar="N",
                   help="ADMM iterations of the TV-ADMM input channel (TV-ADMM's default; with --init-from the "
                        "parent's unless given, and it may differ from the parent's: the weights do not depend on it)")
    p.add_argument("--tv-rho-per-alpha", type=float, default=DEFAULTS["tv_rho_per_alpha"], metavar="R",
                   help="the TV-ADMM input channel's ADMM penalty over its alpha (as --tv-iterations)")
    p.add_argument("--tv-weighting", choices=WEIGHTINGS, default=DEFAULTS["tv_weighting"],
                   help="the TV-ADMM input channel's data weighting: 'magnitude' weighs its data term by the magnitude "
                        "and gives its TV term MEDI's edge mask (as --tv-iterations)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help="initial RMSprop learning rate (with --init-from: the parent's unless given)")
    p.add_argument("--lr-decay", type=float, default=DEFAULTS["lr_decay"],
                   help="learning-rate factor per decay period (with --init-from: the parent's unless given)")
    p.add_argument("--lr-decay-steps", type=int, default=DEFAULTS["lr_decay_steps"],
                   help="decay period (steps; with --init-from: the parent's unless given)")
    p.add_argument("--dc-weight", type=float, default=DEFAULTS["dc_weight"],
                   help="weight of QSMnet's model loss (L1 of the dipole field of the error); 0: off")
    p.add_argument("--grad-weight", type=float, default=DEFAULTS["grad_weight"],
                   help="weight of QSMnet's gradient-difference loss (L1 of the error's differences); 0: off")
    p.add_argument("--tissue-only-fraction", type=float, default=DEFAULTS["tissue_only_fraction"], metavar="P",
                   help="fraction of training crops without bleed/calcification shapes and with at most one vein")
    p.add_argument("--supersample", type=int, default=DEFAULTS["supersample"], metavar="S",
                   help="make each crop on an S times finer grid and average it down (1: on the crop's own grid)")
    p.add_argument("--texture", type=float, default=DEFAULTS["texture_ppm"], metavar="PPM", dest="texture_ppm",
                   help="give the crops' tissue a smooth susceptibility texture of standard deviation drawn up to "
                        "PPM per crop (correlation width 1-3 mm); 0 (default): none")
    p.add_argument("--hard-edges-fraction", type=float, default=DEFAULTS["hard_edges_fraction"], metavar="P",
                   help="make this fraction of crops with one tissue per fine voxel (a label map's hard edges) "
                        "instead of the template's soft partial volumes")
    p.add_argument("--edge-background", type=float, default=DEFAULTS["edge_background"], metavar="REL",
                   help="add to each crop's field the field of random sources in a shell just outside its mask, of RMS "
                        "up to REL times the local field's (what background removal leaves near the edge); 0: none")
    p.add_argument("--lesion-ppm", type=float, nargs=2, default=DEFAULTS["lesion_ppm"], metavar=("LO", "HI"),
                   help="range of the random shapes' (bleeds', calcifications') susceptibility, ppm; the sign "
                        "augmentation (--reuse > 1) mirrors it (default: %(default)s)")
    p.add_argument("--lesion-radius-mm", type=float, nargs=2, default=DEFAULTS["lesion_radius_mm"],
                   metavar=("LO", "HI"), help="range of each semi-axis of the random shapes, mm (a large haemorrhage "
                   "is 10 mm or more) (default: %(default)s)")
    p.add_argument("--ema", type=float, default=DEFAULTS["ema"], metavar="DECAY",
                   help="keep a moving average of the weights (e.g. 0.999: over about 1,000 steps); validation scores "
                        "it and best.pt (what --export writes) holds it; 0 (default): the raw weights")
    p.add_argument("--network-data-consistency", type=float, default=DEFAULTS["network_data_consistency"],
                   metavar="LAMBDA", help="train through the k-space data-consistency step that inference then "
                   "applies (metaqsm's --network-data-consistency LAMBDA); 0: off")
    p.add_argument("--network-data-consistency-edge-mm", type=float,
                   default=DEFAULTS["network_data_consistency_edge_mm"], metavar="MM",
                   help="with --network-data-consistency: train through the edge-weighted step instead (metaqsm's "
                        "--network-data-consistency-edge-mm MM, its default); 0: the closed form")
    p.add_argument("--l2", type=float, default=DEFAULTS["l2"], help="L2 strength on the convolution/predictor weights")
    p.add_argument("--val-every", type=int, default=DEFAULTS["val_every"], help="validate every N steps")
    p.add_argument("--ckpt-every", type=int, default=DEFAULTS["ckpt_every"], help="checkpoint every N steps")
    p.add_argument("--val-samples", type=int, default=DEFAULTS["val_samples"], help="validation crops per resolution")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-workers", type=int, default=0, metavar="N",
                   help="make the batches ahead in N worker processes, one CPU thread each (0: in the training "
                        "process between steps); the same batches either way")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--export", metavar="NAME", help="after training, export the best checkpoint as NAME")
    p.add_argument("--average", nargs="+", metavar="MODEL",
                   help="instead of training: export as --export NAME the mean of these models' weights (shipped "
                        "names or exported .pt paths, one architecture; runs from one parent: a model soup), "
                        "validated on the first one's validation crops")
    p.add_argument("--export-dir", type=Path, default=MODELS_DIR, help="where --export writes NAME.pt and NAME.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    return p


def _given_options(argv, dests):
    """The options among ``dests`` (argparse dests) that ``argv`` sets explicitly."""
    unset = object()  # not a string: argparse would parse a string default as a value
    parser = build_parser()
    parser.set_defaults(**dict.fromkeys(dests, unset))
    args = vars(parser.parse_args(argv))
    return {dest for dest in dests if args[dest] is not unset}


def _option(dest):
    return "--" + dest.replace("_", "-")


def _words(value):
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) \
        else str(value)


def main(argv=None):
    """Entry point of ``metaqsm-train``; returns the exit status."""
    args = build_parser().parse_args(argv)
    import torch

    from ..qsm.network.device import resolve_device
    from ..training.train import average_models, export_model, train

    command = shlex.join(["metaqsm-train", *(sys.argv[1:] if argv is None else argv)])
    if args.average:
        if not args.export or args.out or args.resume or args.init_from:
            print("metaqsm-train: --average takes --export NAME (and --export-dir), no --out, --resume or --init-from",
                  file=sys.stderr)
            return 2
        try:
            print(f"exported {average_models(args.average, args.export, args.export_dir, command)}")
        except ValueError as err:
            print(f"metaqsm-train: {err}", file=sys.stderr)
            return 1
        return 0
    if not args.out:
        print("metaqsm-train: --out is required", file=sys.stderr)
        return 2
    cfg = _config(args)
    try:
        parent = _from_parent(cfg, args, argv)
    except _OptionError as err:
        print(f"metaqsm-train: {err}", file=sys.stderr)
        return 2
    error = _option_error(cfg, args)
    if error:
        print(f"metaqsm-train: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        state = train(cfg, args.out, resume=args.resume, device=device, progress=not args.no_progress,
                      command=command, parent=parent, data_workers=args.data_workers)
        lineage = f" (cumulative {cfg['init_from']['steps'] + state['step']} from {cfg['init_from']['name']})" \
            if parent is not None else ""
        print(f"step {state['step']}{lineage}, best validation NRMSE {state['best_nrmse']:.1f} %, "
              f"{state['wall_s'] / 60:.1f} min of training in {args.out}")
        if args.export:
            print(f"exported {export_model(args.out, args.export, args.export_dir)}")
    except ValueError as err:
        print(f"metaqsm-train: {err}", file=sys.stderr)
        return 1
    return 0


class _OptionError(ValueError):
    """An option the run cannot take (exit status 2)."""


def _config(args):
    """The training config (:data:`~metaqsm_bids.training.train.DEFAULTS`' keys) from the parsed options."""
    return {
        "arch": args.arch, "channels": args.channels, "fold": args.fold, "hidden": args.hidden,
        "conditioning": args.conditioning, "fixed_voxel_size_mm": args.fixed_voxel_size, "input": args.input,
        "tv_iterations": args.tv_iterations, "tv_rho_per_alpha": args.tv_rho_per_alpha,
        "tv_weighting": args.tv_weighting, "steps": args.steps,
        "batch_size": args.batch_size, "patch": list(args.patch), "lr": args.lr, "lr_decay": args.lr_decay,
        "lr_decay_steps": args.lr_decay_steps, "l2": args.l2, "val_every": args.val_every,
        "ckpt_every": args.ckpt_every, "val_samples": args.val_samples, "seed": args.seed, "reuse": args.reuse,
        "dc_weight": args.dc_weight, "grad_weight": args.grad_weight,
        "tissue_only_fraction": args.tissue_only_fraction, "network_data_consistency": args.network_data_consistency,
        "network_data_consistency_edge_mm": args.network_data_consistency_edge_mm,
        "supersample": args.supersample, "texture_ppm": args.texture_ppm, "hard_edges_fraction": args.hard_edges_fraction,
        "edge_background": args.edge_background, "lesion_ppm": list(args.lesion_ppm),
        "lesion_radius_mm": list(args.lesion_radius_mm), "ema": args.ema,
        "small_patch": list(args.small_patch) if args.small_patch else None,
        "small_patch_fraction": args.small_patch_fraction,
    }


def _from_parent(cfg, args, argv):
    """With ``--init-from``: the parent network, its lineage, architecture and (where not given) schedule set in
    ``cfg``; None without. An architecture option given that differs from the parent's is an :class:`_OptionError`."""
    if not args.init_from:
        return None
    from ..training.train import load_parent

    try:
        parent, parent_meta, cfg["init_from"] = load_parent(args.init_from)
    except ValueError as err:
        raise _OptionError(f"--init-from: {err}") from err
    given = _given_options(argv, (*ARCHITECTURE_OPTIONS, *SCHEDULE_OPTIONS, *INPUT_OPTIONS))
    widened = "input" in given and extends_input(cfg["input"], parent.config["input"])
    conflicts = [f"{_option(dest)} {_words(cfg[key])} (the parent's: {_words(parent.config[key])})"
                 for dest, key in ARCHITECTURE_OPTIONS.items()
                 if dest in given and _words(cfg[key]) != _words(parent.config[key])
                 and not (dest == "input" and widened)]
    if conflicts:
        raise _OptionError(f"--init-from {args.init_from} fixes the architecture; drop or correct "
                           f"{'; '.join(conflicts)}")
    cfg.update({key: parent.config[key] for key in ARCHITECTURE_OPTIONS.values() if not (key == "input" and widened)})
    cfg.update({key: parent_meta["recipe"][key] for key in SCHEDULE_OPTIONS
                if key not in given and key in parent_meta["recipe"]})
    cfg.update({key: parent.config[key] for key in INPUT_OPTIONS if key not in given})
    return parent


def _option_error(cfg, args):
    """What is wrong with the options (the first thing found), or None."""
    if cfg["arch"] == "mesa" and cfg["fixed_voxel_size_mm"] is None:
        return "--arch mesa needs --fixed-voxel-size"
    for option, fraction in (("--tissue-only-fraction", args.tissue_only_fraction),
                             ("--hard-edges-fraction", args.hard_edges_fraction),
                             ("--small-patch-fraction", args.small_patch_fraction)):
        if not 0.0 <= fraction <= 1.0:
            return f"{option} must be within 0-1"
    if not 0.0 <= args.ema < 1.0:
        return "--ema must be 0 (off) or a decay below 1"
    if not args.lesion_ppm[0] <= args.lesion_ppm[1]:
        return "--lesion-ppm needs LO <= HI"
    if not 0.0 < args.lesion_radius_mm[0] <= args.lesion_radius_mm[1]:
        return "--lesion-radius-mm needs 0 < LO <= HI"
    if args.supersample < 1:
        return "--supersample must be 1 or more"
    for option, value, meaning in (("--edge-background", args.edge_background, "0 (none) or a positive relative RMS"),
                                   ("--texture", args.texture_ppm, "0 (none) or a positive standard deviation in ppm"),
                                   ("--network-data-consistency", args.network_data_consistency,
                                    "0 (off) or a positive number"),
                                   ("--network-data-consistency-edge-mm", args.network_data_consistency_edge_mm,
                                    "0 (the closed form) or a positive distance")):
        if value < 0 or not math.isfinite(value):
            return f"{option} must be {meaning}"
    if args.reuse < 1:
        return "--reuse must be 1 or more"
    if args.data_workers < 0:
        return "--data-workers must be 0 (none) or more"
    if args.tv_iterations < 1:
        return "--tv-iterations must be 1 or more"
    if not (args.tv_rho_per_alpha > 0 and math.isfinite(args.tv_rho_per_alpha)):
        return "--tv-rho-per-alpha must be positive"
    multiple = cfg["fold"] * 2 ** (len(cfg["channels"]) - 1)
    for option, patch in (("--patch", args.patch), ("--small-patch", args.small_patch or ())):
        if any(n % multiple for n in patch):
            return (f"{option} sizes must be multiples of {multiple} for --fold {cfg['fold']} and "
                    f"{len(cfg['channels'])} levels")
    if bool(args.small_patch) != bool(args.small_patch_fraction):
        return "--small-patch and --small-patch-fraction go together"
    return None


if __name__ == "__main__":
    sys.exit(main())
