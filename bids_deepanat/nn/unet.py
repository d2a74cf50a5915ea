"""The DeepAnat generator: a plain 3D U-Net (Li et al., Medical Image Analysis 2023).

The layout follows the reference Keras model layer for layer so that trained Keras weights can
be imported (see :mod:`bids_deepanat.nn.keras_import`): per level two 3x3x3 convolutions with
bias and ReLU, no normalization, 2x2x2 max pooling on the way down, nearest-neighbour x2
upsampling on the way up *without* a convolution after it, concatenation ``[skip, upsampled]``,
and a final linear 3x3x3 convolution. With the reference settings (depth 5, 48 base filters,
11 inputs, 1 output) the network has :data:`REFERENCE_NUM_PARAMETERS` parameters.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "REFERENCE_NUM_PARAMETERS",
    "ConvBlock3D",
    "DownBlock3D",
    "UNet3D",
    "UpBlock3D",
    "count_parameters",
    "unet3d_num_parameters",
]


def _check_positive_int(name: str, value: int) -> None:
    # bool is an int subclass; UNet3D(depth=True) is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ConvBlock3D(nn.Module):
    """Two 3x3x3 convolutions (zero 'same' padding, bias), each followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, X, Y, Z) -> (N, out_channels, X, Y, Z); any spatial size."""
        return self.act(self.conv2(self.act(self.conv1(x))))


class DownBlock3D(nn.Module):
    """2x2x2 max pooling followed by a :class:`ConvBlock3D`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool3d(kernel_size=2)
        self.conv = ConvBlock3D(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, X, Y, Z) -> (N, out_channels, X/2, Y/2, Z/2); X, Y, Z even."""
        return self.conv(self.pool(x))


class UpBlock3D(nn.Module):
    """Nearest-neighbour x2 upsampling, concatenation ``[skip, upsampled]``, :class:`ConvBlock3D`.

    The reference model has no convolution between the upsampling and the concatenation, so
    the first convolution sees ``skip_channels + in_channels`` channels.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("skip_channels", skip_channels)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = ConvBlock3D(skip_channels + in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels, X, Y, Z), skip (N, skip_channels, 2X, 2Y, 2Z)
        -> (N, out_channels, 2X, 2Y, 2Z)."""
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet3D(nn.Module):
    """3D U-Net generator of DeepAnat.

    Args:
        in_channels: number of input maps (11 for DeepAnat, see ``bids_deepanat.dmri.CHANNELS``).
        out_channels: number of output maps (1: the z-scored T1w).
        depth: number of resolution levels including the bottleneck (reference: 5).
        base_filters: filters at full resolution, doubled per level (reference: 48, giving
            48, 96, 192, 384, 768).

    Raises:
        ValueError: if any setting is not a positive integer.
    """

    def __init__(
        self,
        in_channels: int = 11,
        out_channels: int = 1,
        depth: int = 5,
        base_filters: int = 48,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("depth", depth),
            ("base_filters", base_filters),
        ):
            _check_positive_int(name, value)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.base_filters = base_filters

        widths = [base_filters * 2**level for level in range(depth)]
        self.stem = ConvBlock3D(in_channels, widths[0])
        self.down = nn.ModuleList(
            DownBlock3D(widths[level - 1], widths[level]) for level in range(1, depth)
        )
        # up[i] produces level depth-2-i, i.e. ordered from the bottleneck towards the output.
        self.up = nn.ModuleList(
            UpBlock3D(widths[level + 1], widths[level], widths[level])
            for level in reversed(range(depth - 1))
        )
        self.head = nn.Conv3d(widths[0], out_channels, kernel_size=3, padding=1)

    @property
    def divisor(self) -> int:
        """Spatial sizes of the input must be multiples of this (``2 ** (depth - 1)``)."""
        return 2 ** (self.depth - 1)

    def config(self) -> dict[str, int]:
        """Constructor arguments, e.g. for storing in a model file."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "depth": self.depth,
            "base_filters": self.base_filters,
        }

    def conv_layers(self) -> list[nn.Conv3d]:
        """All convolutions in data-flow order (the order Keras lists the reference layers)."""
        convs = [self.stem.conv1, self.stem.conv2]
        for block in self.down:
            convs += [block.conv.conv1, block.conv.conv2]
        for block in self.up:
            convs += [block.conv.conv1, block.conv.conv2]
        return [*convs, self.head]

    def check_input_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        """Raise ValueError unless ``shape`` is (N, in_channels, X, Y, Z) with divisible X, Y, Z."""
        if len(shape) != 5:
            raise ValueError(f"expected a 5-D input (N, C, X, Y, Z), got shape {tuple(shape)}")
        if shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels, got {shape[1]} "
                f"(shape {tuple(shape)})"
            )
        bad = [s for s in shape[2:] if s % self.divisor or s == 0]
        if bad:
            raise ValueError(
                f"spatial size {tuple(shape[2:])} is not divisible by {self.divisor} "
                f"(2**(depth-1) for depth {self.depth}); pad the input"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, X, Y, Z) -> (N, out_channels, X, Y, Z).

        X, Y and Z must be positive multiples of ``2 ** (depth - 1)`` (16 for depth 5), else
        ValueError. The output is linear (no activation).
        """
        self.check_input_shape(x.shape)
        skips = []
        x = self.stem(x)
        for block in self.down:
            skips.append(x)
            x = block(x)
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)


def unet3d_num_parameters(
    in_channels: int = 11, out_channels: int = 1, depth: int = 5, base_filters: int = 48
) -> int:
    """Parameter count of :class:`UNet3D` (and of the Keras reference), computed analytically."""

    def conv(cin: int, cout: int) -> int:
        return 27 * cin * cout + cout

    widths = [base_filters * 2**level for level in range(depth)]
    total = conv(in_channels, widths[0]) + conv(widths[0], widths[0])
    for level in range(1, depth):
        total += conv(widths[level - 1], widths[level]) + conv(widths[level], widths[level])
    for level in range(depth - 1):
        total += conv(widths[level] + widths[level + 1], widths[level])
        total += conv(widths[level], widths[level])
    return total + conv(widths[0], out_channels)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


#: Parameters of the reference generator (depth 5, 48 base filters, 11 inputs, 1 output).
REFERENCE_NUM_PARAMETERS = unet3d_num_parameters()
