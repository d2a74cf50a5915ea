"""The DeepAnat network: generator, model files, Keras import and whole-volume inference."""

from .checkpoint import ModelInfo, check_model_inputs, load_model, read_model_info, save_model
from .inference import predict_volume, prepare_input, to_intensity
from .unet import UNet3D

__all__ = [
    "ModelInfo",
    "UNet3D",
    "check_model_inputs",
    "load_model",
    "predict_volume",
    "prepare_input",
    "read_model_info",
    "save_model",
    "to_intensity",
]
