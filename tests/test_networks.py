"""WP-Conv and the U-Net: shapes, conditioning, per-sample kernels, receptive field, save/load."""
import pytest
import torch
import torch.nn.functional as F

from metaqsm_bids.qsm.network.networks import (PlainConv3d, UNet3d, WPConv3d, encode_condition, extends_input,
                                               fold_blocks, load_network, save_network, unfold_blocks, widen_input)


def cond(voxel, b0=(0.0, 0.0, 1.0), conditioning="voxel+b0"):
    return encode_condition(voxel, b0, conditioning)[None]


@pytest.mark.parametrize("cin,cout,k", [(1, 4, 3), (4, 8, 3), (8, 3, 3), (6, 1, 1)])
def test_wpconv_shapes(cin, cout, k):
    torch.manual_seed(0)
    layer = WPConv3d(cin, cout, cond_dim=6, hidden=16, kernel_size=k)
    weight, bias = layer.kernel(cond((0.5, 0.5, 2.0)))
    assert weight.shape == (1, cout, cin, k, k, k) and bias.shape == (1, cout)
    y = layer(torch.randn(1, cin, 9, 8, 7), cond((0.5, 0.5, 2.0)))
    assert y.shape == (1, cout, 9, 8, 7)


def test_predicted_weights_depend_on_voxel_size_and_b0_only():
    torch.manual_seed(0)
    layer = WPConv3d(4, 4, cond_dim=6, hidden=16)
    w_a, b_a = layer.kernel(cond((0.5, 0.5, 2.0)))
    w_a2, b_a2 = layer.kernel(cond((0.5, 0.5, 2.0)))
    w_b, _ = layer.kernel(cond((1.0, 1.0, 1.0)))
    w_c, _ = layer.kernel(cond((0.5, 0.5, 2.0), b0=(0.0, 0.5, 0.866)))
    assert torch.equal(w_a, w_a2) and torch.equal(b_a, b_a2)
    assert (w_a - w_b).abs().max() > 1e-4
    assert (w_a - w_c).abs().max() > 1e-4


def test_condition_encoding():
    # the dipole kernel is the same for B0 and -B0: so must the code be
    assert torch.equal(encode_condition((1, 1, 2), (0.1, 0.2, -0.97), "voxel+b0"),
                       encode_condition((1, 1, 2), (-0.1, -0.2, 0.97), "voxel+b0"))
    assert encode_condition((1, 1, 2), (0, 0, 1), "voxel").shape == (3,)
    with pytest.raises(ValueError):
        encode_condition((1, 0, 2), (0, 0, 1), "voxel")
    with pytest.raises(ValueError):
        encode_condition((1, 1, 2), (0, 0, 1), "b0")


def test_per_sample_kernels_match_separate_convolutions():
    """A batch with different voxel sizes (grouped conv) equals running each sample alone."""
    torch.manual_seed(0)
    layer = WPConv3d(3, 5, cond_dim=6, hidden=8)
    x = torch.randn(2, 3, 8, 8, 6)
    conds = torch.cat([cond((0.5, 0.5, 2.0)), cond((1.2, 0.9, 3.5))])
    both = layer(x, conds)
    for b in range(2):
        weight, bias = layer.kernel(conds[b:b + 1])
        alone = F.conv3d(x[b:b + 1], weight[0], bias[0], padding=1)
        torch.testing.assert_close(both[b:b + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, fold", [("meta", 1), ("meta", 2), ("mesa", 2)])
def test_unet_shapes_and_receptive_radius(arch, fold):
    torch.manual_seed(0)
    net = UNet3d({"arch": arch, "channels": [2, 3, 4], "fold": fold, "hidden": 4,
                  "fixed_voxel_size_mm": [0.76, 0.76, 3]})
    assert net.multiple == 4 * fold
    n = 64 * fold
    x = torch.zeros(1, 1, n, n, n, requires_grad=True)
    c = cond((0.76, 0.76, 3.0)) if arch == "meta" else None
    y = net(x, c)
    assert y.shape == x.shape
    y[0, 0, n // 2, n // 2, n // 2].backward()
    reach = (x.grad[0, 0].abs() > 0).nonzero()
    # the bound used for patching must cover the true dependence, and not grossly overstate it
    assert (reach - n // 2).abs().max() <= net.receptive_radius
    assert (reach - n // 2).abs().max() >= 0.75 * net.receptive_radius


def test_fold_blocks_is_a_lossless_space_to_depth():
    x = torch.arange(2 * 3 * 4 * 6 * 2, dtype=torch.float32).view(2, 3, 4, 6, 2)
    folded = fold_blocks(x, 2)
    assert folded.shape == (2, 24, 2, 3, 1)
    # channel c * 8 + (a * 4 + b * 2 + d) of block (i, j, k) holds voxel (2i + a, 2j + b, 2k + d) of channel c
    assert folded[1, 2 * 8 + 5, 1, 2, 0] == x[1, 2, 3, 4, 1]
    assert torch.equal(unfold_blocks(folded, 2), x)
    assert torch.equal(fold_blocks(x, 1), x)


def test_mesa_needs_its_resolution():
    with pytest.raises(ValueError, match="fixed_voxel_size_mm"):
        UNet3d({"arch": "mesa"})
    assert isinstance(UNet3d({"arch": "mesa", "fixed_voxel_size_mm": [1, 1, 1]}).head, PlainConv3d)


def test_save_then_load_gives_identical_output(tmp_path):
    torch.manual_seed(0)
    net = UNet3d({"channels": [4, 6], "hidden": 8, "conditioning": "voxel"}).eval()
    x, c = torch.randn(1, 1, 12, 16, 8), cond((0.6, 0.6, 1.2), conditioning="voxel")
    save_network(net, tmp_path / "net.pt")
    again = load_network(tmp_path / "net.pt")
    assert again.config == net.config
    with torch.no_grad():
        assert torch.equal(net(x, c), again(x, c))
        # float16 storage: same network to within half-precision rounding of the weights
        save_network(net, tmp_path / "half.pt", half=True)
        half = load_network(tmp_path / "half.pt")
        ref = net(x, c)
        assert (half(x, c) - ref).abs().max() <= 5e-3 * ref.abs().max()
    # loaded in place of the meta-device build: real float32 tensors, trainable (training starts from shipped models)
    for loaded in (again, half):
        assert all(p.dtype == torch.float32 and not p.is_meta and p.requires_grad for p in loaded.parameters())
        assert not any(b.is_meta for b in loaded.buffers())
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "net.pt").stat().st_size


@pytest.mark.parametrize("arch", ["meta", "mesa"])
def test_residual_tkd_network_starts_as_its_tkd_channel(arch):
    """``input='field+tkd'``: two input channels, output = channel 1 + U-Net, with a zeroed last layer."""
    torch.manual_seed(0)
    net = UNet3d({"arch": arch, "channels": [2, 3], "hidden": 4, "input": "field+tkd",
                  "fixed_voxel_size_mm": [1, 1, 1]})
    x = torch.randn(2, 2, 8, 8, 4)
    c = torch.cat([cond((1, 1, 1)), cond((0.5, 0.5, 2))]) if arch == "meta" else None
    assert torch.equal(net(x, c), x[:, 1:2])
    # one optimiser step moves it away from TKD (the zero layer still gets gradients)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x, c).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(net(x, c), x[:, 1:2])
    with pytest.raises(ValueError, match="input"):
        UNet3d({"input": "phase"})
    with pytest.raises(ValueError, match="list of widths"):
        UNet3d({"channels": 8})


@pytest.mark.parametrize("arch", ["meta", "mesa"])
def test_widened_input_starts_as_its_parent(arch):
    """A field+tkd network widened to field+tkd+magnitude computes what it did (to float rounding), whatever the magnitude,
    until training moves the new channel's weights off zero; narrowing is refused."""
    torch.manual_seed(1)
    parent = UNet3d({"arch": arch, "channels": [2, 3], "hidden": 4, "input": "field+tkd",
                     "fixed_voxel_size_mm": [1, 1, 1]})
    with torch.no_grad():  # a trained-looking parent: a non-zero head, so the output is not just TKD
        for p in parent.parameters():
            p.add_(0.05 * torch.randn_like(p))
    child = widen_input(parent, "field+tkd+magnitude")
    assert child.config == {**parent.config, "input": "field+tkd+magnitude"}
    x = torch.randn(2, 2, 8, 8, 4)
    c = torch.cat([cond((1, 1, 1)), cond((0.5, 0.5, 2))]) if arch == "meta" else None
    with torch.no_grad():
        out = parent(x, c)
        assert not torch.equal(out, x[:, 1:2])
        for magnitude in (torch.zeros(2, 1, 8, 8, 4), torch.rand(2, 1, 8, 8, 4)):
            # equal up to float summation order (the convolution sums over more, zero-weighted channels)
            assert torch.allclose(child(torch.cat([x, magnitude], 1), c), out, rtol=0, atol=1e-5 * out.abs().max())
    opt = torch.optim.SGD(child.parameters(), lr=0.1)
    child(torch.cat([x, torch.rand(2, 1, 8, 8, 4)], 1), c).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.equal(child(torch.cat([x, torch.zeros(2, 1, 8, 8, 4)], 1), c),
                               child(torch.cat([x, torch.ones(2, 1, 8, 8, 4)], 1), c))
    assert extends_input("field+tkd+magnitude", "field+tkd") and not extends_input("field+tkd", "field+tkd")
    with pytest.raises(ValueError, match="does not extend"):
        widen_input(child, "field+tkd")


def test_swapped_estimate_keeps_the_weights_and_the_residual():
    """A field+tkd+magnitude network started as field+tv+magnitude has its weights and adds its correction to
    channel 1, now TV-ADMM's map (either way round); fewer channels are refused."""
    torch.manual_seed(3)
    parent = UNet3d({"channels": [2, 3], "hidden": 4, "input": "field+tkd+magnitude"})
    with torch.no_grad():
        for p in parent.parameters():
            p.add_(0.05 * torch.randn_like(p))
    child = widen_input(parent, "field+tv+magnitude")
    assert child.config == {**parent.config, "input": "field+tv+magnitude"} and child.residual
    x, c = torch.randn(1, 3, 8, 8, 4), cond((0.5, 0.5, 2))
    with torch.no_grad():
        assert torch.equal(child(x, c), parent(x, c))
        x2 = x.clone()
        x2[:, 1] += 1.0  # a different estimate: the output follows it
        assert not torch.allclose(child(x2, c), child(x, c))
    assert extends_input("field+tkd+magnitude", "field+tv+magnitude")
    assert not extends_input("field+tkd", "field+tv+magnitude")


def test_input_shape_must_fit_the_pooling_grid():
    net = UNet3d({"channels": [2, 3], "fold": 2, "hidden": 4})
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.zeros(1, 1, 8, 8, 6), cond((1, 1, 1)))
