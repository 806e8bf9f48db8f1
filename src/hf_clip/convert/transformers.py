"""The transformers `CLIPModel` layout and config, and their mapping onto hf_clip (ViT image towers only).

transformers keeps separate q/k/v projections (hf_clip fuses them, in q, k, v order), spells the ViT's
first LayerNorm `pre_layrnorm`, and keeps `position_ids` buffers that carry no weights.
"""

from __future__ import annotations

from transformers import CLIPConfig

from ..configuration_hf_clip import HfClipConfig
from .rules import ConversionError, Rule

__all__ = [
    "TRANSFORMERS_EXTRA_KEYS",
    "config_from_transformers",
    "config_to_transformers",
    "transformers_rules",
]

TRANSFORMERS_EXTRA_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# transformers' legacy CLIP configs set eos_token_id=2 and pool at the highest token id instead.
_LEGACY_EOS = 2
_OPENAI_EOS = 49407  # "<|endoftext|>", the last entry of OpenAI's vocabulary before any added tokens

# Tower settings both libraries spell the same way and copy unchanged, in either direction.
_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
)
_VISION_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
)


def _fields(tower_config: object, names: tuple[str, ...]) -> dict[str, object]:
    return {name: getattr(tower_config, name) for name in names}


def _encoder(prefix: str, layers: int) -> list[Rule]:
    rules = []
    for i in range(layers):
        p = f"{prefix}.encoder.layers.{i}"
        for kind in ("weight", "bias"):
            rules.append(
                Rule(
                    f"{p}.self_attn.qkv_proj.{kind}",
                    tuple(f"{p}.self_attn.{x}_proj.{kind}" for x in "qkv"),
                    "concat",
                )
            )
            for module in ("self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
                rules.append(Rule(f"{p}.{module}.{kind}", (f"{p}.{module}.{kind}",)))
    return rules


def transformers_rules(config: HfClipConfig) -> list[Rule]:
    """Every hf_clip tensor of `config` with the transformers `CLIPModel` name(s) it comes from."""
    if config.vision_config.vision_type != "vit":
        raise ConversionError(
            "transformers' CLIPModel has no ResNet image tower, so a ResNet CLIP cannot be written in its "
            "layout; keep the hf_clip format for RN50/RN101/RN50x4/RN50x16/RN50x64."
        )
    same = [
        "logit_scale",
        "text_projection.weight",
        "visual_projection.weight",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
    ]
    rules = [Rule(name, (name,)) for name in same]
    rules += [
        Rule(f"vision_model.pre_layernorm.{k}", (f"vision_model.pre_layrnorm.{k}",))
        for k in ("weight", "bias")
    ]
    rules += _encoder("text_model", config.text_config.num_hidden_layers)
    rules += _encoder("vision_model", config.vision_config.num_hidden_layers)
    return rules


def config_from_transformers(config: CLIPConfig) -> HfClipConfig:
    """Translate a transformers `CLIPConfig`; sizes, heads and activation are taken as they are."""
    text, vision = config.text_config, config.vision_config
    eos = text.eos_token_id
    if eos is None or eos == _LEGACY_EOS:
        # Legacy configs pool at each caption's highest id: the end-of-text token, 49407 in OpenAI's
        # vocabulary, also when tokens were added after it (which such a model would pool at instead).
        eos = _OPENAI_EOS if text.vocab_size > _OPENAI_EOS else text.vocab_size - 1
    bos = text.bos_token_id if text.bos_token_id is not None and text.bos_token_id < text.vocab_size else None
    return HfClipConfig(
        text_config={**_fields(text, _TEXT_FIELDS), "bos_token_id": bos, "eos_token_id": eos},
        vision_config={"vision_type": "vit", **_fields(vision, _VISION_FIELDS)},
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )


def config_to_transformers(config: HfClipConfig) -> CLIPConfig:
    """The transformers `CLIPConfig` of an hf_clip ViT model."""
    text, vision = config.text_config, config.vision_config
    transformers_rules(config)  # raises for a ResNet tower
    return CLIPConfig(
        text_config={
            **_fields(text, _TEXT_FIELDS),
            "projection_dim": config.projection_dim,
            "pad_token_id": text.pad_token_id,
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id,
        },
        vision_config={**_fields(vision, _VISION_FIELDS), "projection_dim": config.projection_dim},
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )
