"""Meta-QSM and Mesa-QSM: a 3D U-Net whose convolutions are weight-predicting (WP-Conv) or plain.

A WP-Conv layer (Meta-QSM, after Meta-SR) owns a small fully connected network that
maps the acquisition geometry -- the voxel size (mm) and, optionally, the B0
direction in voxel axes -- to that layer's kernel and bias. The kernels are predicted
once per input volume and then applied as an ordinary ``F.conv3d``, so one model
serves every resolution and, with B0 conditioning, every slab obliquity. Mesa-QSM is
the same U-Net with plain convolutions (one model per resolution), the control.

Network input (config ``input``): ``field`` is the paper's (the normalised local field
only); ``field+tkd`` adds a second channel, the TKD estimate of the same field, and
adds the network's output to it (residual learning around the closed-form inverse, with
a zero-initialised last layer so an untrained network returns TKD). The dipole physics
-- including the voxel size and the B0 direction -- is then in the input as well as in
the predicted kernels, and the network learns the correction TKD needs (its
underestimation, streaks, noise), which a small network learns in CPU-hours.
``field+tkd+magnitude`` adds the magnitude image as a third channel: where the
susceptibility may have edges, which is MEDI's prior. ``field+tv+magnitude`` has TV-ADMM's map
(:mod:`metaqsm_bids.qsm.inversion.tv`) in TKD's place: the network corrects a better estimate,
whose streaks and underestimation are already smaller. :func:`widen_input` starts such a
network from a trained one with fewer input channels (the new channels' weights zero, so
it begins as its parent) or with the other estimate channel (the same weights).

Speed (config ``fold``): the input's ``fold``-cubed voxel blocks are folded into channels
before the first convolution and the last layer predicts one output per voxel of each
block (space-to-depth and back, as in ESPCN), so no convolution runs at the acquisition
grid. Small-channel 3D convolutions are memory-bound on CPUs: on the 256x256x64 benchmark
head's box (208x240x64, 2 threads; ``benchmarks/bench_network_speed.py``, BENCHMARKS.md) an
unfolded 8/16/32-channel U-Net (metaqsm-v2's widths) took 1.45 s, a 4/8/16/32 one still
1.17 s, the folded 16/32/64 one 0.41 s. The residual output keeps TKD's full-resolution
detail either way.

Both kinds expose ``kernel(cond) -> (weight, bias)`` so the U-Net code is shared;
:meth:`UNet3d.predict_weights` computes every layer's kernel and
:meth:`UNet3d.run` applies them, which lets patch-wise inference reuse one prediction.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.grid import unit_b0, voxel_size_array
from ..inversion.tv import WEIGHTINGS
from .models import ESTIMATES, INPUTS, TV_INPUT_DEFAULTS

CONDITIONINGS = {"voxel": 3, "voxel+b0": 6}
#: Voxel-size normalisation (mm): centre and half-width of the training range (0.5-1.2, 0.5-1.2, 0.6-4.0).
VOXEL_CENTRE_MM = (0.85, 0.85, 2.3)
VOXEL_HALF_RANGE_MM = (0.35, 0.35, 1.7)


def encode_condition(voxel_size_mm, b0_dir, conditioning, voxel_centre_mm=VOXEL_CENTRE_MM,
                     voxel_half_range_mm=VOXEL_HALF_RANGE_MM):
    """Predictor input (float32 vector): normalised voxel size, plus the B0 direction for ``voxel+b0``.

    The dipole kernel depends on B0 only up to its sign, so the direction is flipped to
    make its largest component positive; the network then never sees two codes for one geometry.
    """
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {sorted(CONDITIONINGS)}, got {conditioning!r}")
    voxel = voxel_size_array(voxel_size_mm)
    parts = [(voxel - np.asarray(voxel_centre_mm)) / np.asarray(voxel_half_range_mm)]
    if conditioning == "voxel+b0":
        b0 = unit_b0(b0_dir)
        parts.append(b0 * np.sign(b0[np.argmax(np.abs(b0))]))
    return torch.from_numpy(np.concatenate(parts).astype(np.float32))


def _conv(x, weight, bias):
    """``F.conv3d`` with 'same' padding; ``weight`` (B|1, out, in, k, k, k) and ``bias`` (B|1, out) per sample."""
    pad = weight.shape[-1] // 2
    if weight.shape[0] == 1:
        return F.conv3d(x, weight[0], bias[0], padding=pad)
    # different kernels per sample: fold the batch into channel groups, one conv call
    b, c = x.shape[:2]
    out = weight.shape[1]
    y = F.conv3d(x.reshape(1, b * c, *x.shape[2:]), weight.reshape(b * out, *weight.shape[2:]),
                 bias.reshape(-1), padding=pad, groups=b)
    return y.view(b, out, *y.shape[2:])


class WPConv3d(nn.Module):
    """Weight-predicting 3D convolution: a per-layer MLP maps the condition vector to kernel and bias.

    The output head's bias is initialised to a Kaiming-uniform kernel and its weights
    near zero, so training starts from a well-scaled ordinary convolution whose
    dependence on the condition is learnt.
    """

    def __init__(self, in_channels, out_channels, cond_dim, hidden=32, kernel_size=3):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        n_weight = out_channels * in_channels * kernel_size ** 3
        self.weight_head = nn.Linear(hidden, n_weight)
        self.bias_head = nn.Linear(hidden, out_channels)
        fan_in = in_channels * kernel_size ** 3
        bound = math.sqrt(6.0 / ((1 + 0.1 ** 2) * fan_in))  # Kaiming uniform for LeakyReLU(0.1)
        with torch.no_grad():
            self.weight_head.bias.uniform_(-bound, bound)
            self.weight_head.weight.uniform_(-0.1 * bound / math.sqrt(hidden), 0.1 * bound / math.sqrt(hidden))
            self.bias_head.bias.zero_()
            self.bias_head.weight.uniform_(-0.01, 0.01)

    def kernel(self, cond):
        """Kernel (B, out, in, k, k, k) and bias (B, out) for a condition batch (B, cond_dim)."""
        h = self.mlp(cond)
        k = self.kernel_size
        weight = self.weight_head(h).view(-1, self.out_channels, self.in_channels, k, k, k)
        return weight, self.bias_head(h)

    def regularised_parameters(self):
        """The weights mapping predictor features to kernel and bias (the paper's L2-regularised weights).

        The kernel that does not depend on the condition lives in the head's bias and is not
        penalised, so the L2 term limits how much the kernels vary with the condition.
        """
        return [self.weight_head.weight, self.bias_head.weight]

    def zero_(self):
        """Make the layer output exactly zero for every condition (the residual head's start)."""
        with torch.no_grad():
            for p in (self.weight_head.weight, self.weight_head.bias, self.bias_head.weight, self.bias_head.bias):
                p.zero_()

    def forward(self, x, cond):
        return _conv(x, *self.kernel(cond))


class PlainConv3d(nn.Module):
    """Ordinary 3D convolution with the WP-Conv interface (the condition is ignored): Mesa-QSM."""

    def __init__(self, in_channels, out_channels, cond_dim=0, hidden=0, kernel_size=3):
        super().__init__()
        conv = nn.Conv3d(in_channels, out_channels, kernel_size)
        fan_in = in_channels * kernel_size ** 3
        bound = math.sqrt(6.0 / ((1 + 0.1 ** 2) * fan_in))
        self.weight = nn.Parameter(conv.weight.detach().uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def kernel(self, cond=None):
        return self.weight[None], self.bias[None]

    def regularised_parameters(self):
        return [self.weight]

    def zero_(self):
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()

    def forward(self, x, cond=None):
        return _conv(x, *self.kernel(cond))


def fold_blocks(x, fold):
    """(B, C, I, J, K) -> (B, C * fold**3, I / fold, J / fold, K / fold): each voxel block becomes channels."""
    b, c, i, j, k = x.shape
    x = x.reshape(b, c, i // fold, fold, j // fold, fold, k // fold, fold)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * fold ** 3, i // fold, j // fold, k // fold)


def unfold_blocks(x, fold):
    """Inverse of :func:`fold_blocks`."""
    b, c, i, j, k = x.shape
    x = x.reshape(b, c // fold ** 3, fold, fold, fold, i, j, k)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // fold ** 3, i * fold, j * fold, k * fold)


class UNet3d(nn.Module):
    """3D U-Net on ``fold``-folded voxel blocks: two 3x3x3 convs per level, max-pool down,
    conv then nearest-up, concatenated skips, a 1x1x1 head that unfolds to one value per voxel.

    ``config`` keys: ``arch`` ('meta' or 'mesa'), ``channels`` (width of each level, top
    first; their number is the number of levels), ``fold`` (voxel block edge folded into
    channels at the input, 1 for none), ``hidden`` (predictor width), ``conditioning``
    ('voxel' or 'voxel+b0'), ``fixed_voxel_size_mm`` (mesa: the one resolution it was
    trained for, else None), ``input`` (a key of :data:`INPUTS`), ``tv_iterations``, ``tv_rho_per_alpha`` and
    ``tv_weighting`` (the ``tv`` channel's ADMM iterations, penalty and data weighting; the weights do not depend
    on them). Input is (B, C, I, J, K)
    with the C channels of :data:`INPUTS` and each spatial size a multiple of :attr:`multiple`;
    output is (B, 1, I, J, K) in the input's (normalised) units.
    """

    def __init__(self, config):
        super().__init__()
        self.config = normalise_config(config)
        cfg = self.config
        conv = WPConv3d if cfg["arch"] == "meta" else PlainConv3d
        cond_dim, hidden, widths = CONDITIONINGS[cfg["conditioning"]], cfg["hidden"], cfg["channels"]
        block = cfg["fold"] ** 3

        def make(cin, cout, k=3):
            return conv(cin, cout, cond_dim, hidden, k)

        self.encoder = nn.ModuleList()
        cin = len(INPUTS[cfg["input"]]) * block
        for w in widths:
            self.encoder.append(nn.ModuleList([make(cin, w), make(w, w)]))
            cin = w
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for w_low, w in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.up.append(make(w_low, w))
            self.decoder.append(nn.ModuleList([make(2 * w, w), make(w, w)]))
        self.head = make(widths[0], block, k=1)
        if self.residual:
            self.head.zero_()

    @property
    def residual(self):
        """Whether the output is the estimate channel (TKD or TV-ADMM) plus the U-Net's correction."""
        return any(estimate in INPUTS[self.config["input"]] for estimate in ESTIMATES)

    @property
    def multiple(self):
        """Each spatial size must be a multiple of this (the fold, then one factor 2 per pooling)."""
        return self.config["fold"] * 2 ** (len(self.config["channels"]) - 1)

    @property
    def receptive_radius(self):
        """Upper bound on the input voxels on each side that can influence one output voxel (for patching)."""
        levels, fold = len(self.config["channels"]), self.config["fold"]
        # in folded voxels: per level above the bottom, 2 encoder convs, the pool, the nearest upsample and
        # 2 decoder convs reach one voxel of that level, the up-conv one of the level below; the bottom has
        # 2 convs. A folded voxel spans ``fold`` input voxels, so up to ``fold - 1`` more on each side.
        folded = sum(8 * 2 ** level for level in range(levels - 1)) + 2 * 2 ** (levels - 1)
        return fold * folded + fold - 1

    def convs(self):
        """Every convolution in a fixed order (the order of :meth:`predict_weights`)."""
        layers = [c for pair in self.encoder for c in pair]
        for up, pair in zip(self.up, self.decoder):
            layers += [up, *pair]
        return layers + [self.head]

    def regularised_parameters(self):
        return [p for c in self.convs() for p in c.regularised_parameters()]

    def predict_weights(self, cond):
        """All layers' (weight, bias) for a condition batch (B, cond_dim), or None for mesa."""
        if cond is not None and cond.dim() == 1:
            cond = cond[None]
        return [c.kernel(cond) for c in self.convs()]

    def run(self, x, weights):
        """Apply the U-Net to ``x`` (B, C, I, J, K) with precomputed ``weights``.

        Runs channels-last (measured 1.6-1.9x faster for 3D convolutions on CPU).
        """
        if any(n % self.multiple for n in x.shape[2:]):
            raise ValueError(f"network input of spatial shape {tuple(x.shape[2:])}: each size must be a "
                             f"multiple of {self.multiple}")
        weights = iter(weights)
        fold = self.config["fold"]
        base = x[:, 1:2] if self.residual else None
        x = fold_blocks(x, fold).contiguous(memory_format=torch.channels_last_3d)

        def conv(t):
            t = _conv(t, *next(weights))
            return F.leaky_relu(t, 0.1, inplace=not t.requires_grad)  # in place at inference: one full pass less

        skips = []
        for level in range(len(self.config["channels"])):
            if level:
                x = F.max_pool3d(x, 2)
            x = conv(conv(x))
            skips.append(x)
        for skip in skips[-2::-1]:
            # the up-conv runs before the upsampling: the same reach at an eighth of the cost
            x = F.interpolate(conv(x), scale_factor=2, mode="nearest")
            x = conv(conv(torch.cat([x, skip], dim=1)))
        weight, bias = next(weights)
        out = unfold_blocks(_conv(x, weight, bias).contiguous(), fold)
        return out + base if base is not None else out

    def forward(self, x, cond=None):
        return self.run(x, self.predict_weights(cond))


#: The network config keys and their defaults (the shipped metaqsm-v5 to v10's architecture, the paper's input).
DEFAULT_CONFIG = {"arch": "meta", "channels": (16, 32, 64), "fold": 2, "hidden": 16, "conditioning": "voxel+b0",
                  "fixed_voxel_size_mm": None, "input": "field", **TV_INPUT_DEFAULTS}


def normalise_config(config):
    """Fill defaults and validate a network config dict (the dict saved with the weights)."""
    cfg = {**DEFAULT_CONFIG, **config}
    if cfg["arch"] not in ("meta", "mesa"):
        raise ValueError(f"arch must be 'meta' or 'mesa', got {cfg['arch']!r}")
    if cfg["conditioning"] not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {sorted(CONDITIONINGS)}, got {cfg['conditioning']!r}")
    if cfg["input"] not in INPUTS:
        raise ValueError(f"input must be one of {sorted(INPUTS)}, got {cfg['input']!r}")
    if cfg["arch"] == "mesa" and cfg["fixed_voxel_size_mm"] is None:
        raise ValueError("a mesa network needs fixed_voxel_size_mm (the resolution it is trained for)")
    if cfg["fixed_voxel_size_mm"] is not None:
        cfg["fixed_voxel_size_mm"] = [float(v) for v in cfg["fixed_voxel_size_mm"]]
    if isinstance(cfg["channels"], (int, np.integer)) or not len(cfg["channels"]):
        raise ValueError(f"channels must be a list of widths, one per level, got {cfg['channels']!r}")
    cfg["channels"] = [int(c) for c in cfg["channels"]]
    cfg["fold"], cfg["hidden"], cfg["tv_iterations"] = int(cfg["fold"]), int(cfg["hidden"]), int(cfg["tv_iterations"])
    if min(cfg["channels"]) < 1 or cfg["fold"] < 1 or cfg["hidden"] < 1 or cfg["tv_iterations"] < 1:
        raise ValueError("channels, fold, hidden and tv_iterations must be at least 1")
    cfg["tv_rho_per_alpha"] = float(cfg["tv_rho_per_alpha"])
    if not cfg["tv_rho_per_alpha"] > 0:
        raise ValueError(f"tv_rho_per_alpha must be positive, got {cfg['tv_rho_per_alpha']!r}")
    if cfg["tv_weighting"] not in WEIGHTINGS:
        raise ValueError(f"tv_weighting must be one of {WEIGHTINGS}, got {cfg['tv_weighting']!r}")
    return cfg


def build_network(config):
    """A new, randomly initialised :class:`UNet3d` for ``config``."""
    return UNet3d(config)


def _roles(input_kind):
    """The input's channels with either estimate named ``estimate`` (the role the residual gives it)."""
    return tuple("estimate" if c in ESTIMATES else c for c in INPUTS[input_kind])


def extends_input(input_kind, parent_input):
    """Whether a network taking ``input_kind`` can start from one taking ``parent_input``: the parent's channels
    come first and more follow, or the channels are the same but for the estimate (TKD or TV-ADMM)."""
    old, new = _roles(parent_input), _roles(input_kind)
    return new[:len(old)] == old and INPUTS[input_kind] != INPUTS[parent_input]


def widen_input(parent, input_kind):
    """A copy of ``parent`` taking the input variant ``input_kind``, which :func:`extends_input` the parent's.

    Every weight is the parent's; the first convolution's kernels for new channels (its
    weight predictor's rows for them, for a WP-Conv) are zero, so the new network computes
    exactly what the parent does until training gives the new channels a use. A swapped estimate
    channel keeps the parent's weights: the network starts as the parent's correction of the other estimate.
    """
    if not extends_input(input_kind, parent.config["input"]):
        raise ValueError(f"input {input_kind!r} does not extend the parent's {parent.config['input']!r}")
    old = INPUTS[parent.config["input"]]
    child = UNet3d({**parent.config, "input": input_kind})
    state = parent.state_dict()
    first = child.encoder[0][0]
    n_old = len(old) * parent.config["fold"] ** 3  # folded channels are ordered input channel first
    prefix = next(name for name, module in child.named_modules() if module is first)
    for name, value in child.state_dict().items():
        if not name.startswith(prefix + ".") or value.shape == state[name].shape:
            continue
        widened = torch.zeros_like(value)
        if isinstance(first, WPConv3d):  # predictor rows are (out, in, k^3)-ordered
            k3 = first.kernel_size ** 3
            view = widened.view(first.out_channels, first.in_channels, k3, -1)
            view[:, :n_old] = state[name].view(first.out_channels, n_old, k3, -1)
        else:
            widened[:, :n_old] = state[name]
        state[name] = widened
    child.load_state_dict(state)
    return child.eval() if not parent.training else child


def save_network(model, path, half=False):
    """Write ``{'config', 'state_dict'}`` to ``path`` (loadable with ``torch.load(weights_only=True)``).

    ``half`` stores the weights as float16 (half the size; they are cast back to float32 on load).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"config": model.config, "state_dict": state}, path)


def load_network(path, map_location="cpu"):
    """Rebuild a network saved by :func:`save_network`, in eval mode."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    with torch.device("meta"):  # no random initialisation to overwrite (half of the load's time)
        model = UNet3d(blob["config"])
    # every parameter, as float32, put in place (``assign``): materialising the meta tensors first (``to_empty``) went
    # through torch's reference ops, whose first use imports sympy: 1.5-2 s of a cold start
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    model.load_state_dict(state, assign=True)
    return model.eval()
