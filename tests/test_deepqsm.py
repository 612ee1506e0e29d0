"""Inference: padding to any matrix size, patch-wise = whole-volume, scale/offset behaviour, model files."""
import json

import numpy as np
import pytest
import torch

from metaqsm_bids.qsm.network import deepqsm
from metaqsm_bids.qsm.network.deepqsm import (fft_padding, load_model, model_sha256, network_input, normalise_field,
                                            predict_chi)
from metaqsm_bids.qsm.network.models import MESAQSM_MODEL, METAQSM_MODEL
from metaqsm_bids.qsm.network.networks import UNet3d, save_network


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return UNet3d({"channels": [2, 3, 4], "fold": 2, "hidden": 4}).eval()


def field_and_mask(shape, seed=0):
    rng = np.random.default_rng(seed)
    field = rng.normal(0, 0.02, shape).astype(np.float32)
    ii, jj, kk = np.indices(shape)
    centre = [(n - 1) / 2 for n in shape]
    mask = sum(((g - c) / (0.45 * n)) ** 2 for g, c, n in zip((ii, jj, kk), centre, shape)) <= 1
    return field, mask


@pytest.mark.parametrize("shape", [(23, 17, 11), (9, 30, 5)])
def test_odd_matrix_sizes(net, shape):
    field, mask = field_and_mask(shape)
    chi = predict_chi(net, field, mask, (0.7, 0.9, 2.1), (0.1, 0.0, 0.99))
    assert chi.shape == shape and chi.dtype == np.float32
    assert np.all(np.isfinite(chi)) and np.all(chi[~mask] == 0) and np.any(chi[mask] != 0)


def test_patches_match_whole_volume():
    torch.manual_seed(0)
    net = UNet3d({"channels": [2, 3], "fold": 2, "hidden": 4}).eval()  # receptive radius 25, multiple 4
    field, mask = field_and_mask((110, 100, 11), seed=1)
    whole = predict_chi(net, field, mask, (0.5, 0.5, 2.0), max_patch_voxels=10 ** 9)
    patched = predict_chi(net, field, mask, (0.5, 0.5, 2.0), max_patch_voxels=80 * 80 * 12)
    # several patches were needed along the first two axes (padded shape 112 x 100 x 12)
    q = deepqsm._patch_shape([112, 100, 12], 80 * 80 * 12, net.receptive_radius, 8, net.multiple)
    assert q[0] < 112 and q[1] < 100
    np.testing.assert_allclose(patched, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_deterministic_linear_in_scale_and_blind_to_offset(net):
    field, mask = field_and_mask((24, 24, 12), seed=2)
    chi = predict_chi(net, field, mask, (1.0, 1.0, 1.0))
    assert np.array_equal(chi, predict_chi(net, field, mask, (1.0, 1.0, 1.0)))
    # D(0) = 0: a constant field holds no susceptibility; the inverse is linear in the field
    np.testing.assert_allclose(predict_chi(net, 3 * field + 0.5, mask, (1.0, 1.0, 1.0)), 3 * chi,
                               rtol=1e-4, atol=1e-6)
    x, scale = normalise_field(field, mask)
    assert abs(x[mask].mean()) < 1e-5 and abs(np.sqrt(np.mean(x[mask] ** 2)) - 1) < 1e-5
    assert np.all(predict_chi(net, np.full(mask.shape, 0.3, np.float32), mask, (1, 1, 1)) == 0)


def test_warns_outside_the_training_domain(net):
    field, mask = field_and_mask((16, 16, 8))
    with pytest.warns(UserWarning, match="training range"):
        predict_chi(net, field, mask, (0.3, 0.3, 6.0))
    with pytest.warns(UserWarning, match="deg from the slice axis"):
        predict_chi(net, field, mask, (1, 1, 1), b0_dir=(1.0, 0.9, 0.2))  # 43 deg from its nearest axis


def test_bad_inputs(net):
    field, mask = field_and_mask((16, 16, 8))
    with pytest.raises(ValueError, match="empty"):
        predict_chi(net, field, np.zeros_like(mask), (1, 1, 1))
    bad = field.copy()
    bad[8, 8, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predict_chi(net, bad, mask, (1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        predict_chi(net, field, mask[:, :, :4], (1, 1, 1))


def test_magnitude_input_is_normalised_and_follows_the_storage():
    """A field+tkd+magnitude model gets the magnitude over its mean in the mask as channel 2, refuses to run
    without it, and the magnitude is flipped with the field: flipped storage gives the flipped map."""
    field, mask = field_and_mask((24, 20, 12), seed=3)
    magnitude = np.random.default_rng(4).uniform(50, 150, mask.shape).astype(np.float32)
    x, _ = network_input(field, mask, (1.0, 1.0, 2.0), (0, 0, 1), "field+tkd+magnitude", magnitude)
    assert x.shape == (3, *mask.shape) and x[2][mask].mean() == pytest.approx(1.0, rel=1e-5)
    assert np.allclose(x[2][mask], magnitude[mask] / magnitude[mask].mean()) and np.all(x[2][~mask] == 0)
    with pytest.raises(ValueError, match="needs the magnitude"):
        network_input(field, mask, (1.0, 1.0, 2.0), (0, 0, 1), "field+tkd+magnitude")
    torch.manual_seed(2)
    model = UNet3d({"channels": [2, 3], "fold": 2, "hidden": 4, "input": "field+tkd+magnitude"}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    voxel, b0 = (1.0, 1.0, 2.0), (0.1, 0.0, 0.99)
    chi = predict_chi(model, field, mask, voxel, b0, orientations="flips", magnitude=magnitude)
    other = predict_chi(model, field, mask, voxel, b0, orientations="flips", magnitude=magnitude[::-1].copy())
    assert np.abs(chi - other).max() > 1e-4 * np.abs(chi).max()  # the magnitude is used
    flipped = predict_chi(model, field[::-1].copy(), mask[::-1].copy(), voxel, (-b0[0], b0[1], b0[2]),
                          orientations="flips", magnitude=magnitude[::-1].copy())
    assert np.allclose(flipped[::-1], chi, atol=1e-5 * np.abs(chi).max())


def test_tv_channel_is_tv_admm_of_the_field_in_ppm():
    """field+tv+magnitude's channel 1 is TV-ADMM (alpha its default; the config's iterations, penalty and data
    weighting; on a box padded by an eighth of the mask's) of the demeaned field in ppm over the RMS: the same whatever
    the field's scale is normalised from (TV-ADMM's alpha is per ppm, so it is not scale-free)."""
    from metaqsm_bids.qsm.inversion.tv import tv_admm as tv_admm_default_box

    def tv_admm(*args, **kwargs):
        return tv_admm_default_box(*args, pad_voxels=fft_padding(mask), **kwargs)

    field, mask = field_and_mask((24, 20, 12), seed=5)
    lengths = [np.ptp(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))) + 1 for axis in range(3)]
    assert fft_padding(mask) == [n // 8 for n in lengths]
    magnitude = np.ones(mask.shape, np.float32)
    voxel, b0 = (0.8, 0.8, 2.0), (0.1, 0.0, 0.99)
    x, scale = network_input(field, mask, voxel, b0, "field+tv+magnitude", magnitude)
    centred = np.where(mask, field - field[mask].mean(), 0).astype(np.float32)
    # where a model config does not say: metaqsm-v6's 5 iterations with rho = 100 alpha
    expected = tv_admm(centred, mask, voxel, b0, iterations=5, rho_per_alpha=100.0) / scale
    assert x.shape == (3, *mask.shape)
    assert np.allclose(x[1], expected, atol=1e-5 * np.abs(expected).max())
    # a model config's tv_iterations and tv_rho_per_alpha: those ADMM settings
    x2, _ = network_input(field, mask, voxel, b0, "field+tv+magnitude", magnitude, tv_iterations=2,
                          tv_rho_per_alpha=30.0)
    expected2 = tv_admm(centred, mask, voxel, b0, iterations=2, rho_per_alpha=30.0) / scale
    assert np.allclose(x2[1], expected2, atol=1e-5 * np.abs(expected2).max())
    assert np.abs(x2[1] - x[1]).max() > 1e-2 * np.abs(expected).max()
    # a model config's tv_weighting: the data term weighted by the magnitude (which it then needs)
    textured = (1.0 + 0.5 * (field > np.median(field[mask]))).astype(np.float32)
    xw, _ = network_input(field, mask, voxel, b0, "field+tv+magnitude", textured, tv_weighting="magnitude")
    expected_w = tv_admm(centred, mask, voxel, b0, iterations=5, rho_per_alpha=100.0, weighting="magnitude",
                         magnitude=textured) / scale
    assert np.allclose(xw[1], expected_w, atol=1e-5 * np.abs(expected_w).max())
    assert np.abs(xw[1] - network_input(field, mask, voxel, b0, "field+tv+magnitude", textured)[0][1]).max() > 1e-3
    with pytest.raises(ValueError, match="needs the magnitude image"):
        network_input(field, mask, voxel, b0, "field+tv+magnitude", None, tv_weighting="magnitude")
    # TV-ADMM of the field x 10 is not 10 x TV-ADMM of the field: the channel differs from a scaled field's
    x10, scale10 = network_input(10 * field, mask, voxel, b0, "field+tv+magnitude", magnitude)
    assert scale10 == pytest.approx(10 * scale, rel=1e-5) and np.abs(x10[1] - x[1]).max() > 1e-3


def test_load_model_checks_sha256(tmp_path, net):
    save_network(net, tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps({"sha256": deepqsm.file_sha256(tmp_path / "m.pt")}))
    assert model_sha256("m", tmp_path) == deepqsm.file_sha256(tmp_path / "m.pt")
    loaded = load_model("m", "cpu", tmp_path)
    field, mask = field_and_mask((16, 16, 8))
    assert np.array_equal(predict_chi(loaded, field, mask, (1, 1, 1)), predict_chi(net, field, mask, (1, 1, 1)))
    with open(tmp_path / "m.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        load_model("m", "cpu", tmp_path)
    with pytest.raises(ValueError, match="no model"):
        load_model("absent", "cpu", tmp_path)


#: Where a shipped network does not beat a classical inversion on a score on these crops yet (issue 32), as
#: (model, voxel size) -> {inversion: score}: none since metaqsm-v10 (NRMSE / HFEN % 42.6 / 38.9, 45.7 / 30.5,
#: 48.3 / 33.1, 41.3 / 30.0 at 0.5x0.5x2, 0.76x0.76x3, 1 mm, 0.75x0.75x1.5). metaqsm-v9 was behind iLSQR's HFEN at
#: 0.5x0.5x2 (49.5 / 49.1 % against iLSQR's 57.2 / 45.9; TKD's 59.7 / 51.5; TV-ADMM, its input, 59.3 / 48.1; v8
#: the same, v7 52.3 / 50.7), metaqsm-v6 behind TKD there too (53.3 / 52.1), metaqsm-v5 at 1 mm isotropic (81.9 /
#: 52.3 against TKD's 83.2 / 51.0 and iLSQR's 80.3 / 52.8). Asserted as it is, so that a model that closes a gap
#: fails here until its entry goes.
BEHIND = {}
#: Held-out crops as large as the training's (128x128x64): the shipped networks see up to 65 voxels each side,
#: and on crops smaller than that they answer the crop's edges (BENCHMARKS.md, "Why more training made the heads
#: worse"; metaqsm-v4 and v5 on 64x64x32 crops: HFEN above TKD's at all four resolutions).
CROP_SHAPE = (128, 128, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name, voxel", [
    *[(METAQSM_MODEL, v) for v in ((0.5, 0.5, 2.0), (0.76, 0.76, 3.0), (1.0, 1.0, 1.0), (0.75, 0.75, 1.5))],
    (MESAQSM_MODEL, (0.76, 0.76, 3.0)),
])
def test_shipped_models_beat_tkd_and_ilsqr(name, voxel):
    """The shipped networks on held-out synthetic crops (:data:`CROP_SHAPE`, a seed stream training never uses),
    B0 within 30 deg of the slice axis, the magnitude given: lower NRMSE and HFEN than TKD (threshold 0.2) and
    iLSQR (its defaults) at every resolution they serve but :data:`BEHIND`."""
    pytest.importorskip("nilearn")
    from qsm_ci.qsm_eval import hfen, nrmse_challenge

    from metaqsm_bids.qsm.inversion.ilsqr import ilsqr
    from metaqsm_bids.qsm.inversion.tkd import tkd
    from metaqsm_bids.training.synth import make_sample

    model = load_model(name)
    assert deepqsm.model_info(name)["sha256"] == model_sha256(name)
    scores = {"net": [], "tkd": [], "ilsqr": []}
    for seed in (0, 1):
        s = make_sample(np.random.default_rng([2024, seed]), CROP_SHAPE, voxel_size_mm=voxel,
                        conditioning=model.config["conditioning"])
        for key, chi in (("net", predict_chi(model, s.field_ppm, s.mask, voxel, s.b0_dir, magnitude=s.magnitude)),
                         ("tkd", tkd(s.field_ppm, s.mask, voxel, s.b0_dir)),
                         ("ilsqr", ilsqr(s.field_ppm, s.mask, voxel, s.b0_dir))):
            scores[key].append((nrmse_challenge(chi, s.chi_ppm, s.mask)[0], hfen(chi, s.chi_ppm, s.mask)))
    mean = {k: dict(zip(("nrmse", "hfen"), np.mean(v, axis=0))) for k, v in scores.items()}
    behind = BEHIND.get((name, voxel), {})
    for baseline in ("tkd", "ilsqr"):
        for score in ("nrmse", "hfen"):
            ahead = mean["net"][score] < mean[baseline][score]
            if behind.get(baseline) == score:
                assert not ahead, f"{name} now beats {baseline} on {score} at {voxel}: remove it from BEHIND"
            else:
                assert ahead, (name, voxel, baseline, score, mean)


def test_network_specs_name_what_the_shipped_models_refine():
    """The methods' descriptions and citations (report, sidecars) name the estimate each shipped model's output
    is added to, as its weights' own config says."""
    from metaqsm_bids.qsm.inversion.metaqsm import MESAQSM_SPEC, METAQSM_SPEC
    from metaqsm_bids.qsm.inversion.tkd import SPEC as TKD_SPEC
    from metaqsm_bids.qsm.inversion.tv import SPEC as TV_SPEC
    from metaqsm_bids.qsm.network.models import INPUTS

    for spec, name in ((METAQSM_SPEC, METAQSM_MODEL), (MESAQSM_SPEC, MESAQSM_MODEL)):
        channels = INPUTS[load_model(name).config["input"]]
        assert ("TV-ADMM" in spec.description) == ("tv" in channels)
        assert ("TKD" in spec.description) == ("tkd" in channels)
        estimate = TV_SPEC if "tv" in channels else TKD_SPEC
        assert set(estimate.citations) <= set(spec.citations)
