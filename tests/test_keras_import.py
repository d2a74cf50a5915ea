"""Keras import (bids_deepanat.nn.keras_import) against outputs of Keras itself.

The fixtures in ``tests/fixtures/keras/`` come from ``tests/fixtures/make_keras_fixtures.py``
(TensorFlow 2.16 / tf-keras 2.16, not needed to run these tests): the reference DeepAnat U-Net
at depth 3 with 4 base filters and 11 inputs, saved as a full model and as weights only, with
Keras' predictions for two random inputs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from bids_deepanat.dmri import CHANNELS
from bids_deepanat.errors import InvalidInputError, MissingInputError
from bids_deepanat.nn.checkpoint import load_model, read_model_info
from bids_deepanat.nn.keras_import import convert_keras_generator, import_keras, main

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
FULL = FIXTURES / "unet_d3_f4_full.h5"
WEIGHTS = FIXTURES / "unet_d3_f4_weights.h5"
IO = FIXTURES / "unet_d3_f4_io.npz"


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _predict(model, x_channels_last):
    x = torch.from_numpy(x_channels_last).permute(0, 4, 1, 2, 3)
    with torch.inference_mode():
        return model(x).permute(0, 2, 3, 4, 1).numpy()


def _assert_matches_keras(model):
    io = np.load(IO)
    for i in range(2):
        x, expected = io[f"x{i}"], io[f"y{i}"]
        got = _predict(model, x)
        assert got.shape == expected.shape
        # relative to the output range; measured 1.4e-6 with TF 2.16 / torch 2.13 on CPU
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("path", [FULL, WEIGHTS], ids=["full-model", "weights-only"])
def test_converted_model_matches_keras(path):
    model, src = convert_keras_generator(path)
    assert src.kind == ("full-model" if path == FULL else "weights-only")
    assert model.config() == {"in_channels": 11, "out_channels": 1, "depth": 3,
                              "base_filters": 4}
    _assert_matches_keras(model)


def test_import_writes_model_file(tmp_path):
    out = tmp_path / "deepanat.safetensors"
    info = import_keras(FULL, out, intensity_scale=(300.0, 80.0), name="fixture")
    assert info.intensity_scale == (300.0, 80.0)
    assert info.input_channels == CHANNELS
    assert info.training["source"] == "keras-import"
    assert info.training["source_file"] == FULL.name  # no directories recorded
    assert info.training["keras_loss"] == "mean_absolute_error_weighted"
    assert info.normalization["units"] == {"L1": "mm2/s", "L2": "mm2/s", "L3": "mm2/s"}
    model, _ = load_model(out)
    _assert_matches_keras(model)


def test_console_script_main(tmp_path, caplog):
    out = tmp_path / "w.safetensors"
    rc = main([str(WEIGHTS), str(out), "--intensity-mean", "1.5", "--intensity-std", "2",
               "--name", "weights-only", "--eigenvalue-units", "um2/ms"])
    assert rc == 0
    info = read_model_info(out)
    assert (info.name, info.intensity_scale) == ("weights-only", (1.5, 2.0))
    assert info.training["source_kind"] == "weights-only"
    assert info.normalization["units"]["L2"] == "um2/ms"
    _assert_matches_keras(load_model(out)[0])


@pytest.mark.integration
def test_console_script_subprocess(tmp_path):
    out = tmp_path / "m.safetensors"
    exe = shutil.which("bids-deepanat-import-keras")
    cmd = [exe] if exe else [sys.executable, "-m", "bids_deepanat.nn.keras_import"]
    done = subprocess.run([*cmd, str(FULL), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "no --intensity-mean" in done.stderr  # warned: scale not recorded
    assert read_model_info(out).intensity_scale is None


def test_cli_errors(tmp_path):
    out = tmp_path / "m.safetensors"
    assert main([str(tmp_path / "absent.h5"), str(out)]) == MissingInputError.exit_code
    assert main([str(FULL), str(out), "--intensity-mean", "3"]) == 64
    assert main([str(FULL), str(out), "--intensity-mean", "3", "--intensity-std", "0"]) == 64
    assert main([str(FULL)]) == 64
    assert main([str(FULL), str(out), "--eigenvalue-units", "s/mm2"]) == 64
    assert main([str(FULL), str(out), "--channels", "a,b"]) == InvalidInputError.exit_code
    not_h5 = tmp_path / "x.h5"
    not_h5.write_bytes(b"\x89HDF\r\n" + bytes(100))
    assert main([str(not_h5), str(out)]) == InvalidInputError.exit_code
    assert not out.exists()


def test_layer_names_do_not_matter(tmp_path):
    """Renaming every layer (weights file) keeps the data-flow order, hence the import."""
    renamed = tmp_path / "renamed.h5"
    with h5py.File(WEIGHTS, "r") as src, h5py.File(renamed, "w") as dst:
        names = [_text(n) for n in src.attrs["layer_names"]]
        # Names that sort in the reverse of the true order.
        new = {n: f"layer_{len(names) - i:03d}" for i, n in enumerate(names)}
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        dst.attrs["layer_names"] = np.array([new[n].encode() for n in names])
        for n in names:
            group = dst.create_group(new[n])
            weight_names = []
            for w in src[n].attrs["weight_names"]:
                w = _text(w)
                wname = new[n] + "/" + w.split("/")[-1]
                group[wname] = src[n][w][()]
                weight_names.append(wname.encode())
            group.attrs["weight_names"] = np.array(weight_names)
    model, _ = convert_keras_generator(renamed)
    _assert_matches_keras(model)


def test_graph_order_not_file_order(tmp_path):
    """With model_config, the conv order comes from the graph, not from config list order,
    and a reversed concatenation ([upsampled, skip]) is handled by swapping input channels."""
    copy = tmp_path / "shuffled.h5"
    shutil.copy(FULL, copy)
    with h5py.File(copy, "r+") as fh:
        config = json.loads(fh.attrs["model_config"])
        layers = config["config"]["layers"]
        config["config"]["layers"] = layers[:1] + layers[1:][::-1]
        fh.attrs["model_config"] = json.dumps(config)
    _assert_matches_keras(convert_keras_generator(copy)[0])

    # Swap the inputs of the first decoder concatenation and permute the kernel to match:
    # the function is unchanged, so the import must still reproduce Keras.
    swapped = tmp_path / "swapped.h5"
    shutil.copy(FULL, swapped)
    with h5py.File(swapped, "r+") as fh:
        config = json.loads(fh.attrs["model_config"])
        by_name = {layer["name"]: layer for layer in config["config"]["layers"]}
        concat = next(
            layer for layer in config["config"]["layers"]
            if layer["class_name"] == "Concatenate"
            and any(by_name[n[0]]["class_name"] == "UpSampling3D"
                    for n in layer["inbound_nodes"][0])
        )
        skip, up = concat["inbound_nodes"][0]
        concat["inbound_nodes"][0] = [up, skip]
        conv = next(
            layer for layer in config["config"]["layers"]
            if layer["class_name"] == "Conv3D"
            and layer["inbound_nodes"][0][0][0] == concat["name"]
        )
        fh.attrs["model_config"] = json.dumps(config)
        group = fh["model_weights"][conv["name"]]
        kname = next(n for n in map(_text, group.attrs["weight_names"]) if "kernel" in n)
        kernel = group[kname][()]
        n_skip = kernel.shape[4]  # skip width equals the conv's output width
        group[kname][()] = np.concatenate([kernel[..., n_skip:, :], kernel[..., :n_skip, :]], 3)
    model, src = convert_keras_generator(swapped)
    assert sum(src.swapped_concat) == 1
    _assert_matches_keras(model)


def test_not_a_unet(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(WEIGHTS, "r") as src, h5py.File(bad, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        names = [_text(n) for n in src.attrs["layer_names"]]
        for n in names:
            src.copy(src[n], dst, name=n)
        # Drop the last conv layer: 10 convolutions cannot be a U-Net.
        convs = [n for n in names if len(dst[n].attrs["weight_names"]) == 2]
        dst.attrs["layer_names"] = np.array([n.encode() for n in names if n != convs[-1]])
    with pytest.raises(InvalidInputError, match="10 convolutions cannot be a DeepAnat U-Net"):
        convert_keras_generator(bad)


def _edit_config(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as fh:
        config = json.loads(fh.attrs["model_config"])
        edit(config["config"]["layers"])
        fh.attrs["model_config"] = json.dumps(config)


def test_rejects_other_activations_and_layers(tmp_path):
    def elu(layers):
        act = next(la for la in layers if la["class_name"] == "Activation")
        act["config"]["activation"] = "elu"

    def batchnorm(layers):
        layers.append({"class_name": "BatchNormalization", "name": "bn", "config": {},
                       "inbound_nodes": []})

    def linear_out(layers):
        convs = [la for la in layers if la["class_name"] == "Conv3D"]
        convs[-1]["config"]["activation"] = "sigmoid"

    for edit, message in [
        (elu, "convolution 1 is not followed by a plain ReLU"),
        (batchnorm, "contains BatchNormalization"),
        (linear_out, "output convolution is not linear"),
    ]:
        path = tmp_path / f"{edit.__name__}.h5"
        _edit_config(FULL, path, edit)
        with pytest.raises(InvalidInputError, match=message) as exc:
            convert_keras_generator(path)
        assert str(path) in str(exc.value)


def test_truncated_h5(tmp_path):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(FULL.read_bytes()[:5000])
    with pytest.raises(InvalidInputError, match="not an HDF5 file|incomplete|not a Keras"):
        convert_keras_generator(cut)
