"""Synthetic data, the training loop (loss goes down, resume is exact) and the CLI with export."""
import json
import multiprocessing

import numpy as np
import pytest
import torch

pytest.importorskip("nilearn")  # the template is a train/test dependency

from metaqsm_bids.cli.train import main as train_main  # noqa: E402
from metaqsm_bids.qsm.network.deepqsm import load_model, network_input, predict_chi  # noqa: E402
from metaqsm_bids.qsm.core.dipole import forward_field_ppm  # noqa: E402
from metaqsm_bids.qsm.network.networks import build_network  # noqa: E402
from metaqsm_bids.training.synth import VOXEL_RANGE_MM, make_sample, random_b0_dir  # noqa: E402
from metaqsm_bids.training.train import (DEFAULTS, NETWORK_KEYS, DataWorkers, masked_l1, train,  # noqa: E402
                                         training_batch)

TINY = {"channels": [2, 3], "fold": 2, "hidden": 4, "batch_size": 2, "patch": [16, 16, 8], "val_samples": 1,
        "val_every": 2, "ckpt_every": 2}


@pytest.mark.parametrize("voxel", [(0.5, 0.5, 2.0), (1.0, 1.0, 1.0), (0.76, 0.76, 3.0)])
def test_sample_geometry_and_physics(voxel):
    b0 = (0.2, 0.0, 0.98)
    s = make_sample(np.random.default_rng(5), shape=(32, 32, 16), voxel_size_mm=voxel, b0_dir=b0,
                    noise_ppm=(0, 0), background=(0, 0))
    assert s.voxel_size_mm == voxel and s.field_ppm.shape == s.chi_ppm.shape == s.mask.shape == (32, 32, 16)
    assert s.field_ppm.dtype == s.chi_ppm.dtype == np.float32
    assert np.all(np.isfinite(s.field_ppm)) and np.all(np.isfinite(s.chi_ppm)) and s.mask.sum() > 1000
    assert np.all(s.field_ppm[~s.mask] == 0) and np.all(s.chi_ppm[~s.mask] == 0)
    assert abs(s.field_ppm[s.mask].mean()) < 1e-6
    assert -0.35 < s.chi_ppm.min() and s.chi_ppm.max() < 0.65
    # the field was made on a 2x finer grid: close to, but not exactly, the coarse-grid forward model
    # of the label (measured: correlation 0.95-0.99, relative difference 0.15-0.33)
    m = s.mask

    def agreement(direction):
        f = forward_field_ppm(s.chi_ppm, voxel, direction, pad_voxels=[8, 8, 4])
        f = f[m] - f[m].mean()
        return np.corrcoef(f, s.field_ppm[m])[0, 1], np.linalg.norm(f - s.field_ppm[m]) / np.linalg.norm(f)

    corr, rel = agreement(b0)
    assert corr > 0.9 and 0.02 < rel < 0.45
    assert agreement((1.0, 0.0, 0.0))[0] < 0.5  # the sample really used the requested B0
    # the magnitude: positive in the mask with mean about 1 there (noise is rectified), zero outside
    assert s.magnitude.dtype == np.float32 and s.magnitude.shape == s.mask.shape
    assert np.all(s.magnitude[~s.mask] == 0) and np.all(s.magnitude[s.mask] >= 0)
    assert 0.95 < s.magnitude[s.mask].mean() < 1.1


def test_background_is_harmonic_and_scaled():
    """The added background (what background removal leaves) has zero Laplacian, the requested RMS
    relative to the local field, and is not part of the label."""
    voxel = (0.6, 0.8, 2.0)

    def sample(background):
        return make_sample(np.random.default_rng(9), shape=(32, 32, 16), voxel_size_mm=voxel, noise_ppm=(0, 0),
                           background=background)

    clean, shifted = sample((0, 0)), sample((0.3, 0.3))
    assert np.array_equal(clean.chi_ppm, shifted.chi_ppm)
    m = clean.mask
    bg = np.where(m, shifted.field_ppm - clean.field_ppm, 0).astype(np.float64)
    rms = lambda a: np.sqrt(np.mean(a[m] ** 2))  # noqa: E731
    assert rms(bg) == pytest.approx(0.3 * rms(clean.field_ppm), rel=1e-3)
    # rebuild it on the whole grid from its values in the mask: a harmonic quadratic has zero Laplacian
    coords = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * d for n, d in zip(m.shape, voxel)], indexing="ij")
    x, y, z = (c[m] for c in coords)
    basis = np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], 1)
    coef = np.linalg.lstsq(basis, bg[m], rcond=None)[0]
    assert np.abs(basis @ coef - bg[m]).max() < 1e-5 * np.abs(bg[m]).max()  # a quadratic polynomial
    assert abs(coef[4] + coef[5] + coef[6]) < 1e-4 * np.abs(coef[4:7]).max()  # its Laplacian 2(a + b + c) = 0


def test_random_draws_stay_in_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        b0 = np.array(random_b0_dir(rng))
        assert abs(np.linalg.norm(b0) - 1) < 1e-9 and b0[2] >= np.cos(np.radians(30)) - 1e-9
    s = make_sample(rng, shape=(16, 16, 8))
    assert all(lo <= v <= hi for v, (lo, hi) in zip(s.voxel_size_mm, VOXEL_RANGE_MM))
    a = make_sample(np.random.default_rng(3), shape=(16, 16, 8))
    b = make_sample(np.random.default_rng(3), shape=(16, 16, 8))
    assert np.array_equal(a.field_ppm, b.field_ppm) and np.array_equal(a.chi_ppm, b.chi_ppm)


def test_a_few_steps_reduce_the_loss():
    cfg = {**DEFAULTS, **TINY, "channels": [4, 6]}
    torch.manual_seed(0)
    net = build_network({k: cfg[k] for k in NETWORK_KEYS})
    batch = training_batch(cfg, 0)
    optimiser = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.9)
    losses = []
    for _ in range(25):
        loss = masked_l1(net(batch["x"], batch["cond"]), batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_resume_continues_exactly(tmp_path):
    """3 steps + resume to 5 gives the same network and step log as 5 steps straight."""
    torch.set_num_threads(1)
    straight = train({**TINY, "steps": 5}, tmp_path / "a", progress=False, command="test")
    train({**TINY, "steps": 3}, tmp_path / "b", progress=False, command="test")
    with pytest.raises(ValueError, match="--resume"):
        train({**TINY, "steps": 5}, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="channels"):
        train({**TINY, "steps": 5, "channels": [3, 3]}, tmp_path / "b", resume=True, progress=False)
    resumed = train({**TINY, "steps": 5}, tmp_path / "b", resume=True, progress=False, command="test")
    assert straight["step"] == resumed["step"] == 5
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-7)
    assert len(json.loads((tmp_path / "b" / "run.json").read_text())["commands"]) == 2


@pytest.mark.slow  # two pools of spawned workers, each importing torch: ~30 s
def test_data_workers_make_the_same_batches_and_the_same_run(tmp_path):
    """Batches made ahead by worker processes are those made in-process, so a run trains the same network; leaving
    the workers' context leaves no process behind."""
    torch.set_num_threads(1)
    cfg = {**DEFAULTS, **TINY, "reuse": 2}
    with DataWorkers(2) as made:
        ahead = [training_batch(cfg, step, made) for step in range(7)]
    assert not multiprocessing.active_children()
    for step, batch in enumerate(ahead):
        here = training_batch(cfg, step)
        assert all(torch.equal(batch[k], here[k]) for k in here if isinstance(here[k], torch.Tensor))
    runs = [train({**TINY, "steps": 4, "reuse": 2}, tmp_path / str(workers), progress=False, command="test",
                  data_workers=workers) for workers in (0, 1)]
    assert runs[0]["best_nrmse"] == runs[1]["best_nrmse"] and not multiprocessing.active_children()
    a, b = (torch.load(tmp_path / str(workers) / "last.pt", weights_only=False)["model"] for workers in (0, 1))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_data_workers_need_a_positive_count(tmp_path):
    with pytest.raises(ValueError, match="data workers"):
        DataWorkers(0)
    assert train_main(["--out", str(tmp_path / "x"), "--data-workers", "-1"]) == 2
    assert not (tmp_path / "x").exists()


def test_cli_trains_and_exports(tmp_path):
    args = ["--out", str(tmp_path / "run"), "--steps", "2", "--patch", "16", "16", "8", "--channels", "2", "3",
            "--fold", "2", "--hidden", "4", "--val-every", "2", "--val-samples", "1", "--threads", "1",
            "--device", "cpu", "--no-progress", "--export", "tiny", "--export-dir", str(tmp_path / "models")]
    assert train_main(args) == 0
    meta = json.loads((tmp_path / "models" / "tiny.json").read_text())
    assert meta["steps"] == 2 and meta["config"]["channels"] == [2, 3] and meta["recipe"]["lr"] == 1e-4
    assert meta["commands"][0]["command"].startswith("metaqsm-train --out")
    assert set(meta["validation"]["scores"]) == {"0.5x0.5x2", "0.76x0.76x3", "1x1x1", "0.75x0.75x1.5"}
    model = load_model("tiny", "cpu", tmp_path / "models")
    s = make_sample(np.random.default_rng(1), shape=(20, 18, 10))
    chi = predict_chi(model, s.field_ppm, s.mask, s.voxel_size_mm, s.b0_dir)
    assert chi.shape == (20, 18, 10) and np.all(np.isfinite(chi))
    assert train_main(["--out", str(tmp_path / "m"), "--arch", "mesa"]) == 2


def test_resume_refuses_a_checkpoint_without_a_network_setting(tmp_path):
    """A run from before a network setting existed (here: no ``fold``) is not resumed with today's default."""
    torch.set_num_threads(1)
    train({**TINY, "steps": 2}, tmp_path, progress=False, command="test")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    del ckpt["train_cfg"]["fold"]
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="differ from the checkpoint's: fold"):
        train({**TINY, "steps": 3}, tmp_path, resume=True, progress=False)


def _tiny_cli(out, *extra):
    return ["--out", str(out), "--patch", "16", "16", "8", "--val-every", "1", "--val-samples", "1", "--threads", "1",
            "--device", "cpu", "--no-progress", *extra]


def test_init_from_an_exported_model(tmp_path, capsys):
    """--init-from starts at exactly the parent's weights, takes its architecture and schedule, continues its
    step count (schedule and lineage), and refuses architecture options that differ from the parent's."""
    torch.set_num_threads(1)
    models = tmp_path / "models"
    # the parent: a non-default architecture and a schedule that halves the learning rate every step
    assert train_main(_tiny_cli(tmp_path / "parent", "--steps", "2", "--channels", "2", "3", "--hidden", "4",
                                "--conditioning", "voxel", "--lr", "1e-3", "--lr-decay", "0.5", "--lr-decay-steps",
                                "1", "--export", "parent", "--export-dir", str(models))) == 0
    parent_meta = json.loads((models / "parent.json").read_text())
    assert parent_meta["init_from"] is None and parent_meta["cumulative_steps"] == parent_meta["steps"] == 2
    parent_pt = str(models / "parent.pt")

    # learning rate 0: the exported child holds exactly the weights it started from
    assert train_main(_tiny_cli(tmp_path / "frozen", "--steps", "1", "--init-from", parent_pt, "--lr", "0",
                                "--export", "frozen", "--export-dir", str(models))) == 0
    start = load_model("parent", "cpu", models).state_dict()
    frozen = load_model("frozen", "cpu", models).state_dict()
    assert start.keys() == frozen.keys() and all(torch.equal(start[k], frozen[k]) for k in start)

    # no architecture or schedule options: the parent's, with the schedule at the parent's step 2 (1e-3 / 4)
    assert train_main(_tiny_cli(tmp_path / "child", "--steps", "2", "--init-from", parent_pt, "--channels", "2", "3",
                                "--export", "child", "--export-dir", str(models))) == 0
    meta = json.loads((models / "child.json").read_text())
    assert meta["config"] == parent_meta["config"]
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "child" / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2.5e-4, 1.25e-4])
    assert meta["init_from"] == {"name": "parent", "sha256": parent_meta["sha256"], "steps": 2,
                                 "wall_time_s": parent_meta["wall_time_s"]}
    assert meta["steps"] == 2 and meta["cumulative_steps"] == 4
    assert meta["cumulative_wall_time_s"] == pytest.approx(parent_meta["wall_time_s"] + meta["wall_time_s"], abs=0.1)
    run = json.loads((tmp_path / "child" / "run.json").read_text())
    assert run["train_cfg"]["init_from"] == meta["init_from"]
    # --resume of such a run names the same parent (it is part of the run's settings)
    assert train_main(_tiny_cli(tmp_path / "child", "--steps", "3", "--resume", "--init-from", parent_pt)) == 0
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "child" / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2.5e-4, 1.25e-4, 6.25e-5])

    # the grandchild's lineage counts both ancestors
    assert train_main(_tiny_cli(tmp_path / "grandchild", "--steps", "1", "--init-from", str(models / "child.pt"),
                                "--export", "grandchild", "--export-dir", str(models))) == 0
    grandchild = json.loads((models / "grandchild.json").read_text())
    assert grandchild["init_from"]["steps"] == 4 and grandchild["cumulative_steps"] == 5

    # --input may extend the parent's: a field+tkd parent starts a field+tkd+magnitude run as itself
    assert train_main(_tiny_cli(tmp_path / "tkd", "--steps", "1", "--channels", "2", "3", "--hidden", "4",
                                "--input", "field+tkd", "--export", "tkd", "--export-dir", str(models))) == 0
    assert train_main(_tiny_cli(tmp_path / "mag", "--steps", "1", "--init-from", str(models / "tkd.pt"),
                                "--input", "field+tkd+magnitude", "--lr", "0", "--export", "mag",
                                "--export-dir", str(models))) == 0
    tkd_net, mag_net = load_model("tkd", "cpu", models), load_model("mag", "cpu", models)
    assert mag_net.config == {**tkd_net.config, "input": "field+tkd+magnitude"}
    s = make_sample(np.random.default_rng(3), shape=(16, 16, 8))
    before = predict_chi(tkd_net, s.field_ppm, s.mask, s.voxel_size_mm, s.b0_dir)
    after = predict_chi(mag_net, s.field_ppm, s.mask, s.voxel_size_mm, s.b0_dir, magnitude=s.magnitude)
    assert np.allclose(after, before, rtol=0, atol=1e-5 * np.abs(before).max())

    # or swap its estimate channel: a field+tkd+magnitude parent starts a field+tv+magnitude run with its weights
    assert train_main(_tiny_cli(tmp_path / "tv", "--steps", "1", "--init-from", str(models / "mag.pt"),
                                "--input", "field+tv+magnitude", "--lr", "0", "--export", "tv",
                                "--export-dir", str(models))) == 0
    tv_net = load_model("tv", "cpu", models)
    assert tv_net.config == {**mag_net.config, "input": "field+tv+magnitude"}
    assert all(torch.equal(a, b) for a, b in zip(tv_net.state_dict().values(), mag_net.state_dict().values()))
    # and the TV channel's settings: the parent's unless given, any when given, the same weights either way
    assert (tv_net.config["tv_iterations"], tv_net.config["tv_rho_per_alpha"]) == (5, 50.0)  # TV-ADMM's defaults
    assert train_main(_tiny_cli(tmp_path / "tv2", "--steps", "1", "--init-from", str(models / "tv.pt"),
                                "--tv-iterations", "2", "--tv-rho-per-alpha", "30", "--lr", "0", "--export", "tv2",
                                "--export-dir", str(models))) == 0
    assert train_main(_tiny_cli(tmp_path / "tv2b", "--steps", "1", "--init-from", str(models / "tv2.pt"),
                                "--lr", "0", "--export", "tv2b", "--export-dir", str(models))) == 0
    for name in ("tv2", "tv2b"):
        net = load_model(name, "cpu", models)
        assert net.config == {**tv_net.config, "tv_iterations": 2, "tv_rho_per_alpha": 30.0}
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), tv_net.state_dict().values()))
    # and its data weighting, from the parent's none
    assert train_main(_tiny_cli(tmp_path / "tvw", "--steps", "1", "--init-from", str(models / "tv.pt"),
                                "--tv-weighting", "magnitude", "--lr", "0", "--export", "tvw",
                                "--export-dir", str(models))) == 0
    tvw_net = load_model("tvw", "cpu", models)
    assert tv_net.config["tv_weighting"] == "none"
    assert tvw_net.config == {**tv_net.config, "tv_weighting": "magnitude"}
    assert all(torch.equal(a, b) for a, b in zip(tvw_net.state_dict().values(), tv_net.state_dict().values()))
    # the channel the network refines is TV-ADMM's map with those iterations
    x5, _ = network_input(s.field_ppm, s.mask, s.voxel_size_mm, s.b0_dir, "field+tv+magnitude", s.magnitude, 5, 50.0)
    x2, _ = network_input(s.field_ppm, s.mask, s.voxel_size_mm, s.b0_dir, "field+tv+magnitude", s.magnitude, 2, 30.0)
    chi5 = predict_chi(tv_net, s.field_ppm, s.mask, s.voxel_size_mm, s.b0_dir, magnitude=s.magnitude)
    chi2 = predict_chi(net, s.field_ppm, s.mask, s.voxel_size_mm, s.b0_dir, magnitude=s.magnitude)
    assert np.abs(x5[1] - x2[1]).max() > 1e-3 and np.abs(chi5 - chi2).max() > 1e-4

    capsys.readouterr()
    assert train_main(_tiny_cli(tmp_path / "narrow", "--init-from", str(models / "mag.pt"), "--input", "field+tkd")) == 2
    assert "--input field+tkd (the parent's: field+tkd+magnitude)" in capsys.readouterr().err
    assert train_main(_tiny_cli(tmp_path / "bad", "--init-from", parent_pt, "--channels", "4", "4",
                                "--conditioning", "voxel+b0")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--channels 4 4 (the parent's: 2 3)" in err and "--conditioning voxel+b0" in err
    assert not (tmp_path / "bad").exists()


def test_augmentations_keep_the_physics():
    """Known answers: reversing axes with B0's components on them negated gives the reversed field of the reversed
    susceptibility; negating chi negates the field; the magnitude follows the reversal and keeps its sign."""
    from metaqsm_bids.training.synth import augment

    voxel, b0 = (0.8, 1.0, 1.6), (0.3, -0.2, 0.93)
    s = make_sample(np.random.default_rng(7), shape=(32, 32, 16), voxel_size_mm=voxel, b0_dir=b0,
                    noise_ppm=(0, 0), background=(0, 0))
    field = forward_field_ppm(s.chi_ppm, voxel, s.b0_dir)
    for flips, negate in (((0,), False), ((1, 2), True), ((0, 1, 2), False), ((), True)):
        a = augment(s, flips, negate)
        sign = -1 if negate else 1
        assert a.b0_dir == tuple(-b if i in flips else b for i, b in enumerate(s.b0_dir))
        assert np.array_equal(a.chi_ppm, sign * np.flip(s.chi_ppm, flips)) and a.voxel_size_mm == voxel
        assert np.array_equal(a.mask, np.flip(s.mask, flips)) and np.array_equal(a.magnitude, np.flip(s.magnitude, flips))
        # the simulator's field of the augmented chi with the augmented B0 is the augmented field
        np.testing.assert_allclose(forward_field_ppm(a.chi_ppm, voxel, a.b0_dir), sign * np.flip(field, flips),
                                   atol=1e-5 * np.abs(field).max())
        np.testing.assert_array_equal(a.field_ppm, sign * np.flip(s.field_ppm, flips))
    with pytest.raises(ValueError, match="spatial axes"):
        augment(s, (3,))


@pytest.mark.parametrize("input_kind, weighting", [("field+tkd", "none"), ("field+tv+magnitude", "none"),
                                                   ("field+tv+magnitude", "magnitude")])
def test_input_channels_augment_with_their_sample(input_kind, weighting):
    """A made sample's input channels, reversed and negated as the sample is (``augment_input``), are the channels of
    the augmented sample: the field exactly, TKD and TV-ADMM (plain or weighted, with its edge mask) up to float
    rounding (measured <= 5e-7 of their largest value; bound 1e-4), so reused batches need them made once."""
    from metaqsm_bids.qsm.network.deepqsm import network_input
    from metaqsm_bids.training.synth import augment
    from metaqsm_bids.training.train import augment_input

    s = make_sample(np.random.default_rng(11), shape=(32, 32, 16), voxel_size_mm=(0.8, 1.0, 1.6),
                    b0_dir=(0.3, -0.2, 0.93))
    x, scale = network_input(s.field_ppm, s.mask, s.voxel_size_mm, s.b0_dir, input_kind, s.magnitude,
                             tv_weighting=weighting)
    for flips, negate in (((0,), False), ((1, 2), True), ((), True), ((0, 1, 2), False)):
        a = augment(s, flips, negate)
        expected, a_scale = network_input(a.field_ppm, a.mask, a.voxel_size_mm, a.b0_dir, input_kind, a.magnitude,
                                          tv_weighting=weighting)
        got = augment_input(x, input_kind, flips, negate)
        assert a_scale == pytest.approx(scale, rel=1e-6)
        np.testing.assert_array_equal(got[0], expected[0])
        for c in range(1, len(x)):
            assert np.abs(got[c] - expected[c]).max() <= 1e-4 * np.abs(expected[c]).max()


def test_reused_batches_share_made_samples_and_differ_by_augmentation():
    """With reuse r, steps r*g .. r*g+r-1 train on the samples made for group g (those of step g at r = 1), each
    step stored differently; batches stay a pure function of (seed, reuse, step)."""
    cfg = {**DEFAULTS, **TINY, "reuse": 3}
    plain = training_batch({**cfg, "reuse": 1}, 1)
    batches = [training_batch(cfg, step) for step in (3, 4, 5)]
    for batch in batches:  # the same samples, up to axis reversals and sign: same |chi| histogram, same mask size
        assert torch.equal(batch["mask"].sum(dim=(1, 2, 3, 4)), plain["mask"].sum(dim=(1, 2, 3, 4)))
        assert torch.allclose(batch["y"].abs().sum(dim=(1, 2, 3, 4)), plain["y"].abs().sum(dim=(1, 2, 3, 4)))
    assert not all(torch.equal(batches[0]["x"], b["x"]) for b in batches[1:])
    again = training_batch(cfg, 4)
    assert all(torch.equal(again[k], batches[1][k]) for k in ("x", "y", "mask"))


def test_model_loss_is_the_forward_field_of_the_error():
    # QSMnet's model loss against the numpy forward model on the same padded grid (known answer)
    rng = np.random.default_rng(3)
    voxel, b0 = (0.76, 0.76, 3.0), (0.26, -0.1, 0.96)
    mask = np.zeros((16, 12, 8), bool)
    mask[3:13, 2:10, 2:6] = True
    err = (rng.normal(size=mask.shape) * mask).astype(np.float32)
    y = torch.from_numpy(rng.normal(size=mask.shape).astype(np.float32))[None, None]
    from metaqsm_bids.training.train import dipole_error_l1, training_loss, _as_tensors  # noqa: E402
    from metaqsm_bids.training.synth import Sample
    sample = Sample(field_ppm=np.zeros(mask.shape, np.float32), chi_ppm=np.zeros(mask.shape, np.float32), mask=mask,
                    voxel_size_mm=voxel, b0_dir=b0, magnitude=None)
    kernel = _as_tensors([sample], {**DEFAULTS, "dc_weight": 1.0})["kernel"]
    batch = {"y": y, "mask": torch.from_numpy(mask.astype(np.float32))[None, None], "kernel": kernel}
    expected = np.abs(forward_field_ppm(err, voxel, b0)[mask]).mean()  # default padding: half of each axis
    got = float(dipole_error_l1(y + torch.from_numpy(err)[None, None], batch))
    assert got == pytest.approx(expected, rel=1e-4)
    assert float(dipole_error_l1(y, batch)) == 0.0
    terms = training_loss(y + 1.0, batch, {"dc_weight": 0.5, "grad_weight": 0.1})
    # a constant error: L1 of 1, no differences, and the field of a uniform block is not zero
    assert float(terms["l1"]) == pytest.approx(1.0) and float(terms["grad"]) < 1e-6 \
        and float(terms["dc"]) > 0.01
    assert float(terms["loss"]) == pytest.approx(1.0 + 0.5 * float(terms["dc"]))


def test_gradient_difference_loss_on_a_ramp():
    from metaqsm_bids.training.train import gradient_error_l1  # noqa: E402
    mask = torch.zeros(1, 1, 10, 8, 6)
    mask[..., 1:9, 1:7, 1:5] = 1
    ramp = 0.3 * torch.arange(10.0).view(1, 1, 10, 1, 1).expand(1, 1, 10, 8, 6)
    y = torch.zeros_like(mask)
    batch = {"y": y, "mask": mask}
    # pairs inside the 8x6x4 box: 7*6*4 along i (each |0.3|), 8*5*4 along j and 8*6*3 along k (0)
    expected = 0.3 * 7 * 6 * 4 / (7 * 6 * 4 + 8 * 5 * 4 + 8 * 6 * 3)
    assert float(gradient_error_l1(ramp, batch)) == pytest.approx(expected, rel=1e-5)
    assert float(gradient_error_l1(ramp * 0 + 5.0, batch)) < 1e-6


def test_loss_terms_train_and_are_logged(tmp_path):
    cfg = {**DEFAULTS, **TINY, "steps": 2, "dc_weight": 0.5, "grad_weight": 0.1}
    train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["dc"]) and np.isfinite(x["grad"]) and x["loss"] > x["l1"] for x in lines)
    with pytest.raises(ValueError, match="dc_weight"):
        train({**cfg, "steps": 4, "dc_weight": 0.0}, tmp_path / "run", resume=True, progress=False)


def test_tissue_only_crops():
    """``tissue_only_fraction`` 1: crops without bleed/calcification shapes (chi within the tissue, nuclei and
    vein ranges: WM >= -0.06 x 1.6, veins <= 0.5 ppm); 0: the data stream of runs from before the setting."""
    from metaqsm_bids.training.train import _made_samples  # the made samples hold chi in ppm
    made = [s for g in range(3) for s in _made_samples(0, g, 2, (32, 32, 16), None, "voxel+b0", 2, 1.0)]
    assert all(-0.1 <= s.chi_ppm.min() and s.chi_ppm.max() <= 0.5 for s in made)
    legacy = [s for g in range(3) for s in _made_samples(0, g, 2, (32, 32, 16), None, "voxel+b0", 2)]
    assert any(s.chi_ppm.min() < -0.1 or s.chi_ppm.max() > 0.5 for s in legacy)
    cfg = {**DEFAULTS, **TINY}
    assert torch.equal(training_batch(cfg, 0)["x"], training_batch({**cfg, "tissue_only_fraction": 0.0}, 0)["x"])


def test_small_patch_batches(tmp_path, capsys):
    """``small_patch_fraction`` of the batches are ``small_patch`` crops (1: all, stacked as one size); 0 or no
    ``small_patch``: the data stream of runs from before the setting. A resumed run must keep it."""
    cfg = {**DEFAULTS, **TINY}
    small = {**cfg, "small_patch": [8, 8, 8], "small_patch_fraction": 1.0}
    assert tuple(training_batch(small, 0)["x"].shape[2:]) == (8, 8, 8)
    assert tuple(training_batch(cfg, 0)["x"].shape[2:]) == (16, 16, 8)
    assert torch.equal(training_batch(cfg, 1)["x"], training_batch({**small, "small_patch_fraction": 0.0}, 1)["x"])
    mixed = {**small, "small_patch_fraction": 0.5}
    sizes = {tuple(training_batch(mixed, step)["x"].shape[2:]) for step in range(12)}
    assert sizes == {(8, 8, 8), (16, 16, 8)}
    train({**mixed, "steps": 2}, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="small_patch"):
        train({**cfg, "steps": 4}, tmp_path / "run", resume=True, progress=False)
    assert train_main(["--out", str(tmp_path / "bad"), "--small-patch", "60", "64", "32",
                       "--small-patch-fraction", "0.3"]) == 2
    assert "--small-patch sizes must be multiples of 8" in capsys.readouterr().err


def test_texture_has_the_asked_spread_and_width():
    """The tissue texture: standard deviation as asked (ppm), smooth over its correlation width, deterministic."""
    from metaqsm_bids.training.synth import _texture_ppm
    tex = _texture_ppm((48, 48, 48), (0.5, 0.5, 0.5), np.random.default_rng(3), 0.01, 2.0).numpy()
    assert abs(float(tex.std()) - 0.01) < 1e-5
    # neighbours 0.5 mm apart are nearly equal (Gaussian correlation exp(-d^2 / (4 sigma^2)) = 0.98 here);
    # 8 mm apart, independent
    near = np.corrcoef(tex[:-1].ravel(), tex[1:].ravel())[0, 1]
    far = np.corrcoef(tex[:-16].ravel(), tex[16:].ravel())[0, 1]
    assert near > 0.95 and abs(far) < 0.1
    again = _texture_ppm((48, 48, 48), (0.5, 0.5, 0.5), np.random.default_rng(3), 0.01, 2.0).numpy()
    assert np.array_equal(tex, again)


def test_hard_edges_and_texture_crops():
    """Hard edges: on the sample grid without supersampling, a tissue-only crop's chi takes a handful of values
    (WM, GM, CSF, nuclei, one vein) where the template's soft partial volumes give thousands; texture spreads
    them again. Both off: the data stream of runs from before the settings."""
    from metaqsm_bids.training.train import TISSUE_ONLY

    def chi_values(**kw):
        s = make_sample(np.random.default_rng(8), (32, 32, 16), voxel_size_mm=(1.0, 1.0, 1.0), supersample=1,
                        noise_ppm=(0, 0), **{**TISSUE_ONLY, "max_veins": 0}, **kw)
        return np.unique(s.chi_ppm[s.mask]), s

    hard, _ = chi_values(hard_edges=True)
    soft, _ = chi_values()
    textured, s = chi_values(hard_edges=True, texture_ppm=(0.01, 0.01))
    assert len(hard) <= 12 and len(soft) > 1000 and len(textured) > 1000
    assert np.isfinite(s.field_ppm).all() and s.chi_ppm.std() > 0
    cfg = {**DEFAULTS, **TINY}
    legacy = training_batch(cfg, 0)["x"]
    assert torch.equal(legacy, training_batch({**cfg, "texture_ppm": 0.0, "hard_edges_fraction": 0.0}, 0)["x"])
    assert not torch.equal(legacy, training_batch({**cfg, "texture_ppm": 0.01, "hard_edges_fraction": 0.5}, 0)["x"])


def test_edge_background_is_harmonic_strongest_at_the_edge_and_scaled():
    """``edge_background``: the field of sources in a shell just outside the mask, added to the field and not to
    the label; harmonic inside (its Laplacian far smaller than the field's own there), larger near the edge
    than deep inside, of the asked RMS relative to the local field's; off: the sample of before."""
    from scipy import ndimage
    from metaqsm_bids.training.synth import _edge_sources
    kw = dict(shape=(48, 48, 32), voxel_size_mm=(1.0, 1.0, 1.0), b0_dir=(0, 0, 1), supersample=1, noise_ppm=(0, 0),
              background=(0, 0))
    plain = make_sample(np.random.default_rng(4), **kw)
    edged = make_sample(np.random.default_rng(4), **kw, edge_background=(1.0, 1.0))
    m = plain.mask
    assert np.array_equal(plain.chi_ppm, edged.chi_ppm) and np.array_equal(m, edged.mask)
    local = plain.field_ppm[m] - plain.field_ppm[m].mean()
    extra = edged.field_ppm - plain.field_ppm
    assert np.isclose(np.sqrt(np.mean((extra[m] - extra[m].mean()) ** 2)), np.sqrt(np.mean(local ** 2)), rtol=1e-3)
    depth = ndimage.distance_transform_edt(m)
    assert np.abs(extra[m & (depth <= 2)]).mean() > 2 * np.abs(extra[m & (depth >= 6)] - extra[m].mean()).mean()
    # the sources lie outside the mask, so the field is harmonic inside it: no Laplacian beyond the mask's rim
    sources = _edge_sources(m, (1.0, 1.0, 1.0), np.random.default_rng(0))
    assert not sources[m].any() and sources[~m].any()
    field = forward_field_ppm(sources, (1.0, 1.0, 1.0), (0, 0, 1))
    deep = depth >= 3
    assert np.abs(ndimage.laplace(field))[deep].mean() < 0.02 * np.abs(ndimage.laplace(field))[~m].mean()


@pytest.mark.parametrize("edge_mm", [0.0, 2.0])
def test_data_consistency_layer_is_the_inference_step(edge_mm):
    # the layer the network trains through against the numpy step inference applies (on its default box): the
    # closed form, and the edge-weighted step on a mask with a hole (an edge inside the crop; the bounding box, and so
    # inference's padded box, stays the crop's)
    from metaqsm_bids.qsm.inversion.consistency import data_consistency
    from metaqsm_bids.training.synth import Sample
    from metaqsm_bids.training.train import _as_tensors, data_consistency_layer, predict
    rng = np.random.default_rng(5)
    voxel, b0 = (0.76, 0.76, 3.0), (0.26, -0.1, 0.96)
    shape = (16, 12, 8)
    mask = np.ones(shape, bool)
    if edge_mm:
        mask[6:10, 4:8, 3:6] = False
    field = rng.normal(size=shape).astype(np.float32) * mask
    chi_net = rng.normal(size=shape).astype(np.float32)
    sample = Sample(field_ppm=field, chi_ppm=np.zeros(shape, np.float32), mask=mask, voxel_size_mm=voxel,
                    b0_dir=b0, magnitude=None)
    cfg = {**DEFAULTS, "network_data_consistency": 0.1, "network_data_consistency_edge_mm": edge_mm}
    batch = _as_tensors([sample], cfg)
    assert (batch["weight2"] is None) == (not edge_mm)
    scale = float(np.std(field[mask]))  # network_input's normalisation: the demeaned field's RMS
    assert np.allclose(batch["x"][0, 0].numpy()[mask] * scale, field[mask] - field[mask].mean(), atol=1e-5)
    pred = torch.from_numpy(chi_net)[None, None]
    got = data_consistency_layer(pred, batch, 0.1)[0, 0].numpy() * scale
    expected = data_consistency(chi_net * scale, batch["x"][0, 0].numpy() * scale, mask, voxel, b0, 0.1,
                                edge_mm=edge_mm or None)
    assert np.allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    if edge_mm:  # the weighting changes the answer (else this test could not tell the two steps apart)
        closed = data_consistency_layer(pred, {**batch, "weight2": None}, 0.1)[0, 0].numpy() * scale
        assert np.abs(closed - expected).max() > 0.05 * np.abs(expected).max()

    class Echo(torch.nn.Module):  # a "network" that returns chi_net, to check predict() applies the step
        def forward(self, x, cond):
            return pred
    assert torch.equal(predict(Echo(), batch, {"network_data_consistency": 0.0}), pred)
    assert torch.allclose(predict(Echo(), batch, cfg), data_consistency_layer(pred, batch, 0.1))


@pytest.mark.parametrize("option, value, words", [
    ("--texture", "-0.01", "--texture must be 0 (none) or a positive standard deviation in ppm"),
    ("--edge-background", "nan", "--edge-background must be 0 (none) or a positive relative RMS"),
    ("--network-data-consistency", "-1", "--network-data-consistency must be 0 (off) or a positive number"),
    ("--network-data-consistency-edge-mm", "inf",
     "--network-data-consistency-edge-mm must be 0 (the closed form) or a positive distance"),
    ("--hard-edges-fraction", "1.5", "--hard-edges-fraction must be within 0-1"),
    ("--supersample", "0", "--supersample must be 1 or more"),
    ("--ema", "1", "--ema must be 0 (off) or a decay below 1"),
    ("--small-patch-fraction", "0.3", "--small-patch and --small-patch-fraction go together")])
def test_cli_refuses_bad_crop_options(tmp_path, capsys, option, value, words):
    assert train_main(["--out", str(tmp_path / "run"), option, value]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_cli_refuses_an_empty_lesion_range(tmp_path, capsys):
    assert train_main(["--out", str(tmp_path / "run"), "--lesion-ppm", "1.2", "-0.6"]) == 2
    assert "--lesion-ppm needs LO <= HI" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert train_main(["--out", str(tmp_path / "run"), "--lesion-radius-mm", "0", "12"]) == 2
    assert "--lesion-radius-mm needs 0 < LO <= HI" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_lesion_range_sets_the_shapes_susceptibility():
    """The random shapes take ``lesion_ppm``'s values: a range far above anything else in a crop shows as its maximum;
    the default is the data stream of runs from before the setting."""
    from metaqsm_bids.training.train import _made_samples
    strong = [s for g in range(4) for s in _made_samples(0, g, 2, (32, 32, 16), None, "voxel+b0", 1,
                                                          lesion_ppm=(3.0, 3.0))]
    assert max(float(s.chi_ppm.max()) for s in strong) == pytest.approx(3.0, abs=1e-6)
    assert all(float(s.chi_ppm.max()) <= 3.0 + 1e-6 for s in strong)
    cfg = {**DEFAULTS, **TINY}
    legacy = {k: v for k, v in cfg.items() if k != "lesion_ppm"}
    assert torch.equal(training_batch(cfg, 0)["x"], training_batch(legacy, 0)["x"])


def test_lesion_radius_range_sets_the_shapes_size():
    """``lesion_radius_mm`` sets the shapes' semi-axes: a shape whose semi-axes are all R (a sphere, a cube, a
    cylinder of radius and half-height R, any rotation) holds the ball of radius R and lies within sqrt(3) R of its
    centre; the default is the data stream of runs from before the setting."""
    from metaqsm_bids.training.synth import _paint_shapes
    axes = [torch.arange(-20, 21, dtype=torch.float32) * 0.5] * 3  # 0.5 mm voxels, 20 mm box
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    r = torch.sqrt(x ** 2 + y ** 2 + z ** 2)
    centre_only = (r == 0)
    for radius in (2.0, 6.0):
        chi, magnitude = torch.zeros(r.shape), torch.ones(r.shape)
        _paint_shapes(chi, centre_only, axes, np.random.default_rng(3), 1, (5.0, 5.0), magnitude,
                      radius_mm=(radius, radius))
        painted = chi == 5.0
        assert painted[r <= radius - 1e-3].all() and not painted[r > np.sqrt(3) * radius + 1e-3].any()
    cfg = {**DEFAULTS, **TINY}
    legacy = {k: v for k, v in cfg.items() if k != "lesion_radius_mm"}
    assert torch.equal(training_batch(cfg, 0)["x"], training_batch(legacy, 0)["x"])


def test_ema_is_the_weights_moving_average_and_resumes_exactly(tmp_path):
    """With ``ema`` d, last.pt holds the raw weights and their average a <- d a + (1 - d) w after every step, best.pt
    (what is exported) the average; 2 steps + resume to 4 give the same average as 4 straight."""
    torch.set_num_threads(1)
    cfg = {**TINY, "ema": 0.5, "val_every": 1}
    train({**cfg, "steps": 1}, tmp_path / "one", progress=False)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    torch.manual_seed(cfg.get("seed", 0))
    start = build_network({k: {**DEFAULTS, **cfg}[k] for k in NETWORK_KEYS}).state_dict()
    for key, raw in one["model"].items():
        torch.testing.assert_close(one["ema"][key], 0.5 * start[key] + 0.5 * raw)
    best = torch.load(tmp_path / "one" / "best.pt", weights_only=False)
    for key in one["ema"]:
        assert torch.equal(best["model"][key], one["ema"][key])
    train({**cfg, "steps": 4}, tmp_path / "a", progress=False)
    train({**cfg, "steps": 2}, tmp_path / "b", progress=False)
    train({**cfg, "steps": 4}, tmp_path / "b", resume=True, progress=False)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a["ema"][key], a["model"][key]) for key in a["ema"])


def test_average_of_exported_models(tmp_path):
    """--average writes the mean of the sources' weights (a model soup), records each source's lineage and commands,
    counts a parent that is also a source once in the training time, continues from the latest source's step count,
    and refuses sources of different architectures or an averaging without --export."""
    torch.set_num_threads(1)
    models = tmp_path / "models"
    tiny = ("--channels", "2", "3", "--hidden", "4", "--export-dir", str(models))
    assert train_main(_tiny_cli(tmp_path / "parent", "--steps", "2", *tiny, "--export", "parent")) == 0
    assert train_main(_tiny_cli(tmp_path / "child", "--steps", "2", "--init-from", str(models / "parent.pt"), *tiny,
                                "--export", "child")) == 0
    assert train_main(_tiny_cli(tmp_path / "other", "--steps", "1", "--seed", "5", *tiny, "--export", "other")) == 0
    names = ("parent", "child", "other")
    assert train_main(["--average", *(str(models / f"{name}.pt") for name in names), "--export", "soup",
                       "--export-dir", str(models)]) == 0
    states = [load_model(name, "cpu", models).state_dict() for name in (*names, "soup")]
    assert any(not torch.equal(states[0][key], states[2][key]) for key in states[0])
    for key, value in states[3].items():  # the mean, as float16 (how models ship)
        assert torch.allclose(value, sum(state[key] for state in states[:3]) / 3, rtol=2e-3, atol=1e-6)
    meta = json.loads((models / "soup.json").read_text())
    metas = {name: json.loads((models / f"{name}.json").read_text()) for name in names}
    assert [source["name"] for source in meta["average_of"]] == list(names)
    assert meta["average_of"][1]["commands"] == metas["child"]["commands"]
    assert meta["average_of"][1]["init_from"]["name"] == "parent"
    assert meta["commands"][0]["command"].startswith("metaqsm-train --average")
    assert set(meta["validation"]["scores"]) == set(metas["parent"]["validation"]["scores"])
    assert meta["cumulative_steps"] == max(metas[name]["cumulative_steps"] for name in names)
    assert meta["cumulative_wall_time_s"] == pytest.approx(
        metas["parent"]["wall_time_s"] + metas["child"]["wall_time_s"] + metas["other"]["wall_time_s"], abs=0.2)
    # a run from the average continues from its step count
    assert train_main(_tiny_cli(tmp_path / "from-soup", "--steps", "1", "--init-from", str(models / "soup.pt"))) == 0
    run = json.loads((tmp_path / "from-soup" / "run.json").read_text())
    assert run["train_cfg"]["init_from"]["steps"] == meta["cumulative_steps"]

    assert train_main(_tiny_cli(tmp_path / "wide", "--steps", "1", "--channels", "2", "4", "--hidden", "4",
                                "--export", "wide", "--export-dir", str(models))) == 0
    assert train_main(["--average", str(models / "parent.pt"), str(models / "wide.pt"), "--export", "x",
                       "--export-dir", str(models)]) == 1
    assert train_main(["--average", str(models / "parent.pt"), str(models / "child.pt")]) == 2
    assert train_main(["--average", str(models / "parent.pt"), str(models / "child.pt"), "--export", "y", "--out",
                       str(tmp_path / "y")]) == 2
    assert not (models / "x.pt").exists() and not (models / "y.pt").exists()
