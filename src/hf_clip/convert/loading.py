"""Load a checkpoint file of any supported kind into a flat state dict, never unpickling arbitrary objects.

Supported: ``.safetensors``; TorchScript archives (OpenAI's released ``.pt``), read by the restricted reader in
``torchscript.py``; and plain ``torch.save`` state dicts (``.pt``/``.bin``/``.pth``), read with
``torch.load(weights_only=True)``. Training checkpoints that wrap the weights (``{"state_dict": ...}``, as
open_clip writes them) and DistributedDataParallel ``module.`` prefixes are unwrapped.
"""

from __future__ import annotations

import pickle
import re
from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import load_file

from .torchscript import is_torchscript_archive, read_torchscript_state_dict

__all__ = ["load_state_dict_file"]

_WRAPPER_KEYS = ("state_dict", "model", "module")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict):
        wrapped = [key for key in _WRAPPER_KEYS if isinstance(obj.get(key), dict)]
        if wrapped and not any(isinstance(value, torch.Tensor) for value in obj.values()):
            obj = obj[wrapped[0]]
            continue
        break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    not_tensors = sorted(key for key, value in obj.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path}: entries {not_tensors[:10]} are not tensors; expected a flat state dict.")
    return _without_wrapper_prefixes(dict(obj))


def _without_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DistributedDataParallel's "module." and torch.compile's "_orig_mod." (in either order)."""
    for prefix in ("module.", "_orig_mod.", "module."):
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _is_safetensors(path: Path) -> bool:
    """safetensors files open with an 8-byte header length followed by a JSON header."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


_ADVICE = (
    "Weights only load failed",
    "weights_only",
    "trusted source",
    "Alternatively",
    "Check the documentation",
)


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """What the unpickler refused, without torch's advice to retry with weights_only=False or to allow-list
    the global (either would run the file's code). torch's message opens with that advice, in wordings that
    vary by version and cause, and names the refused global or opcode further down."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line for line in lines if line and not any(advice in line for advice in _ADVICE)]
    reason = " ".join(kept).replace("WeightsUnpickler error:", "").strip()
    reason = re.split(r"\.\s*Please use", reason)[0].strip().rstrip(".")
    return reason or "refused by torch's safe unpickler"


def load_state_dict_file(path: str | PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of one checkpoint file (safetensors, TorchScript or ``torch.save``) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        if _is_safetensors(path):
            return _without_wrapper_prefixes(load_file(str(path), device="cpu"))
        if is_torchscript_archive(path):
            return read_torchscript_state_dict(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's weights-only refusal, or the TorchScript reader's
        reason = _refusal_reason(error)
        if reason.startswith("Unsupported operand"):  # not a pickle at all (a JSON or text file, say)
            raise ValueError(
                f"{path} is not a checkpoint ({reason}): expected .safetensors, a TorchScript archive or a "
                "torch.save state dict."
            ) from error
        raise ValueError(
            f"{path} holds objects other than tensors, which are not loaded for safety ({reason}). Re-save "
            "its state dict with torch.save(model.state_dict(), ...) or as .safetensors."
        ) from error
    except (ValueError, FileNotFoundError):
        raise
    except (
        Exception
    ) as error:  # truncated or corrupt: safetensors, zip and pickle readers each have their own
        raise ValueError(
            f"{path} could not be read as a checkpoint ({type(error).__name__}: {error}); the file may be "
            "truncated or corrupt (an interrupted download?)."
        ) from error
    return _unwrap(obj, path)
