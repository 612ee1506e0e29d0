"""Total-variation dipole inversion by ADMM (Bilgic et al. 2014, MRM 72:1444; the "TV-ADMM" of QSM-CI's leaderboard):

    chi = argmin 1/2 ||D * chi - f||^2 + alpha ||G chi||_1

with ``G`` the forward-difference gradient in mm (circular on the FFT box, so that ``G^T G`` is diagonal in k-space,
``|G(k)|^2`` as in :func:`~metaqsm_bids.qsm.core.solvers.gradient_power`) and ``||.||_1`` anisotropic (each
component). ADMM splits ``z = G chi`` with penalty ``rho``:

    chi <- IFFT( (D FFT(f) + rho conj(G) FFT(z - u)) / (D^2 + rho |G|^2) )      (closed form: one FFT pair)
    z   <- shrink(G chi + u, alpha / rho),   u <- u + G chi - z

from ``z = u = 0``, so the first ``chi`` is the closed-form L2 inversion with ``lambda = rho``. The field is 0
outside the mask on the FFT box (the mask's bounding box padded by a quarter per side, as TKD and L2). The defaults
were chosen on the stage benchmark's heads: five iterations come within 0.2-1.2 NRMSE points of the best of 2-10
iterations and alpha 1e-4 to 5e-4 from the pipeline's own field; the penalty ``rho = 50 alpha`` (``100 alpha``
before) is 0.6-1.9 points better from the pipeline's field at all four protocols and 0.9-2.0 from the true local
field at three (0.3 worse at 0.76x0.76x3), on another anatomy and on the heads with lesions alike (BENCHMARKS.md,
"Total variation by ADMM", "TV-ADMM's penalty"). Five iterations do not converge ADMM: the penalty also sets how far
they get.

Weighted by the magnitude (``weighting="magnitude"``), the data term becomes MEDI's linear one, ``1/2 ||W (D * chi -
f)||^2`` with ``W`` the magnitude over its mean in the mask (0 outside it: the field's noise s.d. is ~ 1 / magnitude),
split as in FANSI's weighted-linear form (Milovic et al. 2018, MRM 80:814) with ``y = D * chi`` and penalty ``mu``
(:data:`DATA_PENALTY`, in the weights' units), so that each update stays closed form:

    chi <- IFFT( (mu D FFT(y - s) + rho conj(G) FFT(z - u)) / (mu D^2 + rho |G|^2) )
    y   <- (W^2 f + mu (D * chi + s)) / (W^2 + mu),   s <- s + D * chi - y

from ``y = f, s = 0``; two FFT pairs an iteration. The gradient components where the magnitude has an edge are left
unpenalised (MEDI's edge mask, :func:`~metaqsm_bids.qsm.inversion.medi.edge_mask`, with MEDI's edge percentage).
From the stage benchmark's true local fields (realistic-magnitude heads, five iterations, MEDI's edge percentage
0.9) this costs 1.4-2x TV-ADMM's time and closes about half its gap to MEDI (BENCHMARKS.md, "TV-ADMM weighted by the
magnitude").

Started from a map (a network's, :func:`tv_refine`), the weighted form refines it with a data term that background
removal's residuals do not enter: the field's high-pass ``H f = f - S f`` (``S``: the spherical mean over a radius
``r``; a field harmonic in the mask, the field of sources outside it, equals its spherical mean there), fitted as
``H D chi`` where the sphere lies in the mask, with ``lam / 2 ||chi - chi_start||^2`` holding the lowest frequencies
(which ``H`` weakens, ``~ |k|^2 r^2``) at the starting map's. Its split is the weighted one above with ``H D`` for
``D``, the starting map as the first chi (the first ``y``, ``s``, ``z`` and ``u`` updates follow from it); the prior
adds ``lam`` to the chi update's denominator and ``lam FFT(chi_start)`` to its numerator.
"""
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from ..core.dipole import dipole_kernel
from ..core.grid import PaddedBox
from ..core.smv import erode_mask, smv_kernel
from ..core.solvers import gradient, gradient_adjoint, gradient_power
from ..spec import MethodSpec, parameter
from .common import check_inputs, zero_mean_in_mask
from .l2 import SPEC as L2_SPEC
from .medi import SPEC as MEDI_SPEC
from .medi import check_magnitude, edge_mask

#: ADMM's penalty over the TV weight (module text).
RHO_PER_ALPHA = 50.0
#: The weighted data term's ADMM penalty ``mu`` (module text), in the units of the squared weights (mean 1 in the
#: mask): 1 keeps the unweighted update's balance ``D^2 + rho |G|^2``; 0.3 measured within 0.4 NRMSE points of it
#: either way, 3 worse by 0.5-9 (BENCHMARKS.md).
DATA_PENALTY = 1.0
#: :func:`tv_refine`'s sphere radii (mm) and prior weight (dimensionless, as the data term's squared weights). After
#: metaqsm-v10 and its data-consistency step on the realistic-magnitude heads (BENCHMARKS.md, "Meta-QSM refined on
#: the field's high-pass"), from the pipeline's own local field NRMSE fell with the weight (0.1 / 0.03 / 0.01 / 0.003 /
#: 0.001 at 6-8 mm, three iterations: 35.7 / 34.8 / 34.0 / 32.9 / 31.8 % at 1 mm) while from the true local field it
#: rose below 0.01 (21.0 / 21.0 / 21.1 / 21.3 / 21.4; at 0.76x0.76x3 0.003 -> 0.001 lost 0.2-0.3); one radius of 6-10
#: mm measured within 0.5 points of another at both protocols, 4 mm up to 0.6 worse than 8 mm. The 4 mm shell within
#: 8 mm of the mask's edge (V-SHARP's shells) gained 0.3-0.9 from the true local field and 0.1-0.5 from the pipeline's
#: at 0.5x0.5x2, 1 mm and 0.75x0.75x1.5, and lost 0.1-0.7 at 0.76x0.76x3, where a 4 mm sphere spans three slices (and a
#: 6 mm one lost too): a smaller sphere than :data:`REFINE_MIN_RADIUS_VOXELS` voxel edges is not used.
REFINE_SMV_RADII_MM = (8.0, 4.0)
REFINE_MIN_RADIUS_VOXELS = 2.0
REFINE_PRIOR_WEIGHT = 0.003
#: :func:`tv_refine`'s ADMM penalty over its alpha: twice TV-ADMM's (:data:`RHO_PER_ALPHA`). After metaqsm-v10 on the
#: realistic-magnitude heads (BENCHMARKS.md, "The refinement's penalty"), 100 against 50 was 0.6-0.9 NRMSE points
#: better from the true local field at 0.5x0.5x2, 0.76x0.76x3 and 0.75x0.75x1.5 and 0.3-0.4 from the pipeline's at all
#: four protocols, 0.5 worse from the true local field at 1 mm; 20 and 200 worse than 100 at 1 mm and 0.76x0.76x3.
REFINE_RHO_PER_ALPHA = 100.0
#: The networks' default :func:`tv_refine` iterations (``--network-tv-refinement``; None: off): two measured level with
#: three (0.4 better to 0.4 worse) and five worse from the true local field at 1 mm (22.5 against 21.3 %).
DEFAULT_TV_REFINEMENT = 2
#: ``weighting`` choices (module text).
WEIGHTINGS = ("none", "magnitude")


@dataclass(frozen=True)
class TVParameters:
    """TV-ADMM's settings a user may change."""

    alpha: float = parameter(2e-4, "TV-ADMM regularisation weight (field and chi in ppm, gradient per mm)",
                             words="TV weight", check="positive")
    iterations: int = parameter(5, "TV-ADMM iterations", words="iterations", check="positive_int")
    weighting: str = parameter(
        "none", "TV-ADMM's data weighting: 'magnitude' weighs the data term by the magnitude (MEDI's noise weight) "
        "and leaves the magnitude's edges out of the TV term (MEDI's edge mask)", words="data weighting",
        choices=WEIGHTINGS)


def tv_admm(local_field_ppm, mask, voxel_size_mm, b0_dir=(0.0, 0.0, 1.0), alpha=TVParameters.alpha,
            iterations=TVParameters.iterations, weighting=TVParameters.weighting, magnitude=None, pad_voxels=None,
            rho_per_alpha=RHO_PER_ALPHA, info=None):
    """TV-regularised dipole inversion by ADMM (module text); ppm in, ppm out.

    ``alpha`` (> 0) weighs ``||G chi||_1`` (G in 1/mm, chi and field in ppm); ``iterations`` (>= 1) ADMM
    iterations; ``rho_per_alpha`` (> 0) the penalty ``rho`` over ``alpha``; ``weighting`` "magnitude" weighs the data
    term by ``magnitude`` (the mask's shape) and gives the TV term MEDI's edge mask (module text), "none" ignores it.
    Returns chi (float32, 0 outside the mask, mean 0 inside); ``info``, when given, receives ``Rho`` (the settings'
    own keys come from the spec).
    """
    if not alpha > 0:
        raise ValueError(f"TV-ADMM alpha must be positive, got {alpha!r}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"TV-ADMM iterations must be a positive integer, got {iterations!r}")
    field, mask, voxel, b0 = check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    box = PaddedBox(mask, pad_voxels)
    kernel = dipole_kernel(box.shape, voxel, b0, half=True)
    if not rho_per_alpha > 0:
        raise ValueError(f"TV-ADMM rho_per_alpha must be positive, got {rho_per_alpha!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"TV-ADMM weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    rho = np.float32(rho_per_alpha * alpha)
    threshold = np.float32(alpha) / rho
    if weighting == "magnitude":
        chi = _weighted(field, mask, voxel, box, kernel, rho, threshold, iterations,
                        check_magnitude(magnitude, mask, "weighted TV-ADMM"))
    else:
        denominator = kernel ** 2 + rho * gradient_power(box.shape, voxel)
        denominator[0, 0, 0] = 1.0  # numerator is 0 there: the mean is set below
        inverse = np.reciprocal(denominator)  # a real product per iteration, not a complex division
        l2_spectrum = kernel * inverse * sfft.rfftn(box.embed(field))  # the field's share of every chi update
        u = w = divergence = None  # buffers reused across iterations (see _shrink)
        for iteration in range(int(iterations)):
            if w is None:
                spectrum = l2_spectrum
            else:
                w *= rho
                divergence = gradient_adjoint(w, voxel, circular=True, out=divergence)
                spectrum = sfft.rfftn(divergence)
                spectrum *= inverse
                spectrum += l2_spectrum
            chi = sfft.irfftn(spectrum, s=box.shape).astype(np.float32, copy=False)
            if iteration < iterations - 1:
                u, w = _shrink(chi, voxel, threshold, u, w)
    chi = zero_mean_in_mask(box.extract(chi), mask)
    if info is not None:
        info["Rho"] = float(rho)
    return chi


def tv_refine(chi_ppm, local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude, iterations,
              smv_radii_mm=REFINE_SMV_RADII_MM, prior_weight=REFINE_PRIOR_WEIGHT, alpha=TVParameters.alpha,
              rho_per_alpha=REFINE_RHO_PER_ALPHA, pad_voxels=None):
    """``chi_ppm`` (a network's map) refined by ``iterations`` (>= 1) of the magnitude-weighted TV-ADMM started from
    it, on the field's high-pass: ppm in, ppm out.

    The data term is ``sum_r 1/2 ||W_r (H_r D chi - H_r f)||^2`` with ``H_r = 1 - S_r`` (``S_r``: the spherical mean
    over radius ``r`` of ``smv_radii_mm``, decreasing, > 0; after the first, only those of at least
    :data:`REFINE_MIN_RADIUS_VOXELS` times the largest voxel edge, measured worse where they span three slices) and
    ``W_r`` the magnitude weight of :func:`tv_admm` on the voxels whose sphere of radius ``r`` lies in the mask but not
    that of the radius before (V-SHARP's rule: each voxel with the largest sphere that fits) and 0 elsewhere. A field
    harmonic in the mask, what background removal leaves behind, equals its spherical means there (``H_r f = 0``), so
    this term does not see it; ``H_r`` also weakens the lowest frequencies (``~ |k|^2 r^2``), which ``prior_weight /
    2 ||chi - chi_ppm||^2`` (> 0, dimensionless: chi and the field are both in ppm) keeps at the starting map's. The
    TV term is TV-ADMM's with MEDI's edge mask; the split is :func:`tv_admm`'s weighted one (its penalty
    ``rho_per_alpha`` times ``alpha``, :data:`REFINE_RHO_PER_ALPHA`), one ``y`` and ``s`` per radius, its first chi
    ``chi_ppm``. Returns chi (float32, 0 outside the mask; not demeaned: its mean over the FFT box, on the mask's
    bounding box padded by ``pad_voxels``, is ``chi_ppm``'s).
    """
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"TV refinement iterations must be a positive integer, got {iterations!r}")
    radii = tuple(float(r) for r in np.atleast_1d(smv_radii_mm))
    if not (radii and radii[-1] > 0 and all(np.diff(radii) < 0) and prior_weight > 0 and alpha > 0
            and rho_per_alpha > 0):
        raise ValueError("TV refinement needs positive decreasing smv_radii_mm and positive prior_weight, alpha and "
                         f"rho_per_alpha, got {smv_radii_mm!r}, {prior_weight!r}, {alpha!r}, {rho_per_alpha!r}")
    field, mask, voxel, b0 = check_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    magnitude = check_magnitude(magnitude, mask, "TV refinement")
    start = np.asarray(chi_ppm, dtype=np.float32)
    if start.shape != mask.shape or not np.all(np.isfinite(start[mask])):
        raise ValueError(f"the map to refine must be finite in the mask and of the field's shape {mask.shape}, got "
                         f"shape {start.shape}")
    box = PaddedBox(mask, pad_voxels)
    rho = np.float32(rho_per_alpha * alpha)
    weight2, threshold = _magnitude_terms(box.embed(magnitude), box.embed(mask) > 0, voxel, np.float32(alpha) / rho)
    field_spectrum = sfft.rfftn(box.embed(field))
    dipole = dipole_kernel(box.shape, voxel, b0, half=True)
    terms, fitted = [], np.zeros(mask.shape, bool)
    for radius in radii[:1] + tuple(r for r in radii[1:] if r >= REFINE_MIN_RADIUS_VOXELS * max(voxel)):
        high_pass = 1 - smv_kernel(box.shape, voxel, radius, rfft=True)
        shell = erode_mask(mask, voxel, radius) & ~fitted
        fitted |= shell
        terms.append((sfft.irfftn(high_pass * field_spectrum, s=box.shape).astype(np.float32, copy=False),
                      high_pass * dipole, weight2 * box.embed(shell)))
    chi = box.extract(_weighted_admm(terms, threshold, voxel, rho, iterations,
                                     start=box.embed(np.where(mask, start, np.float32(0))),
                                     prior_weight=prior_weight))
    chi[~mask] = 0.0
    return chi


def _shrink(chi, voxel, threshold, u, w):
    """ADMM's ``z`` and ``u`` updates after a chi update: ``v = G chi + u``, ``z = shrink(v, threshold)``, ``u = v -
    z``. Returns ``(u, w)`` with ``w = z - u``, all the next chi update needs of ``z``, in ``w``'s buffer (fresh arrays
    of this size cost page faults each iteration); ``u`` and ``w`` None on the first call."""
    v = gradient(chi, voxel, circular=True, out=w)
    if u is None:
        u = np.clip(v, -threshold, threshold)
    else:
        v += u
        np.clip(v, -threshold, threshold, out=u)
    # shrink(v, t) = v - clip(v, -t, t): the new u is the clipped part, z = v - u the rest
    v -= u
    v -= u
    return u, v


def _weighted(field, mask, voxel, box, kernel, rho, threshold, iterations, magnitude):
    """:func:`tv_admm`'s chi on ``box`` with the data term weighted by ``magnitude`` (module text)."""
    weight2, threshold = _magnitude_terms(box.embed(magnitude), box.embed(mask) > 0, voxel, threshold)
    return _weighted_admm([(box.embed(field), kernel, weight2)], threshold, voxel, rho, iterations)


def _magnitude_terms(magnitude, inside, voxel, threshold):
    """The weighted form's squared data weights (the magnitude over its mean in ``inside``, 0 outside) and its
    shrinkage threshold per gradient component, 0 on the magnitude's edges (MEDI's edge mask); box arrays."""
    weight2 = np.where(inside, magnitude / magnitude[inside].mean(dtype=np.float64), 0).astype(np.float32) ** 2
    return weight2, threshold * edge_mask(magnitude, inside, voxel).astype(np.float32)


def _weighted_admm(terms, threshold, voxel, rho, iterations, start=None, prior_weight=0.0):
    """The weighted-linear ADMM (module text) of ``sum_t 1/2 ||sqrt(weight2_t) (K_t chi - field_t)||^2 + ||threshold
    rho G chi||_1`` on the box, ``terms`` a list of ``(field_t, K_t, weight2_t)`` (``K_t`` a real half spectrum,
    ``field_t`` and ``weight2_t`` real box arrays, ``field_t`` consumed), each data term split with its own ``y_t``
    and ``s_t``, so the chi update stays one division by ``mu sum_t K_t^2 + rho |G|^2 + lam``: ``iterations`` chi
    updates from ``y_t = field_t, s_t = 0``, or with ``start`` (a box array) from that map as the first chi, with
    ``prior_weight / 2 ||chi - start||^2`` added (:func:`tv_refine`). Returns the last chi."""
    shape = terms[0][0].shape
    mu, lam = np.float32(DATA_PENALTY), np.float32(prior_weight)
    denominator = mu * terms[0][1] ** 2 + rho * gradient_power(shape, voxel) + lam
    for _, kernel, _ in terms[1:]:
        denominator += mu * kernel ** 2
    # without a prior the numerator is 0 at k = 0 (the mean is set by the caller); with one the mean is start's
    denominator[0, 0, 0] = lam if lam else 1.0
    inverse = np.reciprocal(denominator)
    # made once, and buffers reused: a fresh box-sized array costs its page faults every iteration
    mu_kernels = [mu * kernel for _, kernel, _ in terms]
    weighted_fields = [weight2 * field for field, _, weight2 in terms]
    weight_denominators = [weight2 + mu for _, _, weight2 in terms]
    s = [np.zeros(shape, np.float32) for _ in terms]
    ys = [np.empty(shape, np.float32) for _ in terms]
    product = np.empty_like(terms[0][1], np.complex64) if len(terms) > 1 else None
    u = w = divergence = prior = None

    def data_and_tv_updates(chi, spectrum):
        """y_t, s_t (from chi's half spectrum ``spectrum``, consumed) and z, u: returns the next ``y_t - s_t`` (in
        ``ys``), u, w."""
        nonlocal u, w
        for t, (_, kernel, _) in enumerate(terms):
            # the last term consumes the spectrum
            k_chi = np.multiply(spectrum, kernel, out=product if t < len(terms) - 1 else spectrum)
            np.add(s[t], sfft.irfftn(k_chi, s=shape, overwrite_x=True), out=s[t], casting="same_kind")  # s + K chi
            y = np.multiply(s[t], mu, out=ys[t])
            y += weighted_fields[t]
            y /= weight_denominators[t]  # (W^2 f + mu (K chi + s)) / (W^2 + mu)
            np.subtract(s[t], y, out=s[t])
            np.subtract(y, s[t], out=y)
        u, w = _shrink(chi, voxel, threshold, u, w)
        return ys

    if start is None:
        y_minus_s = [field for field, _, _ in terms]  # y = f, s = 0
    else:
        spectrum = sfft.rfftn(start)
        prior = lam * spectrum if lam else None
        y_minus_s = data_and_tv_updates(start, spectrum)
    for iteration in range(int(iterations)):
        spectrum = sfft.rfftn(y_minus_s[0])
        spectrum *= mu_kernels[0]
        for difference, mu_kernel in zip(y_minus_s[1:], mu_kernels[1:]):
            term = sfft.rfftn(difference)
            term *= mu_kernel
            spectrum += term
        if w is not None:
            w *= rho
            divergence = gradient_adjoint(w, voxel, circular=True, out=divergence)
            spectrum += sfft.rfftn(divergence)
        if prior is not None:
            spectrum += prior
        spectrum *= inverse
        chi = sfft.irfftn(spectrum, s=shape).astype(np.float32, copy=False)
        if iteration == iterations - 1:
            return chi
        y_minus_s = data_and_tv_updates(chi, spectrum)


SPEC = MethodSpec(
    name="tv", function=tv_admm, display_name="TV-ADMM", description="total-variation inversion by ADMM",
    citations={**L2_SPEC.citations,  # the weighted form's edge mask and noise weight (MEDI's), and its splitting
               "liu2011": MEDI_SPEC.citations["liu2011"],
               "milovic2018": "Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear susceptibility "
                              "inversion with variational regularization. Magn Reson Med. 2018;80(2):814-821."},
    parameters=TVParameters, inputs=("magnitude",))
