"""The OpenAI checkpoint layout (also open_clip's for CLIP models) and its mapping onto hf_clip names.

OpenAI: `token_embedding`, `positional_embedding`, `transformer.resblocks.{i}` (`ln_1`, `attn.in_proj_*`,
`attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`), `ln_final`, `text_projection` [W, D], `logit_scale`, and
`visual.*`: a ViT (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`, `transformer`, `ln_post`,
`proj` [W, D]) or a modified ResNet (stem `conv1..3`/`bn1..3`, `layer1..4`, `attnpool`). The projections are
stored [in, out], so they are transposed into hf_clip's `nn.Linear` weights.
"""

from __future__ import annotations

from ..configuration_hf_clip import HfClipConfig
from .rules import Rule

__all__ = ["OPENAI_EXTRA_KEYS", "openai_rules"]

# Non-parameter entries of OpenAI's archives (and open_clip's non-persistent causal mask).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

_BLOCK = (
    ("ln_1", "layer_norm1"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _copy(target: str, source: str) -> Rule:
    return Rule(target, (source,))


def _affine(target: str, source: str) -> list[Rule]:
    return [_copy(f"{target}.{p}", f"{source}.{p}") for p in ("weight", "bias")]


def _transformer(target: str, source: str, layers: int) -> list[Rule]:
    rules = []
    for i in range(layers):
        src, dst = f"{source}.resblocks.{i}", f"{target}.layers.{i}"
        rules += [
            _copy(f"{dst}.self_attn.qkv_proj.weight", f"{src}.attn.in_proj_weight"),
            _copy(f"{dst}.self_attn.qkv_proj.bias", f"{src}.attn.in_proj_bias"),
        ]
        for theirs, ours in _BLOCK:
            rules += _affine(f"{dst}.{ours}", f"{src}.{theirs}")
    return rules


def _batch_norm(target: str, source: str) -> list[Rule]:
    return [
        Rule(f"{target}.{p}", (f"{source}.{p}",), zero_if_missing=p == "num_batches_tracked") for p in _BN
    ]


def _resnet(config: HfClipConfig) -> list[Rule]:
    rules = []
    for i in (1, 2, 3):
        rules += [_copy(f"vision_model.conv{i}.weight", f"visual.conv{i}.weight")]
        rules += _batch_norm(f"vision_model.bn{i}", f"visual.bn{i}")
    for stage, blocks in enumerate(config.vision_config.resnet_layers, start=1):
        for j in range(blocks):
            src, dst = f"visual.layer{stage}.{j}", f"vision_model.layer{stage}.{j}"
            for i in (1, 2, 3):
                rules += [_copy(f"{dst}.conv{i}.weight", f"{src}.conv{i}.weight")]
                rules += _batch_norm(f"{dst}.bn{i}", f"{src}.bn{i}")
            if j == 0:  # the first block of every stage changes width (and stride): it has a shortcut branch
                rules += [_copy(f"{dst}.downsample.conv.weight", f"{src}.downsample.0.weight")]
                rules += _batch_norm(f"{dst}.downsample.bn", f"{src}.downsample.1")
    rules += [_copy("vision_model.attnpool.position_embedding", "visual.attnpool.positional_embedding")]
    for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
        rules += _affine(f"vision_model.attnpool.{proj}", f"visual.attnpool.{proj}")
    return rules


def _vit(config: HfClipConfig) -> list[Rule]:
    return [
        _copy("vision_model.embeddings.class_embedding", "visual.class_embedding"),
        _copy("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
        _copy("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
        *_affine("vision_model.pre_layernorm", "visual.ln_pre"),
        *_transformer("vision_model.encoder", "visual.transformer", config.vision_config.num_hidden_layers),
        *_affine("vision_model.post_layernorm", "visual.ln_post"),
        Rule("visual_projection.weight", ("visual.proj",), "transpose"),
    ]


def openai_rules(config: HfClipConfig) -> list[Rule]:
    """Every hf_clip tensor of `config` with the OpenAI / open_clip name it comes from."""
    text = [
        _copy("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        _copy("text_model.embeddings.position_embedding.weight", "positional_embedding"),
        *_transformer("text_model.encoder", "transformer", config.text_config.num_hidden_layers),
        *_affine("text_model.final_layer_norm", "ln_final"),
        Rule("text_projection.weight", ("text_projection",), "transpose"),
        _copy("logit_scale", "logit_scale"),
    ]
    if config.logit_bias_init_value is not None:  # a sigmoid-loss model; open_clip's CLIP names it the same
        text.append(_copy("logit_bias", "logit_bias"))
    vision = _resnet(config) if config.vision_config.vision_type == "resnet" else _vit(config)
    return text + vision
