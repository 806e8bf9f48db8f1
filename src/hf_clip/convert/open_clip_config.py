"""open_clip's `open_clip_config.json`: what a state dict cannot tell, read from the file beside it.

An OpenAI-layout state dict records neither its activation nor its head counts, and some open_clip variants
keep the exact OpenAI tensor names while computing something else (pooling at another token, no causal
mask, average-pooled images). open_clip's Hub folders ship their architecture as `open_clip_config.json`
(`{"model_cfg": {...}, "preprocess_cfg": {...}}`); when it sits next to the weights, the conversion takes the
activation, heads and end-of-text id from it and refuses what hf_clip does not implement, instead of
guessing. `open_clip_model_cfg` writes the same file the other way, for `convert_checkpoint(to="open_clip")`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..configuration_hf_clip import HfClipConfig
from .rules import ConversionError

OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's Hub weight files, in its own order of preference.
OPEN_CLIP_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def _read_open_clip_config(src: Path) -> dict[str, Any] | None:
    path = (src if src.is_dir() else src.parent) / OPEN_CLIP_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} could not be read as JSON ({error}).") from error
    if not isinstance(config, dict):
        raise ConversionError(f"{path} does not hold a JSON object.")
    return config


def find_open_clip_config(src: Path) -> dict[str, Any] | None:
    """The `model_cfg` of the open_clip_config.json in folder `src` or beside file `src`, if there is one."""
    config = _read_open_clip_config(src)
    return None if config is None else config.get("model_cfg", config)


def find_open_clip_preprocess(src: Path) -> dict[str, Any] | None:
    """The `preprocess_cfg` (mean, std, interpolation, resize_mode) of that open_clip_config.json, if any."""
    config = _read_open_clip_config(src)
    return None if config is None or "model_cfg" not in config else config.get("preprocess_cfg") or {}


def open_clip_weights_file(folder: Path) -> Path:
    for name in OPEN_CLIP_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder} has {OPEN_CLIP_CONFIG} but none of {', '.join(OPEN_CLIP_WEIGHT_FILES)}."
    )


def open_clip_activation(model_cfg: dict[str, Any]) -> str:
    """open_clip's models use exact GELU unless their config says `quick_gelu` (OpenAI's, DFN's)."""
    return "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"


def _unsupported(model_cfg: dict[str, Any]) -> list[str]:
    text, vision = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    found = []
    if text.get("pool_type", "argmax") not in ("argmax", "eos"):
        found.append(f"text pool_type={text['pool_type']!r} (hf_clip pools at the end-of-text token)")
    if text.get("no_causal_mask"):
        found.append("text no_causal_mask (hf_clip's text tower is causal)")
    if text.get("embed_cls"):
        found.append("text embed_cls")
    if vision.get("pool_type", "tok") != "tok":
        found.append(f"vision pool_type={vision['pool_type']!r} (hf_clip pools the class token)")
    found += [
        f"vision {flag}"
        for flag in ("final_ln_after_pool", "attentional_pool", "no_ln_pre")
        if vision.get(flag)
    ]
    if text.get("final_ln_after_pool"):
        found.append("text final_ln_after_pool")
    for tower, cfg in (("text", text), ("vision", vision)):
        for flag in ("qk_norm", "scale_attn", "scale_attn_inner", "scale_fc", "scale_heads"):
            if cfg.get(flag):
                found.append(f"{tower} {flag}")
        if cfg.get("act_kwargs") or cfg.get("norm_kwargs"):
            found.append(f"{tower} act_kwargs/norm_kwargs")
    return found


def _size_mismatches(config: HfClipConfig, model_cfg: dict[str, Any]) -> list[str]:
    """The sizes `model_cfg` states that differ from those read off the weights' shapes.

    A rectangular image_size is one of them: its position embedding (h/p x w/p patches, plus one) can look like
    a square grid of another size, which would convert without error and compute on misplaced positions."""
    text, vision = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    tv, tt = config.vision_config, config.text_config
    stated: list[tuple[str, Any, Any]] = [("embed_dim", model_cfg.get("embed_dim"), config.projection_dim)]
    image_size = vision.get("image_size")
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            return [f"vision image_size={list(image_size)} is not square (hf_clip's image towers are)"]
        image_size = image_size[0]
    layers = tv.resnet_layers if tv.vision_type == "resnet" else tv.num_hidden_layers
    stated += [
        ("vision image_size", image_size, tv.image_size),
        ("vision width", vision.get("width"), tv.hidden_size),
        (
            "vision layers",
            list(vision["layers"])
            if isinstance(vision.get("layers"), (list, tuple))
            else vision.get("layers"),
            layers,
        ),
        ("text width", text.get("width"), tt.hidden_size),
        ("text layers", text.get("layers"), tt.num_hidden_layers),
        ("text context_length", text.get("context_length"), tt.max_position_embeddings),
        ("text vocab_size", text.get("vocab_size"), tt.vocab_size),
    ]
    if tv.vision_type == "vit":
        stated.append(("vision patch_size", vision.get("patch_size"), tv.patch_size))
    return [
        f"{name}={value} (the weights: {actual})"
        for name, value, actual in stated
        if value is not None and value != actual
    ]


def apply_open_clip_config(config: HfClipConfig, model_cfg: dict[str, Any], source: Path) -> HfClipConfig:
    """`config` (inferred from the weights' shapes, with `open_clip_activation`) given open_clip's head counts
    and end-of-text id; a ConversionError for a variant hf_clip does not compute, or for a config whose sizes
    are not the weights' (another model's config beside the file, or a rectangular input)."""
    unsupported = _unsupported(model_cfg)
    if unsupported:
        raise ConversionError(
            f"{source}: its {OPEN_CLIP_CONFIG} describes a variant hf_clip does not implement: "
            f"{'; '.join(unsupported)}. Converting it would silently compute something else."
        )
    mismatches = _size_mismatches(config, model_cfg)
    if mismatches:
        raise ConversionError(
            f"{source}: its {OPEN_CLIP_CONFIG} does not describe these weights: {'; '.join(mismatches)}. "
            f"Its head counts and activation cannot be trusted; remove or fix the {OPEN_CLIP_CONFIG}."
        )
    text, vision = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    config.text_config.num_attention_heads = int(text.get("heads", 8))
    # open_clip: heads = width // head_width for a ViT, width * 32 // head_width for the ResNet attention pool.
    pooled_width = config.vision_config.output_width
    config.vision_config.num_attention_heads = pooled_width // int(vision.get("head_width", 64))
    if text.get("pool_type") == "eos":
        config.text_config.eos_token_id = int(text.get("eos_id", 2))
    if model_cfg.get("init_logit_bias") is not None:
        config.logit_bias_init_value = float(model_cfg["init_logit_bias"])
    if model_cfg.get("init_logit_scale") is not None:
        config.logit_scale_init_value = float(model_cfg["init_logit_scale"])
    return config


def _mlp_ratio(width: int, mlp_width: int) -> float:
    """open_clip builds an MLP `int(width * mlp_ratio)` wide: the ratio is nudged up where the division rounds
    under (ViT-g's 6144 / 1408)."""
    ratio = mlp_width / width
    while int(width * ratio) < mlp_width:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def open_clip_model_cfg(config: HfClipConfig) -> dict[str, Any]:
    """The `model_cfg` from which open_clip's factory builds a `CLIP` computing what `config` does (the inverse
    of `apply_open_clip_config`); a ConversionError for what that class cannot express.

    The text tower pools at the first end-of-text token: open_clip's default 'argmax' finds it where it is the
    vocabulary's highest id (OpenAI's), 'eos' with its id otherwise. A ResNet image tower uses ReLU, so only
    the text tower's activation sets `quick_gelu`; a ViT's towers must share it (open_clip takes one)."""
    text, vision = config.text_config, config.vision_config
    problems = []
    if vision.vision_type == "vit" and text.hidden_act != vision.hidden_act:
        problems.append(
            f"the text tower uses {text.hidden_act} and the image tower {vision.hidden_act}; open_clip's "
            "quick_gelu sets both"
        )
    for tower, eps in (("text", text.layer_norm_eps), ("vision", vision.layer_norm_eps)):
        if eps != 1e-5:
            problems.append(f"{tower} layer_norm_eps={eps} (open_clip's LayerNorm uses 1e-5)")
    if vision.num_channels != 3:
        problems.append(f"num_channels={vision.num_channels} (open_clip's image towers take RGB)")
    if problems:
        raise ConversionError(f"open_clip's CLIP cannot express this model: {'; '.join(problems)}.")
    text_cfg: dict[str, Any] = {
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "width": text.hidden_size,
        "heads": text.num_attention_heads,
        "layers": text.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(text.hidden_size, text.intermediate_size),
    }
    if text.eos_token_id != text.vocab_size - 1:
        text_cfg.update(pool_type="eos", eos_id=text.eos_token_id)
    # open_clip: heads = width // head_width (ViT), width * 32 // head_width (ResNet attention pool).
    vision_cfg: dict[str, Any] = {
        "image_size": vision.image_size,
        "width": vision.hidden_size,
        "head_width": vision.output_width // vision.num_attention_heads,
    }
    if vision.vision_type == "resnet":
        vision_cfg["layers"] = list(vision.resnet_layers)
    else:
        vision_cfg.update(
            layers=vision.num_hidden_layers,
            patch_size=vision.patch_size,
            mlp_ratio=_mlp_ratio(vision.hidden_size, vision.intermediate_size),
        )
    model_cfg: dict[str, Any] = {
        "embed_dim": config.projection_dim,
        "quick_gelu": text.hidden_act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "init_logit_scale": config.logit_scale_init_value,
    }
    if config.logit_bias_init_value is not None:  # open_clip's CLIP then has (and adds) a logit_bias
        model_cfg["init_logit_bias"] = config.logit_bias_init_value
    return model_cfg
