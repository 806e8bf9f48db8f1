"""Checkpoint conversion into and out of hf_clip: OpenAI (TorchScript or state dict), open_clip, transformers."""

from .api import convert_checkpoint, load_hf_clip_state_dict
from .infer import detect_layout, infer_openai_config, infer_transformers_config
from .loading import load_state_dict_file
from .rules import ConversionError
from .torchscript import UnsafeCheckpointError, is_torchscript_archive, read_torchscript_state_dict

__all__ = [
    "ConversionError",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "detect_layout",
    "infer_openai_config",
    "infer_transformers_config",
    "is_torchscript_archive",
    "load_hf_clip_state_dict",
    "load_state_dict_file",
    "read_torchscript_state_dict",
]
