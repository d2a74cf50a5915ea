"""The DeepAnat GAN discriminator: a 2D SRGAN-style classifier of T1w slices (SPEC §1).

The reference (Li et al., Medical Image Analysis 2023) judges 2D slices cut along the three axes
of generated and real 3D blocks. Per block of the network: two 3x3 convolutions (stride 1, then
stride 2) without bias, each followed by batch normalization (except the very first
convolution) and LeakyReLU(0.2); the widths double per block (64, 128, 256, 512). A dense layer
of 1024 units with LeakyReLU and a dense layer to one output follow. Spectral normalization is
applied to every convolution and dense layer.

The sigmoid of the reference's last layer is *not* part of :meth:`forward`: the network returns
logits, and training uses ``binary_cross_entropy_with_logits``, which equals sigmoid followed by
binary cross-entropy but does not lose precision when the sigmoid saturates. Use
:meth:`SRGANDiscriminator2D.probability` for the reference's output.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = [
    "PatchDiscriminator2D",
    "SRGANDiscriminator2D",
    "orthogonal_slices",
]


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class SRGANDiscriminator2D(nn.Module):
    """SRGAN-style 2D discriminator with spectral normalization on every layer.

    Args:
        image_size: edge of the square input slices (the training patch size, 64 in the
            reference); must be divisible by ``2 ** n_blocks``.
        in_channels: channels of the slices (1: the z-scored T1w).
        base_filters: filters of the first block, doubled per block (reference: 64).
        n_blocks: number of two-convolution blocks, each halving the resolution (reference: 4).
        dense_features: units of the hidden dense layer (reference: 1024).
        negative_slope: LeakyReLU slope (reference: 0.2).

    Raises:
        ValueError: on non-positive sizes, a negative slope, or an ``image_size`` that the
            blocks cannot halve ``n_blocks`` times.
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 1,
        base_filters: int = 64,
        n_blocks: int = 4,
        dense_features: int = 1024,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        for name, value in (
            ("image_size", image_size),
            ("in_channels", in_channels),
            ("base_filters", base_filters),
            ("n_blocks", n_blocks),
            ("dense_features", dense_features),
        ):
            _check_positive_int(name, value)
        if not 0.0 <= negative_slope < 1.0:
            raise ValueError(f"negative_slope must be in [0, 1), got {negative_slope!r}")
        if image_size % 2**n_blocks:
            raise ValueError(
                f"image_size {image_size} is not divisible by 2**n_blocks = {2**n_blocks}"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.base_filters = base_filters
        self.n_blocks = n_blocks
        self.dense_features = dense_features
        self.negative_slope = negative_slope

        layers: list[nn.Module] = []
        channels = in_channels
        for block in range(n_blocks):
            width = base_filters * 2**block
            for stride in (1, 2):
                layers.append(
                    spectral_norm(
                        nn.Conv2d(channels, width, kernel_size=3, stride=stride, padding=1,
                                  bias=False)
                    )
                )
                # The reference leaves the very first convolution without batch norm.
                if block > 0 or stride == 2:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.LeakyReLU(negative_slope))
                channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2**n_blocks
        self.classifier = nn.Sequential(
            nn.Flatten(),
            spectral_norm(nn.Linear(channels * side * side, dense_features)),
            nn.LeakyReLU(negative_slope),
            spectral_norm(nn.Linear(dense_features, 1)),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Reference: convolutions drawn from N(0, 0.02); Keras defaults for the rest.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.parametrizations.weight.original, 0.0, 0.02)

    def config(self) -> dict[str, int | float]:
        """Constructor arguments, e.g. for storing in a checkpoint."""
        return {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "base_filters": self.base_filters,
            "n_blocks": self.n_blocks,
            "dense_features": self.dense_features,
            "negative_slope": self.negative_slope,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, in_channels, S, S) slices -> (M, 1) logits ("real" > 0); S == image_size."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (
            self.image_size,
            self.image_size,
        ):
            raise ValueError(
                f"expected input (M, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        return self.classifier(self.features(x))

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """(M, in_channels, S, S) -> (M, 1) probability of "real" (the reference's sigmoid)."""
        return torch.sigmoid(self(x))


#: Alias: the discriminator judges whole 2D slices of a patch.
PatchDiscriminator2D = SRGANDiscriminator2D


def orthogonal_slices(
    blocks: torch.Tensor, positions: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """Cut 2D slices along the three axes of cubic 3D blocks.

    Args:
        blocks: (N, C, P, P, P) blocks in RAS voxel order (axis 2 = x, 3 = y, 4 = z).
        positions: slice indices to take along every axis (K of them); ``None`` for all P.

    Returns:
        (N * 3 * K, C, P, P) slices, ordered by block, then orientation (sagittal: fixed x,
        in-plane (y, z); coronal: fixed y, (x, z); axial: fixed z, (x, y)), then position.
        Slice ``i`` belongs to block ``i // (3 * K)``.

    Raises:
        ValueError: if the blocks are not 5-D and cubic, or a position is out of range.
    """
    if blocks.ndim != 5 or not blocks.shape[2] == blocks.shape[3] == blocks.shape[4]:
        raise ValueError(f"expected cubic blocks (N, C, P, P, P), got {tuple(blocks.shape)}")
    n, c, p = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    if positions is None:
        index = torch.arange(p, device=blocks.device)
    else:
        index = torch.as_tensor(positions, dtype=torch.long, device=blocks.device)
        if index.ndim != 1 or index.numel() == 0 or index.min() < 0 or index.max() >= p:
            raise ValueError(f"slice positions must be a non-empty list in [0, {p}), got "
                             f"{index.tolist()}")
    k = index.numel()
    sagittal = blocks.index_select(2, index).permute(0, 2, 1, 3, 4)  # (N, K, C, y, z)
    coronal = blocks.index_select(3, index).permute(0, 3, 1, 2, 4)  # (N, K, C, x, z)
    axial = blocks.index_select(4, index).permute(0, 4, 1, 2, 3)  # (N, K, C, x, y)
    stacked = torch.stack([sagittal, coronal, axial], dim=1)  # (N, 3, K, C, P, P)
    return stacked.reshape(n * 3 * k, c, p, p)
