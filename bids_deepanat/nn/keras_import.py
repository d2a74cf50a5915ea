"""Import a DeepAnat generator trained with the reference Keras 2 code into a model file.

Reads both HDF5 flavours Keras 2 writes:

- a full model (``model.save("x.h5")`` or ``ModelCheckpoint``): ``model_config`` describes the
  graph and ``model_weights`` holds the weights;
- weights only (``model.save_weights("x.h5")``): just the weights, listed in layer order.

The convolutions of the U-Net lie on one data-flow path (skips only branch off it), so their
order is fixed by the graph: with ``model_config`` it is taken from a topological sort of the
graph, otherwise from the file's layer order (which Keras writes topologically too). Layer
names are never interpreted. Depth, base width and number of inputs come from the kernel
shapes and are cross-checked against ``model_config`` where present.

Keras stores Conv3D kernels as (kx, ky, kz, in, out) for channels-last inputs (N, X, Y, Z, C);
PyTorch wants (out, in, kx, ky, kz) for (N, C, X, Y, Z).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..dmri import CHANNELS
from ..errors import DeepAnatError, InvalidInputError, MissingInputError, UsageError
from .checkpoint import DEFAULT_NORMALIZATION, ModelInfo, read_model_info, save_model
from .unet import UNet3D

__all__ = ["KerasGenerator", "convert_keras_generator", "import_keras", "main", "read_keras_h5"]

log = logging.getLogger(__name__)


@dataclass
class KerasGenerator:
    """The convolutions of a Keras U-Net in data-flow order, as read from an HDF5 file."""

    kernels: list[np.ndarray]
    biases: list[np.ndarray]
    #: per convolution: True when its input is ``concatenate([upsampled, skip])`` (the reverse
    #: of the reference order), so the kernel's input channels must be swapped.
    swapped_concat: list[bool]
    kind: str  # "full-model" or "weights-only"
    keras_version: str = ""
    backend: str = ""
    loss: str | None = None
    config_input_channels: int | None = None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _inbound_names(node: Any) -> list[str]:
    """Names of the layers feeding one inbound node, for Keras 2 and Keras 3 configs."""
    names: list[str] = []
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}} with keras_history
        stack: list[Any] = [node.get("args", []), node.get("kwargs", {})]
        while stack:
            item = stack.pop(0)
            if isinstance(item, dict):
                config = item.get("config")
                history = config.get("keras_history") if isinstance(config, dict) else None
                if history:
                    names.append(history[0])
                else:
                    stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        return names
    for entry in node:  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
        if isinstance(entry, list) and entry and isinstance(entry[0], str):
            names.append(entry[0])
    return names


def _is_activation(layer: dict[str, Any]) -> bool:
    return layer["class_name"] in ("Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax")


def _is_relu(layer: dict[str, Any]) -> bool:
    cfg = layer["config"]
    if layer["class_name"] == "Activation":
        return cfg.get("activation") == "relu"
    if layer["class_name"] == "ReLU":
        return (
            cfg.get("max_value") is None
            and not cfg.get("negative_slope")
            and not cfg.get("threshold")
        )
    return False


def _graph_conv_order(
    path: Path, config: dict[str, Any]
) -> tuple[list[str], dict[str, bool], int | None]:
    """Conv3D layer names in topological order, concat order per conv, and the input width."""
    if config.get("class_name") not in ("Functional", "Model"):
        raise InvalidInputError(
            f"{path}: model_config describes a {config.get('class_name')!r}, expected a "
            "functional Keras model"
        )
    layers = config["config"]["layers"]
    by_name = {layer["name"]: layer for layer in layers}
    preds: dict[str, list[str]] = {}
    for layer in layers:
        names: list[str] = []
        for node in layer.get("inbound_nodes", []):
            names += _inbound_names(node)
        preds[layer["name"]] = names
    order_index = {layer["name"]: i for i, layer in enumerate(layers)}

    # Kahn's algorithm, ties broken by position in the config: deterministic, name-free.
    indegree = {name: len(set(p)) for name, p in preds.items()}
    succs: dict[str, list[str]] = {name: [] for name in preds}
    for name, p in preds.items():
        for q in set(p):
            if q not in succs:
                raise InvalidInputError(f"{path}: model_config refers to unknown layer {q!r}")
            succs[q].append(name)
    ready = sorted((n for n, d in indegree.items() if d == 0), key=order_index.get)
    topo: list[str] = []
    while ready:
        name = ready.pop(0)
        topo.append(name)
        for s in succs[name]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
        ready.sort(key=order_index.get)
    if len(topo) != len(layers):
        raise InvalidInputError(f"{path}: model_config has a cycle")

    convs = [n for n in topo if by_name[n]["class_name"] == "Conv3D"]
    if not convs:
        raise InvalidInputError(f"{path}: model_config has no Conv3D layers")
    for name in convs:
        cfg = by_name[name]["config"]
        ks = cfg.get("kernel_size")
        if (
            list(ks if isinstance(ks, list) else [ks] * 3) != [3, 3, 3]
            or cfg.get("padding") != "same"
            or list(cfg.get("strides", [1, 1, 1])) != [1, 1, 1]
            or list(cfg.get("dilation_rate", [1, 1, 1])) not in ([1, 1, 1], [1])
            or cfg.get("data_format", "channels_last") != "channels_last"
        ):
            raise InvalidInputError(
                f"{path}: a Conv3D layer is not a 3x3x3 'same' stride-1 channels-last "
                "convolution as in the DeepAnat U-Net"
            )
    for layer in layers:
        cfg = layer["config"]
        if layer["class_name"] in ("MaxPooling3D", "UpSampling3D"):
            size = cfg.get("pool_size", cfg.get("size"))
            if list(size) != [2, 2, 2]:
                raise InvalidInputError(
                    f"{path}: {layer['class_name']} with size {size}; the DeepAnat U-Net uses 2"
                )
        if layer["class_name"] in ("BatchNormalization", "Dropout", "Conv3DTranspose"):
            raise InvalidInputError(
                f"{path}: model_config contains {layer['class_name']}, which the DeepAnat "
                "generator does not have"
            )

    # ReLU after every convolution but the last, which must stay linear.
    for i, name in enumerate(convs):
        inline = by_name[name]["config"].get("activation", "linear")
        after = [by_name[s] for s in succs[name]]
        follows_relu = len(after) == 1 and _is_relu(after[0])
        last = i == len(convs) - 1
        if last and (inline != "linear" or any(_is_activation(a) for a in after)):
            raise InvalidInputError(f"{path}: the output convolution is not linear")
        if not last and not (inline == "relu" or (inline == "linear" and follows_relu)):
            raise InvalidInputError(
                f"{path}: convolution {i + 1} is not followed by a plain ReLU as in the "
                "DeepAnat U-Net"
            )

    # A conv fed by Concatenate([UpSampling3D, skip]) needs its input channels swapped.
    swapped: dict[str, bool] = {}
    for name in convs:
        swapped[name] = False
        feed = preds[name]
        if len(feed) == 1 and by_name[feed[0]]["class_name"] == "Concatenate":
            parts = preds[feed[0]]
            kinds = [by_name[p]["class_name"] for p in parts]
            if len(parts) != 2 or "UpSampling3D" not in kinds:
                raise InvalidInputError(
                    f"{path}: a concatenation feeding a Conv3D does not join a skip connection "
                    "with an upsampled tensor"
                )
            swapped[name] = kinds[0] == "UpSampling3D"

    # The image input is the one feeding the first convolution.
    first = convs[0]
    node = first
    while preds.get(node) and by_name[node]["class_name"] != "InputLayer":
        node = preds[node][0]
    in_channels = None
    if by_name[node]["class_name"] == "InputLayer":
        shape = by_name[node]["config"].get("batch_input_shape") or by_name[node]["config"].get(
            "batch_shape"
        )
        if shape and shape[-1] is not None:
            in_channels = int(shape[-1])
    return convs, swapped, in_channels


def _layer_weights(path: Path, root: Any, layer: str) -> list[np.ndarray]:
    group = root[layer]
    names = [_text(n) for n in group.attrs.get("weight_names", [])]
    try:
        return [np.asarray(group[n]) for n in names]
    except KeyError as exc:
        raise InvalidInputError(
            f"{path}: weights of layer {layer!r} are incomplete ({exc})"
        ) from None


def read_keras_h5(path: str | os.PathLike[str]) -> KerasGenerator:
    """Read the convolution weights of a Keras DeepAnat generator, in data-flow order.

    Raises:
        MissingInputError: ``path`` does not exist.
        InvalidInputError: not an HDF5 Keras file, or not a DeepAnat-style U-Net.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"Keras model file {path} does not exist")
    try:
        fh = h5py.File(path, "r")
    except OSError:
        raise InvalidInputError(f"{path} is not an HDF5 file (truncated or wrong format)") from None
    try:
        with fh:
            return _read_open_h5(path, fh)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        # h5py reports damage inside an otherwise valid file only when a dataset is read.
        raise InvalidInputError(
            f"{path} is not a readable Keras HDF5 file ({type(exc).__name__}: {exc})"
        ) from None


def _read_open_h5(path: Path, fh: Any) -> KerasGenerator:
    attrs = fh.attrs
    config = None
    if "model_config" in attrs:
        try:
            config = json.loads(_text(attrs["model_config"]))
        except json.JSONDecodeError:
            raise InvalidInputError(f"{path}: model_config is not valid JSON") from None
    root = fh["model_weights"] if "model_weights" in fh else fh
    if "layer_names" not in root.attrs:
        raise InvalidInputError(
            f"{path} is not a Keras 2 HDF5 model or weights file (no layer_names)"
        )
    layer_names = [_text(n) for n in root.attrs["layer_names"]]
    weights = {}
    for layer in layer_names:
        if layer in root:
            weights[layer] = _layer_weights(path, root, layer)

    swapped: dict[str, bool] = {}
    config_in = None
    if config is not None:
        order, swapped, config_in = _graph_conv_order(path, config)
        missing = [n for n in order if n not in weights]
        if missing:
            raise InvalidInputError(
                f"{path}: no weights stored for {len(missing)} Conv3D layer(s) of model_config"
            )
    else:
        order = [n for n in layer_names if any(w.ndim == 5 for w in weights.get(n, []))]
    kernels, biases = [], []
    for layer in order:
        ws = weights[layer]
        k = [w for w in ws if w.ndim == 5]
        b = [w for w in ws if w.ndim == 1]
        if len(k) != 1 or len(b) != 1 or len(ws) != 2:
            raise InvalidInputError(
                f"{path}: layer {layer!r} does not hold one 3D kernel and one bias "
                "(nested models and bias-free convolutions are not supported)"
            )
        kernels.append(k[0].astype(np.float32))
        biases.append(b[0].astype(np.float32))
    loss = None
    if "training_config" in attrs:
        try:
            loss = json.loads(_text(attrs["training_config"])).get("loss")
        except (json.JSONDecodeError, AttributeError):
            loss = None
    return KerasGenerator(
        kernels=kernels,
        biases=biases,
        swapped_concat=[swapped.get(n, False) for n in order],
        kind="full-model" if config is not None else "weights-only",
        keras_version=_text(attrs.get("keras_version", root.attrs.get("keras_version", ""))),
        backend=_text(attrs.get("backend", root.attrs.get("backend", ""))),
        loss=loss if isinstance(loss, str) else None,
        config_input_channels=config_in,
    )


def convert_keras_generator(path: str | os.PathLike[str]) -> tuple[UNet3D, KerasGenerator]:
    """Build a :class:`UNet3D` carrying the weights of the Keras generator in ``path``.

    Raises:
        MissingInputError, InvalidInputError: see :func:`read_keras_h5`; also when the weights
            do not form the DeepAnat U-Net.
    """
    path = Path(path)
    src = read_keras_h5(path)
    n = len(src.kernels)
    if n < 3 or (n + 1) % 4:
        raise InvalidInputError(
            f"{path}: {n} convolutions cannot be a DeepAnat U-Net (expected 4*depth-1)"
        )
    first = src.kernels[0].shape
    in_channels, base, out_channels = first[3], first[4], src.kernels[-1].shape[4]
    depth = (n + 1) // 4
    if src.config_input_channels is not None and src.config_input_channels != in_channels:
        raise InvalidInputError(
            f"{path}: model_config declares {src.config_input_channels} input channels but the "
            f"first kernel takes {in_channels}"
        )
    model = UNet3D(in_channels, out_channels, depth, base)
    convs = model.conv_layers()
    for i, (conv, kernel, bias, swap) in enumerate(
        zip(convs, src.kernels, src.biases, src.swapped_concat)
    ):
        want = tuple(conv.weight.shape)
        got = (kernel.shape[4], kernel.shape[3], *kernel.shape[:3])
        if want != got or bias.shape != (want[0],):
            raise InvalidInputError(
                f"{path}: convolution {i + 1} of {n} has kernel {kernel.shape} (Keras layout), "
                f"which does not fit a DeepAnat U-Net of depth {depth} with {base} base filters"
            )
        if swap:
            # Keras joined [upsampled, skip]; ours is [skip, upsampled]: rotate input channels.
            n_up = kernel.shape[3] - conv.out_channels
            kernel = np.concatenate([kernel[..., n_up:, :], kernel[..., :n_up, :]], axis=3)
        weight = np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2))
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weight))
            conv.bias.copy_(torch.from_numpy(bias))
    model.eval()
    log.info(
        "read Keras %s %s: depth %d, %d base filters, %d inputs",
        src.kind, path.name, depth, base, in_channels,
    )
    return model, src


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_keras(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    intensity_scale: tuple[float, float] | None = None,
    name: str | None = None,
    channels: Sequence[str] = CHANNELS,
    eigenvalue_units: str = "mm2/s",
) -> ModelInfo:
    """Convert a Keras 2 DeepAnat generator (``.h5``) into a bids-deepanat model file.

    ``eigenvalue_units`` records the unit of the L1..L3 maps the network was trained on
    ("mm2/s" as FSL's dtifit writes them, or "um2/ms"); the Keras file does not say.

    Returns the :class:`~bids_deepanat.nn.checkpoint.ModelInfo` of the written file.
    """
    if eigenvalue_units not in ("mm2/s", "um2/ms"):
        raise UsageError(f"eigenvalue units must be mm2/s or um2/ms, got {eigenvalue_units!r}")
    in_path, out_path = Path(in_path), Path(out_path)
    model, src = convert_keras_generator(in_path)
    if len(channels) != model.in_channels:
        raise InvalidInputError(
            f"{in_path}: the network takes {model.in_channels} inputs but {len(channels)} "
            f"channel names were given ({', '.join(channels)})"
        )
    training = {
        "source": "keras-import",
        "source_file": in_path.name,
        "source_sha256": _sha256(in_path),
        "source_kind": src.kind,
        "keras_version": src.keras_version,
        "keras_backend": src.backend,
    }
    if src.loss:
        training["keras_loss"] = src.loss
    if intensity_scale is None:
        log.warning(
            "no --intensity-mean/--intensity-std given: %s will store no output intensity scale",
            out_path.name,
        )
    save_model(
        out_path,
        model,
        intensity_scale=intensity_scale,
        training=training,
        name=name or in_path.stem,
        input_channels=channels,
        normalization={
            **DEFAULT_NORMALIZATION,
            "units": {c: eigenvalue_units for c in DEFAULT_NORMALIZATION["physical_units"]},
        },
    )
    return read_model_info(out_path)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit with the BIDS Apps usage code, not 2
        raise UsageError(f"{self.prog}: {message}")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bids-deepanat-import-keras",
        description="Convert a DeepAnat generator saved by Keras 2 (.h5, full model or "
        "weights only) into a bids-deepanat .safetensors model file.",
    )
    parser.add_argument("input", type=Path, help="Keras .h5 file")
    parser.add_argument("output", type=Path, help="model file to write (.safetensors)")
    parser.add_argument("--intensity-mean", type=float, help="mean of the training T1w targets")
    parser.add_argument("--intensity-std", type=float, help="std of the training T1w targets")
    parser.add_argument("--name", help="model name to record (default: input file stem)")
    parser.add_argument(
        "--channels",
        help="comma-separated input channel names in network order "
        f"(default: {','.join(CHANNELS)})",
    )
    parser.add_argument(
        "--eigenvalue-units",
        choices=("mm2/s", "um2/ms"),
        default="mm2/s",
        help="unit of the L1..L3 maps the network was trained on",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    logging.basicConfig(format="%(levelname)s: %(message)s")
    try:
        args = _build_parser().parse_args(argv)
        logging.getLogger("bids_deepanat").setLevel(logging.DEBUG if args.verbose else logging.INFO)
        if (args.intensity_mean is None) != (args.intensity_std is None):
            raise UsageError("give both --intensity-mean and --intensity-std, or neither")
        scale = None
        if args.intensity_mean is not None:
            if not (args.intensity_std > 0 and np.isfinite([args.intensity_mean,
                                                             args.intensity_std]).all()):
                raise UsageError("--intensity-std must be > 0 and both values finite")
            scale = (args.intensity_mean, args.intensity_std)
        channels = CHANNELS if args.channels is None else tuple(
            c.strip() for c in args.channels.split(",") if c.strip()
        )
        info = import_keras(
            args.input, args.output, intensity_scale=scale, name=args.name, channels=channels,
            eigenvalue_units=args.eigenvalue_units,
        )
    except DeepAnatError as exc:
        logging.getLogger("bids_deepanat").error("%s", exc)
        return exc.exit_code
    log.info(
        "wrote %s: %s, %d parameters, sha256 %s",
        args.output, info.architecture, info.num_parameters, info.weights_sha256,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
