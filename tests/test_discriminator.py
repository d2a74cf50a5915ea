"""The SRGAN-style 2D discriminator and the slicing of 3D blocks for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from bids_deepanat.nn.discriminator import (
    PatchDiscriminator2D,
    SRGANDiscriminator2D,
    orthogonal_slices,
)


@pytest.mark.parametrize(
    ("image_size", "base_filters", "n_blocks", "dense", "batch"),
    [
        (16, 4, 2, 8, 3),
        (16, 4, 4, 8, 2),
        (32, 8, 3, 16, 5),
        (64, 2, 4, 4, 2),
    ],
)
def test_output_shape(image_size, base_filters, n_blocks, dense, batch):
    disc = SRGANDiscriminator2D(image_size=image_size, base_filters=base_filters,
                                n_blocks=n_blocks, dense_features=dense)
    x = torch.randn(batch, 1, image_size, image_size)
    assert disc(x).shape == (batch, 1)
    p = disc.eval().probability(x)
    assert p.shape == (batch, 1) and bool(((p > 0) & (p < 1)).all())


def test_reference_layout():
    disc = SRGANDiscriminator2D()
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride for c in convs] == [(1, 1), (2, 2)] * 4
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    # Batch norm after every convolution but the first, as in the reference.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 7
    linears = [m for m in disc.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512 * 4 * 4, 1024),
                                                                        (1024, 1)]
    slopes = {m.negative_slope for m in disc.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}
    assert PatchDiscriminator2D is SRGANDiscriminator2D


def test_spectral_norm_on_every_layer():
    disc = SRGANDiscriminator2D(image_size=16, base_filters=4, n_blocks=2, dense_features=8)
    layers = [m for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 2 * 2 + 2
    for layer in layers:
        assert parametrize.is_parametrized(layer, "weight")
        kinds = [type(p).__name__ for p in layer.parametrizations.weight]
        assert kinds == ["_SpectralNorm"]


def test_spectral_norm_bounds_the_dense_layer():
    torch.manual_seed(0)
    disc = SRGANDiscriminator2D(image_size=16, base_filters=4, n_blocks=2, dense_features=8)
    disc.train()
    for _ in range(20):  # power iterations converge during training forwards
        disc(torch.randn(2, 1, 16, 16))
    weight = disc.classifier[1].weight.detach()
    assert torch.linalg.matrix_norm(weight, ord=2) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 20, "n_blocks": 4},  # 20 is not divisible by 16
        {"base_filters": 0},
        {"n_blocks": True},
        {"dense_features": -1},
        {"in_channels": 1.5},
        {"negative_slope": 1.5},
    ],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SRGANDiscriminator2D(**kwargs)


def test_forward_rejects_wrong_shapes():
    disc = SRGANDiscriminator2D(image_size=16, base_filters=4, n_blocks=2, dense_features=8)
    with pytest.raises(ValueError, match="expected input"):
        disc(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="expected input"):
        disc(torch.randn(2, 2, 16, 16))


@pytest.mark.parametrize(("n", "c", "p", "positions", "m"), [
    (1, 1, 8, None, 24),
    (2, 1, 16, None, 96),
    (3, 2, 8, [0, 4, 7], 27),
])
def test_slice_shapes(n, c, p, positions, m):
    blocks = torch.randn(n, c, p, p, p)
    assert orthogonal_slices(blocks, positions).shape == (m, c, p, p)


def test_slice_content_and_order():
    p = 6
    blocks = torch.arange(2 * p**3, dtype=torch.float32).reshape(2, 1, p, p, p)
    slices = orthogonal_slices(blocks, [1, 4])  # K = 2 per axis, 6 per block
    assert slices.shape == (12, 1, p, p)
    b = 1  # second block starts at 6
    assert torch.equal(slices[6 * b + 0, 0], blocks[b, 0, 1, :, :])  # sagittal x=1
    assert torch.equal(slices[6 * b + 1, 0], blocks[b, 0, 4, :, :])  # sagittal x=4
    assert torch.equal(slices[6 * b + 2, 0], blocks[b, 0, :, 1, :])  # coronal y=1
    assert torch.equal(slices[6 * b + 5, 0], blocks[b, 0, :, :, 4])  # axial z=4


def test_slices_bad_input():
    with pytest.raises(ValueError, match="cubic"):
        orthogonal_slices(torch.zeros(1, 1, 8, 8, 4))
    with pytest.raises(ValueError, match="positions"):
        orthogonal_slices(torch.zeros(1, 1, 8, 8, 8), [8])


def test_slices_keep_gradients():
    blocks = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    disc = SRGANDiscriminator2D(image_size=16, base_filters=4, n_blocks=2, dense_features=8)
    disc(orthogonal_slices(blocks)).sum().backward()
    assert blocks.grad is not None and blocks.grad.abs().sum() > 0
