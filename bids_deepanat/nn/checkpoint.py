"""Model files: one ``.safetensors`` file holding the generator weights and everything needed to
use them (SPEC §6).

The safetensors header carries string metadata:

======================  ===================================================================
key                     value
======================  ===================================================================
``format``              ``"bids-deepanat-model"``
``format_version``      ``"1"``
``name``                free-text model name
``architecture``        ``"UNet3D"``
``architecture_args``   JSON object of constructor arguments
``input_channels``      JSON list of input channel names, in network order
``normalization``       JSON object: channels z-scored within the brain mask, channels left in
                        physical units, value outside the mask
``intensity_scale``     JSON ``{"mean": m, "std": s}`` of the training targets, or ``null``
``training``            JSON object summarizing training (or the import)
``software_version``    version of bids-deepanat that wrote the file
``weights_sha256``      sha256 over the canonical serialization of the tensors (see
                        :func:`weights_sha256`), checked on load
======================  ===================================================================

Loading never unpickles: the header is JSON and the tensors are raw little-endian buffers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torch import nn

from .. import __version__
from ..dmri import CHANNELS
from ..errors import InvalidInputError, MissingInputError
from .unet import UNet3D

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_NORMALIZATION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ModelInfo",
    "build_model",
    "check_model_inputs",
    "load_model",
    "read_model_info",
    "save_model",
    "weights_sha256",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "bids-deepanat-model"
FORMAT_VERSION = 1

#: Architectures a model file may declare, by the name stored in the file.
ARCHITECTURES: dict[str, type[nn.Module]] = {"UNet3D": UNet3D}

#: The DeepAnat input normalization (SPEC §1): diffusion-weighted signals are z-scored with the
#: mean and standard deviation inside the brain mask; DTI eigenvalues stay in physical units
#: (``units``: µm²/ms as bids_deepanat.dmri writes them, or mm²/s for a network trained on
#: FSL-style maps); everything outside the mask is 0.
DEFAULT_NORMALIZATION: dict[str, Any] = {
    "zscore_within_mask": ["meanb0", "meandwi", "dwi1", "dwi2", "dwi3", "dwi4", "dwi5", "dwi6"],
    "physical_units": ["L1", "L2", "L3"],
    "units": {"L1": "um2/ms", "L2": "um2/ms", "L3": "um2/ms"},
    "std_ddof": 0,
    "outside_mask": 0.0,
}

# A header larger than this is not one we wrote; refuse instead of allocating it.
_MAX_HEADER_BYTES = 64 * 1024 * 1024
_REQUIRED_KEYS = (
    "format",
    "format_version",
    "name",
    "architecture",
    "architecture_args",
    "input_channels",
    "normalization",
    "intensity_scale",
    "training",
    "software_version",
    "weights_sha256",
)
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class ModelInfo:
    """Everything in a model file except the weights."""

    path: str
    name: str
    format_version: int
    architecture: str
    architecture_args: dict[str, Any]
    input_channels: tuple[str, ...]
    normalization: dict[str, Any]
    intensity_mean: float | None
    intensity_std: float | None
    training: dict[str, Any]
    software_version: str
    weights_sha256: str
    num_parameters: int
    tensor_shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)

    @property
    def intensity_scale(self) -> tuple[float, float] | None:
        if self.intensity_mean is None or self.intensity_std is None:
            return None
        return (self.intensity_mean, self.intensity_std)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a canonical serialization of ``tensors``, independent of the file layout.

    For each tensor in sorted name order the hash takes: the UTF-8 name, the dtype name and
    the shape (each as a length-prefixed string) followed by the raw little-endian data.
    """
    digest = hashlib.sha256()

    def put(text: str) -> None:
        raw = text.encode("utf-8")
        digest.update(struct.pack("<Q", len(raw)))
        digest.update(raw)

    for name in sorted(tensors):
        tensor = tensors[name]
        put(name)
        put(str(tensor.dtype).removeprefix("torch."))
        put(json.dumps(list(tensor.shape)))
        data = _tensor_bytes(tensor)
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


def build_model(architecture: str, args: Mapping[str, Any]) -> nn.Module:
    """Instantiate a registered architecture; ValueError on an unknown name or bad arguments."""
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})"
        ) from None
    try:
        return cls(**dict(args))
    except TypeError as exc:  # unexpected keyword: turn into the documented ValueError
        raise ValueError(f"invalid arguments for {architecture}: {exc}") from None


def _architecture_name(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"cannot save a {type(model).__name__}: not a registered architecture")


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    intensity_scale: tuple[float, float] | None,
    training: Mapping[str, Any] | None = None,
    name: str = "deepanat",
    input_channels: Sequence[str] = CHANNELS,
    normalization: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its metadata to ``path`` (atomically: temporary file + rename).

    Args:
        path: destination ``.safetensors`` file.
        model: a registered architecture (:data:`ARCHITECTURES`) with a ``config()`` method.
        intensity_scale: (mean, std) of the training targets, used to map z-scored predictions
            back to intensities; ``None`` when unknown (e.g. an imported model without it).
        training: JSON-serializable summary of how the weights were obtained.
        name: model name stored in the file.
        input_channels: input channel names in network order; must match ``in_channels``.
        normalization: input normalization rules; defaults to :data:`DEFAULT_NORMALIZATION`.

    Returns:
        The path written.

    Raises:
        ValueError: on inconsistent arguments (the caller's bug, not user input).
    """
    path = Path(path)
    architecture = _architecture_name(model)
    args = model.config()
    channels = [str(c) for c in input_channels]
    if len(channels) != args.get("in_channels", len(channels)):
        raise ValueError(
            f"{len(channels)} input channel names for a model with {args['in_channels']} inputs"
        )
    if len(set(channels)) != len(channels):
        raise ValueError(f"duplicate input channel names: {channels}")
    if intensity_scale is None:
        scale = None
    else:
        mean, std = (float(v) for v in intensity_scale)
        if not (std > 0 and abs(mean) < float("inf") and std < float("inf")):
            raise ValueError(f"intensity_scale needs a finite mean and std > 0, got {mean}, {std}")
        scale = {"mean": mean, "std": std}

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "name": str(name),
        "architecture": architecture,
        "architecture_args": json.dumps(args, sort_keys=True),
        "input_channels": json.dumps(channels),
        "normalization": json.dumps(
            dict(DEFAULT_NORMALIZATION if normalization is None else normalization),
            sort_keys=True,
        ),
        "intensity_scale": json.dumps(scale),
        "training": json.dumps(dict(training or {}), sort_keys=True, allow_nan=False),
        "software_version": __version__,
        "weights_sha256": weights_sha256(tensors),
    }
    data = st_save(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote model %s (%s, sha256 %s)", path.name, architecture,
             metadata["weights_sha256"][:12])
    return path


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate the safetensors header; return it and the size of the data section."""
    if not path.is_file():
        raise MissingInputError(f"model file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise InvalidInputError(f"model file {path} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len < 2 or header_len > _MAX_HEADER_BYTES:
            raise InvalidInputError(
                f"model file {path} is not a safetensors file (implausible header length)"
            )
        if 8 + header_len > size:
            raise InvalidInputError(f"model file {path} is truncated (header incomplete)")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInputError(
            f"model file {path} is not a safetensors file (header is not JSON)"
        ) from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"model file {path} is not a safetensors file (bad header)")
    data_len = size - 8 - header_len
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            shape = [int(s) for s in entry["shape"]]
            itemsize = _DTYPE_SIZES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise InvalidInputError(
                f"model file {path} is not a valid safetensors file (bad entry for {key!r})"
            ) from None
        numel = 1
        for s in shape:
            numel *= s
        if begin < 0 or stop - begin != numel * itemsize:
            raise InvalidInputError(
                f"model file {path} is not a valid safetensors file (bad offsets for {key!r})"
            )
        end = max(end, stop)
    if end > data_len:
        raise InvalidInputError(
            f"model file {path} is truncated ({data_len} of {end} bytes of tensor data)"
        )
    return header, data_len


def _json_field(
    path: Path, meta: Mapping[str, str], key: str, kind: type | tuple[type, ...]
) -> Any:
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError:
        raise InvalidInputError(f"model file {path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise InvalidInputError(
            f"model file {path}: metadata {key!r} has the wrong JSON type"
        )
    return value


def _info_from_header(path: Path, header: Mapping[str, Any]) -> ModelInfo:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise InvalidInputError(
            f"model file {path} is not a bids-deepanat model (no {FORMAT_NAME!r} metadata)"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise InvalidInputError(
            f"model file {path} lacks metadata: {', '.join(missing)}"
        )
    try:
        version = int(meta["format_version"])
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise InvalidInputError(
            f"model file {path} has format version {meta['format_version']!r}; "
            f"this bids-deepanat ({__version__}) reads version {FORMAT_VERSION}"
        )
    args = _json_field(path, meta, "architecture_args", dict)
    channels = _json_field(path, meta, "input_channels", list)
    if not all(isinstance(c, str) for c in channels):
        raise InvalidInputError(f"model file {path}: input_channels must be strings")
    normalization = _json_field(path, meta, "normalization", dict)
    training = _json_field(path, meta, "training", dict)
    scale = _json_field(path, meta, "intensity_scale", (dict, type(None)))
    if scale is not None:
        try:
            mean, std = float(scale["mean"]), float(scale["std"])
        except (KeyError, TypeError, ValueError):
            raise InvalidInputError(
                f"model file {path}: intensity_scale must be {{'mean': m, 'std': s}} or null"
            ) from None
    else:
        mean = std = None
    shapes = {
        k: tuple(int(s) for s in v["shape"]) for k, v in header.items() if k != "__metadata__"
    }
    num_parameters = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        num_parameters += n
    return ModelInfo(
        path=str(path),
        name=meta["name"],
        format_version=version,
        architecture=meta["architecture"],
        architecture_args=args,
        input_channels=tuple(channels),
        normalization=normalization,
        intensity_mean=mean,
        intensity_std=std,
        training=training,
        software_version=meta["software_version"],
        weights_sha256=meta["weights_sha256"],
        num_parameters=num_parameters,
        tensor_shapes=shapes,
    )


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Read the metadata of a model file without loading its weights.

    Raises:
        MissingInputError: the file does not exist.
        InvalidInputError: the file is not a complete bids-deepanat model file.
    """
    path = Path(path)
    header, _ = _read_header(path)
    return _info_from_header(path, header)


def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelInfo]:
    """Load a model file; return the network (in ``eval()`` mode, on ``device``) and its info.

    The weights are checked against the sha256 stored in the file and against the declared
    architecture before they are used.

    Raises:
        MissingInputError: the file does not exist.
        InvalidInputError: truncated or foreign file, missing or wrong metadata, checksum
            mismatch, or tensors that do not fit the declared architecture.
    """
    path = Path(path)
    header, _ = _read_header(path)
    info = _info_from_header(path, header)
    try:
        model = build_model(info.architecture, info.architecture_args)
    except ValueError as exc:
        raise InvalidInputError(f"model file {path}: {exc}") from None
    if "in_channels" in info.architecture_args and (
        len(info.input_channels) != info.architecture_args["in_channels"]
    ):
        raise InvalidInputError(
            f"model file {path} names {len(info.input_channels)} input channels but its "
            f"architecture takes {info.architecture_args['in_channels']}"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != info.tensor_shapes:
        missing = sorted(set(expected) - set(info.tensor_shapes))
        extra = sorted(set(info.tensor_shapes) - set(expected))
        common = set(expected) & set(info.tensor_shapes)
        wrong = sorted(k for k in common if expected[k] != info.tensor_shapes[k])
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
            if keys
        )
        raise InvalidInputError(
            f"model file {path}: tensors do not match architecture {info.architecture} "
            f"{json.dumps(info.architecture_args, sort_keys=True)} ({detail})"
        )
    try:
        tensors = st_load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for malformed buffers
        raise InvalidInputError(f"model file {path} cannot be read: {exc}") from None
    digest = weights_sha256(tensors)
    if digest != info.weights_sha256:
        raise InvalidInputError(
            f"model file {path} is corrupt: weights sha256 {digest[:12]}... does not match "
            f"the recorded {info.weights_sha256[:12]}..."
        )
    model.load_state_dict(tensors, strict=True)
    model.to(device)
    model.eval()
    log.debug("loaded model %s from %s", info.name, path.name)
    return model, info


def check_model_inputs(info: ModelInfo, channel_names: Sequence[str]) -> None:
    """Raise InvalidInputError unless the model takes exactly ``channel_names`` in this order."""
    given = tuple(channel_names)
    if given == info.input_channels:
        return
    if sorted(given) == sorted(info.input_channels):
        problem = "in a different order"
    else:
        problem = f"missing {sorted(set(info.input_channels) - set(given))}, " \
                  f"unexpected {sorted(set(given) - set(info.input_channels))}"
    raise InvalidInputError(
        f"model file {info.path} expects input channels {list(info.input_channels)}, "
        f"got {list(given)} ({problem})"
    )
