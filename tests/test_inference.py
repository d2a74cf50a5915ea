"""Whole-volume inference (bids_deepanat.nn.inference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from bids_deepanat.dmri import CHANNELS
from bids_deepanat.errors import InvalidInputError
from bids_deepanat.nn.checkpoint import DEFAULT_NORMALIZATION
from bids_deepanat.nn.inference import (
    choose_tile_size,
    deepanat_block_starts,
    gaussian_weights,
    predict_volume,
    prepare_input,
    to_intensity,
)
from bids_deepanat.nn.unet import UNet3D

# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny convolutions gain nothing from threads, and on a shared 2-core runner OpenMP
    # threads that spin-wait on each other make these tests 5-10 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConvNet(nn.Module):
    """One k^3 convolution: a network with a receptive-field radius of exactly (k-1)/2 that
    still insists on divisible inputs like a U-Net of the given divisor."""

    def __init__(self, kernel: int = 1, divisor: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels, self.divisor, self.base_filters = 11, divisor, 4
        self.conv = nn.Conv3d(11, 1, kernel, padding=kernel // 2)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        assert all(s % self.divisor == 0 for s in x.shape[2:]), x.shape
        return self.conv(x)


def he_unet(depth=3, base=4, seed=0):
    """Tiny U-Net with He-initialized weights and zero biases (so its output follows the
    input rather than the biases, unlike PyTorch's default initialization)."""
    torch.manual_seed(seed)
    model = UNet3D(11, 1, depth=depth, base_filters=base)
    for conv in model.conv_layers():
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
    return model.eval()


def whole_pass(model, x, mask):
    with torch.inference_mode():
        return model(torch.from_numpy(x)[None])[0, 0].numpy() * mask


def sphere(shape, radius, centre=None):
    centre = np.array(centre if centre is not None else [(s - 1) / 2 for s in shape])
    grid = np.indices(shape).astype(float)
    return ((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2


def smooth_maps(shape, seed=0, sigma=3.0):
    rng = np.random.default_rng(seed)
    return np.stack([gaussian_filter(rng.normal(size=shape), sigma) for _ in CHANNELS], -1)


def random_inputs(shape, mask, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(11, *shape)) * mask).astype(np.float32)


# ---------------------------------------------------------------- prepare_input / to_intensity


def test_prepare_input_normalization():
    shape = (10, 12, 8)
    mask = sphere(shape, 4.5)
    rng = np.random.default_rng(1)
    maps = rng.gamma(2.0, 300.0, size=(*shape, 11))
    maps[..., 2:5] = rng.uniform(0, 3, size=(*shape, 3))  # eigenvalues in µm²/ms
    maps[~mask] = np.nan  # whatever lies outside the brain must not matter
    out = prepare_input(maps, mask, CHANNELS)
    assert out.shape == (11, *shape) and out.dtype == np.float32
    assert not out[:, ~mask].any()
    for i, name in enumerate(CHANNELS):
        inside = out[i][mask].astype(np.float64)
        if name in ("L1", "L2", "L3"):
            np.testing.assert_allclose(inside, maps[..., i][mask], rtol=1e-6)
        else:
            assert abs(inside.mean()) < 1e-5
            assert abs(inside.std() - 1) < 1e-5  # population std, as the reference

    # A network trained on FSL-style eigenvalues (mm²/s) gets them converted.
    rules = read_rules_with_units("mm2/s")
    converted = prepare_input(maps, mask, CHANNELS, normalization=rules)
    np.testing.assert_allclose(converted[2:5], out[2:5] * 1e-3, rtol=1e-6)
    np.testing.assert_array_equal(converted[5:], out[5:])
    with pytest.raises(ValueError, match="unknown units"):
        prepare_input(maps, mask, CHANNELS, normalization=read_rules_with_units("s/mm2"))


def read_rules_with_units(unit):
    return {**DEFAULT_NORMALIZATION, "units": {c: unit for c in ("L1", "L2", "L3")}}


def test_prepare_input_errors():
    shape = (6, 6, 6)
    mask = sphere(shape, 2.5)
    maps = np.random.default_rng(0).normal(size=(*shape, 11))
    with pytest.raises(InvalidInputError, match="brain mask is empty"):
        prepare_input(maps, np.zeros(shape, bool))
    const = maps.copy()
    const[..., 1] = 7.0
    with pytest.raises(InvalidInputError, match="meandwi is constant"):
        prepare_input(const, mask)
    bad = maps.copy()
    bad[3, 3, 3, 6] = np.inf
    with pytest.raises(InvalidInputError, match="dwi2 has 1 non-finite"):
        prepare_input(bad, mask)
    with pytest.raises(ValueError, match="mask shape"):
        prepare_input(maps, mask[:-1])
    with pytest.raises(ValueError, match="maps must be"):
        prepare_input(maps[..., :10], mask)
    with pytest.raises(ValueError, match="no normalization rule"):
        prepare_input(maps, mask, [*CHANNELS[:10], "fa"])


def test_to_intensity():
    mask = sphere((5, 5, 5), 2)
    pred = np.where(mask, 1.0, 5.0)
    out = to_intensity(pred, mask, 400.0, 100.0)
    assert out.dtype == np.float32
    assert np.all(out[mask] == 500.0) and not out[~mask].any()
    with pytest.raises(ValueError, match="std > 0"):
        to_intensity(pred, mask, 400.0, 0.0)


# ---------------------------------------------------------------- the reference block rule


def test_deepanat_block_starts_reference_rule():
    # brain 10..150 (141 voxels): ceil(141/64) + 5 = 8 blocks from 10 to 150 - 63 = 87
    assert deepanat_block_starts(10, 150) == [10, 21, 32, 43, 54, 65, 76, 87]
    # 67 voxels: 7 starts over 0..3, numpy rounds halves to even: 0, .5, 1, 1.5, 2, 2.5, 3
    assert deepanat_block_starts(0, 66) == [0, 0, 1, 2, 2, 2, 3]
    # narrower than a block: the starts run backwards, every block covers the brain
    starts = deepanat_block_starts(40, 89)
    assert len(starts) == 6 and starts[0] == 40 and starts[-1] == 89 - 63
    assert deepanat_block_starts(0, 15, block=16, extra=5) == [0] * 6


def test_gaussian_weights():
    w = gaussian_weights((8, 12, 4))
    assert w.shape == (8, 12, 4) and w.dtype == np.float32
    assert w.max() == 1.0 and w.min() >= 1e-3
    np.testing.assert_array_equal(w, w[::-1, ::-1, ::-1])  # symmetric about the centre


# ---------------------------------------------------------------- tiling mechanics


@pytest.mark.parametrize("tiling", ["gaussian", "deepanat"])
def test_pointwise_model_tiles_exactly(tiling):
    """A 1x1x1 model has no context: any tiling must reproduce the whole-volume pass, for an
    odd volume size (padded inside to multiples of 4) and a brain near the volume faces."""
    shape = (23, 30, 17)
    mask = sphere(shape, 13, centre=(11, 16, 8))
    x = random_inputs(shape, mask)
    model = ConvNet(kernel=1).eval()
    expected = model.conv.weight[0, :, 0, 0, 0].detach().numpy() @ x.reshape(11, -1)
    expected = (expected.reshape(shape) + model.conv.bias.item()) * mask
    out = predict_volume(model, x, mask, device="cpu", tiling=tiling, tile_size=8,
                         block_size=12, batch_size=4)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not out[~mask].any()


def test_deepanat_crop_removes_edge_effects():
    """A 7^3 convolution (radius 3) is reproduced exactly by the reference scheme, because it
    crops 3 voxels at inner block faces; without the crop, block edges show."""
    shape = (30, 30, 30)
    mask = sphere(shape, 13)
    x = random_inputs(shape, mask, seed=3)
    model = ConvNet(kernel=7, divisor=2, seed=1).eval()
    expected = whole_pass(model, x, mask)
    out = predict_volume(model, x, mask, device="cpu", tiling="deepanat", block_size=12,
                         batch_size=8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    uncropped = predict_volume(model, x, mask, device="cpu", tiling="deepanat", block_size=12,
                               crop=0, batch_size=8)
    assert np.abs(uncropped - expected).max() > 1e-2


def test_single_tile_equals_whole_pass():
    """When the brain fills one tile (or one reference block) tiling is a no-op (~1e-6)."""
    model = he_unet()
    shape = (20, 24, 28)
    mask = np.ones(shape, bool)
    x = random_inputs(shape, mask, seed=5)
    expected = whole_pass(model, x, mask)
    out = predict_volume(model, x, mask, device="cpu", tiling="gaussian", tile_size=32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    cube = (16, 16, 16)
    mask = np.ones(cube, bool)
    x = random_inputs(cube, mask, seed=6)
    out = predict_volume(model, x, mask, device="cpu", tiling="deepanat", block_size=16)
    np.testing.assert_allclose(out, whole_pass(model, x, mask), rtol=1e-5, atol=1e-5)


def test_gaussian_and_deepanat_agree_on_smooth_field():
    """Both schemes on a smooth random field (Gaussian-filtered noise, sigma 3 voxels), tiny
    He-initialized U-Net (depth 3, 4 filters), 40^3 volume, spherical brain of radius 17,
    20^3 tiles and reference blocks (8 blocks per axis by the reference rule).

    Measured (torch 2.13, CPU), as RMS difference inside the brain / SD of the prediction:
    gaussian vs deepanat 0.489 (correlation 0.894), gaussian vs a whole-volume pass 0.433,
    deepanat vs whole-volume 0.492; the same prediction shifted by 3 voxels differs by 0.87.
    A random U-Net with max pooling is very sensitive to missing context and to the pooling
    phase, hence these loose bounds; exactness of the stitching itself is checked with the
    context-free and radius-3 models above. Bounds: 0.6 (correlation > 0.85), 0.55, 0.6.
    """
    shape = (40, 40, 40)
    mask = sphere(shape, 17)
    x = prepare_input(smooth_maps(shape), mask)
    model = he_unet(seed=0)
    gauss = predict_volume(model, x, mask, device="cpu", tiling="gaussian", tile_size=20)
    ref = predict_volume(model, x, mask, device="cpu", tiling="deepanat", block_size=20,
                         batch_size=8)
    whole = whole_pass(model, x, mask)
    sd = whole[mask].std()

    def rms(a, b):
        return np.sqrt(np.mean((a - b)[mask] ** 2)) / sd

    assert rms(gauss, ref) < 0.6
    assert np.corrcoef(gauss[mask], ref[mask])[0, 1] > 0.85
    assert rms(gauss, whole) < 0.55
    assert rms(ref, whole) < 0.6


@pytest.mark.parametrize("tiling", ["gaussian", "deepanat"])
def test_deterministic_shape_and_mask(tiling):
    shape = (21, 26, 19)  # not divisible by 4
    mask = sphere(shape, 9, centre=(9, 14, 10))
    x = prepare_input(smooth_maps(shape, seed=2), mask)
    model = he_unet(seed=2)
    kwargs = {"device": "cpu", "tiling": tiling, "block_size": 16, "batch_size": 4}
    first = predict_volume(model, x, mask, **kwargs)
    second = predict_volume(model, x, mask, **kwargs)
    assert first.shape == shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert not first[~mask].any()
    assert np.isfinite(first).all() and first[mask].std() > 0


def test_automatic_tile_size_and_progress(capsys):
    shape = (18, 22, 14)
    mask = sphere(shape, 8)
    x = random_inputs(shape, mask)
    model = he_unet(depth=2)
    out = predict_volume(model, x, mask, device="auto", progress=True)
    assert out.shape == shape
    assert "T1w synthesis" in capsys.readouterr().err


def test_choose_tile_size():
    reference = UNet3D(depth=5, base_filters=48, in_channels=11).to("meta")
    small = choose_tile_size(reference, "cpu", memory=1 << 30)
    large = choose_tile_size(reference, "cuda", memory=80 << 30)
    assert small % 16 == 0 and large % 16 == 0
    assert 16 <= small < large <= 256
    assert choose_tile_size(reference, "cpu", memory=1) == 16


def test_out_of_memory_retries_with_smaller_tiles(caplog):
    class Greedy(ConvNet):
        def forward(self, x):
            if x.shape[0] > 1 or max(x.shape[2:]) > 16:
                raise torch.OutOfMemoryError("simulated")
            return super().forward(x)

    shape = (32, 32, 32)
    mask = sphere(shape, 15)
    x = random_inputs(shape, mask)
    model = Greedy(kernel=3).eval()
    caplog.set_level("INFO")
    out = predict_volume(model, x, mask, device="cpu", tile_size=32, batch_size=2)
    expected = predict_volume(ConvNet(kernel=3).eval(), x, mask, device="cpu", tile_size=16)
    np.testing.assert_array_equal(out, expected)
    assert "trying 16^3" in caplog.text

    with pytest.raises(torch.OutOfMemoryError):  # nowhere to fall back to from the CPU
        predict_volume(model, x, mask, device="cpu", tiling="deepanat", block_size=32)


def test_invalid_arguments():
    shape = (8, 8, 8)
    mask = sphere(shape, 3)
    x = random_inputs(shape, mask)
    model = he_unet(depth=3)
    with pytest.raises(ValueError, match="tiling must be"):
        predict_volume(model, x, mask, tiling="sliding")
    with pytest.raises(ValueError, match="tile_size 6 must be a positive multiple of 4"):
        predict_volume(model, x, mask, tile_size=6)
    with pytest.raises(ValueError, match="block_size 10"):
        predict_volume(model, x, mask, tiling="deepanat", block_size=10)
    big = sphere((40, 40, 40), 19)
    with pytest.raises(ValueError, match="8\\^3 blocks cropped by 3 leave gaps along axis 0"):
        predict_volume(model, random_inputs(big.shape, big), big, tiling="deepanat",
                       block_size=8)
    with pytest.raises(ValueError, match="mask shape"):
        predict_volume(model, x, mask[:4])
    with pytest.raises(ValueError, match="model takes 11 channels"):
        predict_volume(model, x[:3], mask)
    with pytest.raises(InvalidInputError, match="mask is empty"):
        predict_volume(model, x, np.zeros(shape, bool))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            predict_volume(model, x, mask, device="cuda")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tiling", ["gaussian", "deepanat"])
def test_cuda_autocast_close_to_cpu(tiling):
    shape = (40, 40, 40)
    mask = sphere(shape, 17)
    x = prepare_input(smooth_maps(shape), mask)
    model = he_unet(depth=3, base=8)
    kwargs = {"tiling": tiling, "tile_size": 24, "block_size": 24}
    cpu = predict_volume(model, x, mask, device="cpu", **kwargs)
    gpu = predict_volume(model, x, mask, device="cuda", amp=True, **kwargs)
    again = predict_volume(model, x, mask, device="cuda", amp=True, **kwargs)
    sd = cpu[mask].std()
    # bfloat16 keeps ~3 significant digits; errors compound over 11 layers
    assert np.sqrt(np.mean((gpu - cpu)[mask] ** 2)) < 0.05 * sd
    assert np.abs(gpu - cpu).max() < 0.5 * sd
    np.testing.assert_array_equal(gpu, again)
    assert not gpu[~mask].any()
