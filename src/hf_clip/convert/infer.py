"""Recover an `HfClipConfig` from tensor names and shapes alone.

OpenAI's archives and open_clip's state dicts carry no config. Everything but the activation follows from
the shapes: widths, depths (counted from block names), patch size, image size (the position-embedding count
is a square grid plus one), ResNet stage depths, embedding width, vocabulary and context length. Head
counts and the activation cannot be seen. When the sizes are those of a preset, its head counts and
activation are used: LAION's ViT-H/g/bigG have 80-104-wide heads and exact GELU. Otherwise heads follow
CLIP's rule (width / 64; ResNet attention pool: width * 32 / 64) and the activation is QuickGELU, that of
OpenAI's released weights; `--config` names the architecture where neither holds.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch

from ..configuration_hf_clip import PRESETS, HfClipConfig
from .rules import ConversionError

logger = logging.getLogger(__name__)

# What shapes show of a tower (heads and activation are what they do not).
_INPUT_SIZES = ("patch_size", "image_size")
_VISIBLE = (
    "vision_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "patch_size",
    "image_size",
    "resnet_layers",
)

__all__ = ["detect_layout", "infer_openai_config", "infer_transformers_config"]

_CLIP_VOCAB_SIZE = 49408  # OpenAI BPE: 49,406 tokens + <start_of_text> + <end_of_text>


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'openai' (OpenAI / open_clip), 'transformers' (CLIPModel) or 'hf_clip', from the tensor names."""
    if "token_embedding.weight" in state_dict and "positional_embedding" in state_dict:
        return "openai"
    if "text_model.embeddings.token_embedding.weight" in state_dict:
        if any(".self_attn.qkv_proj." in key for key in state_dict):
            return "hf_clip"
        if any(".self_attn.q_proj." in key for key in state_dict):
            return "transformers"
    sample = ", ".join(sorted(state_dict)[:8])
    raise ConversionError(
        f"Unrecognised checkpoint layout (first tensors: {sample}). Supported: OpenAI / open_clip CLIP state "
        "dicts and TorchScript archives, transformers CLIPModel, hf_clip."
    )


def _get(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ConversionError(f"Cannot infer the architecture: the checkpoint has no '{key}'.")
    return state_dict[key]


def _count(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct block indices matched by `pattern` (a regex with one group)."""
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for key in state_dict if (m := regex.match(key))}
    if indices != set(range(len(indices))):
        raise ConversionError(f"Block indices of '{pattern}' are not contiguous: {sorted(indices)}.")
    return len(indices)


def _grid(count: int, what: str) -> int:
    side = math.isqrt(count - 1)
    if side * side + 1 != count:
        raise ConversionError(f"{what} has {count} positions, not a square grid plus one class token.")
    return side


def _token_ids(vocab_size: int) -> dict[str, int]:
    # CLIP's BPE puts <start_of_text>, <end_of_text> last; open_clip pools at the highest id (argmax).
    if vocab_size == _CLIP_VOCAB_SIZE:
        return {}
    return {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1}


def _transformer_tower(
    state_dict: Mapping[str, torch.Tensor], blocks: str, fc1: str, width: int
) -> dict[str, object]:
    """Width, MLP size, depth and heads (CLIP's width / 64) of a transformer tower whose blocks are named
    ``{blocks}{i}.`` with the first MLP layer at ``{blocks}0.{fc1}``."""
    return dict(
        hidden_size=width,
        intermediate_size=_get(state_dict, f"{blocks}0.{fc1}").shape[0],
        num_hidden_layers=_count(state_dict, re.escape(blocks) + r"(\d+)\."),
        num_attention_heads=max(1, width // 64),
    )


def _with_preset_heads(config: HfClipConfig, activation: str | None) -> HfClipConfig:
    """Head counts (and, unless given, the activation) of the preset whose tower sizes these are, if any.

    Image and patch size do not decide the head count, so they are left out of the match: LAION's and
    DFN's ViT-H at 378 px or with 16-px patches have ViT-H/14's 16 heads, not width / 64 = 20."""

    def visible(c: HfClipConfig, with_input_sizes: bool = True) -> tuple:
        keys = _VISIBLE if with_input_sizes else tuple(k for k in _VISIBLE if k not in _INPUT_SIZES)
        return (
            c.projection_dim,
            *(getattr(t, k, None) for t in (c.vision_config, c.text_config) for k in keys),
        )

    presets = [(name, HfClipConfig.from_preset(name)) for name in PRESETS]
    match = next((p for p in presets if visible(p[1]) == visible(config)), None) or next(
        (p for p in presets if visible(p[1], False) == visible(config, False)), None
    )
    if match is not None:
        name, preset = match
        for tower, ref in (
            (config.vision_config, preset.vision_config),
            (config.text_config, preset.text_config),
        ):
            tower.num_attention_heads = ref.num_attention_heads
            tower.hidden_act = activation or ref.hidden_act
        logger.info("The tower sizes are those of %s: its head counts are used.", name)
    else:
        for tower in (config.vision_config, config.text_config):
            tower.hidden_act = activation or "quick_gelu"
    if activation is None:
        logger.warning(
            "The checkpoint does not say its activation; assuming %s%s. If it was trained with the other one "
            "(open_clip names QuickGELU models '-quickgelu'), pass --gelu or --quick-gelu (activation=...).",
            config.vision_config.hidden_act,
            f" as {match[0]} uses" if match is not None else " as OpenAI's CLIP uses",
        )
    return config


def infer_openai_config(
    state_dict: Mapping[str, torch.Tensor], activation: str | None = None
) -> HfClipConfig:
    """The config of an OpenAI / open_clip CLIP state dict (ViT or modified-ResNet image tower)."""
    unsupported = [k for k in state_dict if k.startswith(("visual.trunk.", "text.", "visual.attn_pool."))]
    if unsupported:
        raise ConversionError(
            f"This open_clip checkpoint uses a tower hf_clip does not implement (e.g. '{unsupported[0]}'): only "
            "the OpenAI CLIP architecture (ViT or modified ResNet image tower, CLIP text transformer) converts."
        )
    width = _get(state_dict, "ln_final.weight").shape[0]
    vocab_size = _get(state_dict, "token_embedding.weight").shape[0]
    text = dict(
        vocab_size=vocab_size,
        **_transformer_tower(state_dict, "transformer.resblocks.", "mlp.c_fc.weight", width),
        max_position_embeddings=_get(state_dict, "positional_embedding").shape[0],
        **_token_ids(vocab_size),
    )
    projection_dim = _get(state_dict, "text_projection").shape[1]
    if "visual.proj" in state_dict:
        patch = _get(state_dict, "visual.conv1.weight")
        vision_width, patch_size = patch.shape[0], patch.shape[-1]
        grid = _grid(_get(state_dict, "visual.positional_embedding").shape[0], "visual.positional_embedding")
        vision = dict(
            vision_type="vit",
            image_size=grid * patch_size,
            patch_size=patch_size,
            **_transformer_tower(
                state_dict, "visual.transformer.resblocks.", "mlp.c_fc.weight", vision_width
            ),
        )
    elif "visual.attnpool.positional_embedding" in state_dict:
        vision_width = _get(state_dict, "visual.layer1.0.conv1.weight").shape[0]
        pool = _get(state_dict, "visual.attnpool.positional_embedding")
        vision = dict(
            vision_type="resnet",
            image_size=_grid(pool.shape[0], "visual.attnpool.positional_embedding") * 32,
            hidden_size=vision_width,
            resnet_layers=[_count(state_dict, rf"visual\.layer{i}\.(\d+)\.") for i in (1, 2, 3, 4)],
            num_attention_heads=max(1, vision_width * 32 // 64),
        )
    else:
        raise ConversionError(
            "The checkpoint has neither a ViT ('visual.proj') nor a ResNet ('visual.attnpool')."
        )
    # A logit bias (sigmoid loss) records only its trained value, which stands in for the initial one.
    bias = float(state_dict["logit_bias"].reshape(-1)[0]) if "logit_bias" in state_dict else None
    config = HfClipConfig(
        text_config=text, vision_config=vision, projection_dim=projection_dim, logit_bias_init_value=bias
    )
    return _with_preset_heads(config, activation)


def infer_transformers_config(
    state_dict: Mapping[str, torch.Tensor], activation: str | None = None
) -> HfClipConfig:
    """The config of a bare transformers `CLIPModel` state dict (a weights file without its config.json)."""
    width = _get(state_dict, "text_model.final_layer_norm.weight").shape[0]
    vocab_size = _get(state_dict, "text_model.embeddings.token_embedding.weight").shape[0]
    patch = _get(state_dict, "vision_model.embeddings.patch_embedding.weight")
    vision_width, patch_size = patch.shape[0], patch.shape[-1]
    positions = _get(state_dict, "vision_model.embeddings.position_embedding.weight").shape[0]
    context = _get(state_dict, "text_model.embeddings.position_embedding.weight").shape[0]
    config = HfClipConfig(
        text_config=dict(
            vocab_size=vocab_size,
            max_position_embeddings=context,
            **_transformer_tower(state_dict, "text_model.encoder.layers.", "mlp.fc1.weight", width),
            **_token_ids(vocab_size),
        ),
        vision_config=dict(
            vision_type="vit",
            image_size=_grid(positions, "vision_model.embeddings.position_embedding") * patch_size,
            patch_size=patch_size,
            **_transformer_tower(state_dict, "vision_model.encoder.layers.", "mlp.fc1.weight", vision_width),
        ),
        projection_dim=_get(state_dict, "text_projection.weight").shape[0],
    )
    return _with_preset_heads(config, activation)
