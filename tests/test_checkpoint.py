"""Model files (bids_deepanat.nn.checkpoint)."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from bids_deepanat import __version__
from bids_deepanat.dmri import CHANNELS
from bids_deepanat.errors import InvalidInputError, MissingInputError
from bids_deepanat.nn import checkpoint
from bids_deepanat.nn.checkpoint import (
    FORMAT_NAME,
    check_model_inputs,
    load_model,
    read_model_info,
    save_model,
    weights_sha256,
)
from bids_deepanat.nn.unet import UNet3D

TRAINING = {"epochs": 3, "loss": "l1", "subjects": ["sub-01"]}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UNet3D(11, 1, depth=2, base_filters=4).eval()


@pytest.fixture
def model_file(tmp_path, model):
    return save_model(
        tmp_path / "model.safetensors", model, intensity_scale=(412.5, 97.25),
        training=TRAINING, name="tiny",
    )


def _rewrite(path, *, drop=(), **changes):
    """Rewrite a model file's metadata (tensors untouched)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(path))
    for key in drop:
        meta.pop(key)
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def _one_line_naming(exc_info, path):
    message = str(exc_info.value)
    assert "\n" not in message
    assert str(path) in message


def test_round_trip_bit_identical(model, model_file):
    x = torch.randn(1, 11, 8, 12, 4)
    with torch.inference_mode():
        before = model(x)
    loaded, info = load_model(model_file)
    assert not loaded.training
    with torch.inference_mode():
        after = loaded(x)
    assert torch.equal(before, after)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])

    assert info.name == "tiny"
    assert info.architecture == "UNet3D"
    assert info.architecture_args == {
        "in_channels": 11, "out_channels": 1, "depth": 2, "base_filters": 4,
    }
    assert info.input_channels == CHANNELS
    assert info.intensity_scale == (412.5, 97.25)
    assert info.training == TRAINING
    assert info.software_version == __version__
    assert info.normalization["physical_units"] == ["L1", "L2", "L3"]
    assert set(info.normalization["zscore_within_mask"]) == set(CHANNELS) - {"L1", "L2", "L3"}
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert info.weights_sha256 == weights_sha256(model.state_dict())


def test_read_info_does_not_load_weights(model_file, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(checkpoint, "st_load_file", no_weights)
    info = read_model_info(model_file)
    assert info.name == "tiny"
    assert info.intensity_mean == 412.5


def test_loading_never_unpickles(model_file, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded, info = load_model(model_file)
    assert info.name == "tiny"


def test_atomic_overwrite(tmp_path, model, model_file):
    other = UNet3D(11, 1, depth=2, base_filters=4)
    save_model(model_file, other, intensity_scale=None, training={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    info = read_model_info(model_file)
    assert info.intensity_scale is None
    assert info.weights_sha256 == weights_sha256(other.state_dict())


def test_sha_is_canonical(model):
    """The checksum depends on tensor content, not on dict order or memory layout."""
    sd = model.state_dict()
    reordered = {k: sd[k].clone() for k in reversed(list(sd))}
    assert weights_sha256(reordered) == weights_sha256(sd)
    changed = dict(sd)
    changed["head.bias"] = sd["head.bias"] + 1e-6
    assert weights_sha256(changed) != weights_sha256(sd)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(MissingInputError, match="does not exist") as exc:
        load_model(path)
    assert exc.value.exit_code == 66
    with pytest.raises(MissingInputError):
        read_model_info(path)


def test_flipped_weight_bytes(model_file):
    data = bytearray(model_file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    offset = 8 + header_len + 100  # inside the tensor data
    data[offset : offset + 4] = bytes(b ^ 0xFF for b in data[offset : offset + 4])
    model_file.write_bytes(bytes(data))
    read_model_info(model_file)  # the header is still fine
    with pytest.raises(InvalidInputError, match="is corrupt: weights sha256") as exc:
        load_model(model_file)
    assert exc.value.exit_code == 65
    _one_line_naming(exc, model_file)


@pytest.mark.parametrize(("keep", "message"), [
    (-50, "is truncated"),  # tensor data cut short
    (200, "is truncated \\(header incomplete\\)"),
    (5, "not a safetensors file \\(too short\\)"),
])
def test_truncated(model_file, keep, message):
    data = model_file.read_bytes()
    model_file.write_bytes(data[:keep])
    with pytest.raises(InvalidInputError, match=message) as exc:
        load_model(model_file)
    _one_line_naming(exc, model_file)
    with pytest.raises(InvalidInputError, match=message):
        read_model_info(model_file)


def test_not_a_model(tmp_path):
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    json_file = tmp_path / "model.json"
    json_file.write_text(json.dumps({"format": FORMAT_NAME, "weights": [1, 2, 3]}))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(3)}, str(bare))

    for path in (random_bytes, json_file):
        with pytest.raises(InvalidInputError, match="not a safetensors file") as exc:
            load_model(path)
        _one_line_naming(exc, path)
    for path in (foreign, bare):
        with pytest.raises(InvalidInputError, match="is not a bids-deepanat model") as exc:
            load_model(path)
        _one_line_naming(exc, path)


def test_missing_metadata(model_file):
    _rewrite(model_file, drop=("intensity_scale", "weights_sha256"))
    with pytest.raises(InvalidInputError, match="lacks metadata: intensity_scale, weights_sha256"):
        load_model(model_file)


def test_wrong_format_version(model_file):
    _rewrite(model_file, format_version="2")
    with pytest.raises(InvalidInputError, match="has format version '2'"):
        read_model_info(model_file)


def test_bad_json_metadata(model_file):
    _rewrite(model_file, architecture_args="{not json")
    with pytest.raises(InvalidInputError, match="'architecture_args' is not valid JSON"):
        read_model_info(model_file)


def test_unknown_architecture(model_file):
    _rewrite(model_file, architecture="ResNet")
    with pytest.raises(InvalidInputError, match="unknown architecture 'ResNet'"):
        load_model(model_file)


def test_tensors_do_not_match_architecture(model_file):
    _rewrite(model_file, architecture_args=json.dumps(
        {"in_channels": 11, "out_channels": 1, "depth": 2, "base_filters": 8}
    ))
    with pytest.raises(InvalidInputError, match="do not match architecture UNet3D") as exc:
        load_model(model_file)
    assert "wrong shape" in str(exc.value)
    _one_line_naming(exc, model_file)

    _rewrite(model_file, architecture_args=json.dumps(
        {"in_channels": 11, "out_channels": 1, "depth": 3, "base_filters": 4}
    ))
    with pytest.raises(InvalidInputError, match="missing: "):
        load_model(model_file)


def test_channel_names_vs_architecture(model_file):
    _rewrite(model_file, input_channels=json.dumps(list(CHANNELS[:10])))
    with pytest.raises(InvalidInputError, match="names 10 input channels"):
        load_model(model_file)


def test_check_model_inputs(model_file):
    info = read_model_info(model_file)
    check_model_inputs(info, list(CHANNELS))
    with pytest.raises(InvalidInputError, match="different order") as exc:
        check_model_inputs(info, list(reversed(CHANNELS)))
    _one_line_naming(exc, model_file)
    with pytest.raises(InvalidInputError, match=r"missing \['dwi6'\], unexpected \['fa'\]"):
        check_model_inputs(info, [*CHANNELS[:10], "fa"])


def test_save_rejects_inconsistent_arguments(tmp_path, model):
    with pytest.raises(ValueError, match="10 input channel names"):
        save_model(tmp_path / "m.safetensors", model, intensity_scale=None,
                   input_channels=CHANNELS[:10])
    with pytest.raises(ValueError, match="std > 0"):
        save_model(tmp_path / "m.safetensors", model, intensity_scale=(1.0, 0.0))
    with pytest.raises(ValueError, match="not a registered architecture"):
        save_model(tmp_path / "m.safetensors", torch.nn.Linear(2, 2), intensity_scale=None)
    assert not list(tmp_path.iterdir())
