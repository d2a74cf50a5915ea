"""The DeepAnat generator network (bids_deepanat.nn.unet)."""

from __future__ import annotations

import pytest
import torch

from bids_deepanat.nn.unet import (
    REFERENCE_NUM_PARAMETERS,
    UNet3D,
    count_parameters,
    unet3d_num_parameters,
)


@pytest.mark.parametrize(
    ("depth", "base", "in_ch", "out_ch", "shape", "expected"),
    [
        (1, 4, 11, 1, (5, 7, 3), (1, 1, 5, 7, 3)),  # depth 1: no pooling, any size
        (2, 4, 11, 1, (8, 6, 10), (1, 1, 8, 6, 10)),
        (3, 4, 11, 1, (16, 16, 16), (1, 1, 16, 16, 16)),
        (3, 8, 3, 2, (8, 12, 4), (1, 2, 8, 12, 4)),
        (2, 6, 1, 1, (2, 2, 2), (1, 1, 2, 2, 2)),
    ],
)
def test_output_shape(depth, base, in_ch, out_ch, shape, expected):
    model = UNet3D(in_ch, out_ch, depth=depth, base_filters=base).eval()
    with torch.inference_mode():
        y = model(torch.randn(1, in_ch, *shape))
    assert tuple(y.shape) == expected
    assert count_parameters(model) == unet3d_num_parameters(in_ch, out_ch, depth, base)


def test_batch_is_independent():
    model = UNet3D(11, 1, depth=2, base_filters=4).eval()
    x = torch.randn(2, 11, 8, 8, 8)
    with torch.inference_mode():
        both = model(x)
        first = model(x[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 0},
        {"depth": -1},
        {"base_filters": 0},
        {"in_channels": 0},
        {"out_channels": 0},
        {"depth": 2.0},
        {"depth": True},
    ],
)
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        UNet3D(**kwargs)


@pytest.mark.parametrize("shape", [(12, 16, 16), (16, 16, 20), (8, 8, 8)])
def test_indivisible_input(shape):
    model = UNet3D(11, 1, depth=5, base_filters=4)  # needs multiples of 2**4
    with pytest.raises(ValueError, match="not divisible by 16"):
        model(torch.zeros(1, 11, *shape))


def test_wrong_channels_or_rank():
    model = UNet3D(11, 1, depth=2, base_filters=4)
    with pytest.raises(ValueError, match="11 input channels"):
        model(torch.zeros(1, 10, 8, 8, 8))
    with pytest.raises(ValueError, match="5-D"):
        model(torch.zeros(11, 8, 8, 8))


def test_reference_parameter_count():
    """Depth 5, 48 base filters, 11 inputs: 52,958,977 parameters, as the Keras reference."""
    assert REFERENCE_NUM_PARAMETERS == 52_958_977
    with torch.device("meta"):  # no memory, no initialization: just the module structure
        model = UNet3D()
    assert count_parameters(model) == REFERENCE_NUM_PARAMETERS
    assert [c.out_channels for c in model.conv_layers()] == (
        [48] * 2 + [96] * 2 + [192] * 2 + [384] * 2 + [768] * 2
        + [384] * 2 + [192] * 2 + [96] * 2 + [48] * 2 + [1]
    )
    # No convolution after upsampling: the decoder's first conv sees [skip, upsampled].
    assert [c.in_channels for c in model.conv_layers()[10:18:2]] == [1152, 576, 288, 144]
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )


def test_config_round_trip():
    model = UNet3D(11, 1, depth=3, base_filters=4)
    assert UNet3D(**model.config()).config() == model.config()
    assert model.divisor == 4
