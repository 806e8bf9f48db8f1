"""Configurations for hf_clip: a text tower, an image tower (modified ResNet or ViT) and the joint model.

The nine architectures of Radford et al. (2021) are presets (`HfClipConfig.from_preset("ViT-B/32")`); any
other size, such as OpenCLIP's LAION models, is expressed by passing the sizes directly.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ACTIVATIONS = ("quick_gelu", "gelu")


def _check_activation(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported; use one of {ACTIVATIONS}.")


def _check_heads(tower: str, width: int, heads: int) -> None:
    if heads <= 0 or width % heads != 0:
        raise ValueError(
            f"{tower}: hidden width {width} is not divisible by num_attention_heads={heads}; "
            "pick a head count that divides the width (CLIP uses width // 64)."
        )


class HfClipTextConfig(PretrainedConfig):
    """The causal text transformer; features are read at the end-of-text token."""

    model_type = "hf_clip_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 49408,
        hidden_size: int = 512,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 12,
        num_attention_heads: int | None = None,
        max_position_embeddings: int = 77,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        projection_dim: int = 512,
        initializer_factor: float = 1.0,
        token_embedding_std: float = 0.02,
        pad_token_id: int = 0,
        bos_token_id: int = 49406,
        eos_token_id: int = 49407,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs
        )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = (
            num_attention_heads if num_attention_heads is not None else max(1, hidden_size // 64)
        )
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.projection_dim = projection_dim
        self.initializer_factor = initializer_factor
        # Standard deviation of the token embeddings' initialisation: OpenAI's 0.02 by default. The tiny demo
        # model uses 1.0 (PyTorch's nn.Embedding default), with which its narrow text tower learns much faster.
        self.token_embedding_std = token_embedding_std
        _check_activation(hidden_act)
        _check_heads("text tower", hidden_size, self.num_attention_heads)
        if eos_token_id is None or not 0 <= eos_token_id < vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} must be a token id below vocab_size={vocab_size}.")


class HfClipVisionConfig(PretrainedConfig):
    """The image tower: `vision_type="vit"` (class token, `ln_pre`) or `"resnet"` (the paper's modified ResNet).

    For a ResNet, `hidden_size` is the stem width (64 for RN50), the last stage has `hidden_size * 32`
    channels, and `num_attention_heads` are the attention-pooling heads (`hidden_size * 32 // 64`).
    """

    model_type = "hf_clip_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        vision_type: str = "vit",
        image_size: int = 224,
        patch_size: int | None = 32,
        hidden_size: int = 768,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 12,
        num_attention_heads: int | None = None,
        resnet_layers: list[int] | tuple[int, ...] | None = None,
        num_channels: int = 3,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        projection_dim: int = 512,
        initializer_factor: float = 1.0,
        patch_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(
                f"patch_dropout={patch_dropout} must be in [0, 1): the fraction of patches dropped."
            )
        # FLIP (Li et al., 2023): drop this fraction of patch tokens while training a ViT; faster steps.
        self.patch_dropout = patch_dropout
        if vision_type not in ("vit", "resnet"):
            raise ValueError(f"vision_type={vision_type!r} is not supported; use 'vit' or 'resnet'.")
        self.vision_type = vision_type
        self.image_size = image_size
        self.hidden_size = hidden_size
        self.num_channels = num_channels
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.projection_dim = projection_dim
        self.initializer_factor = initializer_factor
        _check_activation(hidden_act)
        if vision_type == "resnet":
            self.resnet_layers = list(resnet_layers) if resnet_layers is not None else [3, 4, 6, 3]
            if len(self.resnet_layers) != 4 or min(self.resnet_layers) < 1:
                raise ValueError(f"resnet_layers={self.resnet_layers} must be four positive block counts.")
            self.patch_size = None
            self.intermediate_size = None
            self.num_hidden_layers = sum(self.resnet_layers)
            self.num_attention_heads = num_attention_heads or max(1, hidden_size * 32 // 64)
            _check_heads("ResNet attention pool", hidden_size * 32, self.num_attention_heads)
            if image_size % 32 != 0:
                raise ValueError(
                    f"image_size={image_size} must be a multiple of 32 for a ResNet tower (total stride 32)."
                )
        else:
            if not patch_size or patch_size <= 0:
                raise ValueError("A ViT tower needs a positive patch_size.")
            if image_size % patch_size != 0:
                raise ValueError(
                    f"patch_size={patch_size} does not divide image_size={image_size}; "
                    "choose an image size that is a multiple of the patch size."
                )
            self.resnet_layers = None
            self.patch_size = patch_size
            self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
            self.num_hidden_layers = num_hidden_layers
            self.num_attention_heads = num_attention_heads or max(1, hidden_size // 64)
            _check_heads("ViT tower", hidden_size, self.num_attention_heads)

    @property
    def output_width(self) -> int:
        """Width of the pooled features before projection (ResNet: channels of the last stage)."""
        return self.hidden_size * 32 if self.vision_type == "resnet" else self.hidden_size


def _vit(width: int, layers: int, patch: int, image: int, **kw: Any) -> dict[str, Any]:
    return dict(
        vision_type="vit",
        hidden_size=width,
        num_hidden_layers=layers,
        patch_size=patch,
        image_size=image,
        **kw,
    )


def _rn(layers: tuple[int, ...], width: int, image: int) -> dict[str, Any]:
    return dict(vision_type="resnet", resnet_layers=list(layers), hidden_size=width, image_size=image)


def _txt(width: int, layers: int = 12, heads: int | None = None) -> dict[str, Any]:
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads or width // 64)


# name -> (projection_dim, vision kwargs, text kwargs, activation). Sizes: Radford et al. (2021), Table 19-20,
# and the OpenCLIP model configurations for the LAION models.
PRESETS: dict[str, tuple[int, dict[str, Any], dict[str, Any], str]] = {
    "RN50": (1024, _rn((3, 4, 6, 3), 64, 224), _txt(512), "quick_gelu"),
    "RN101": (512, _rn((3, 4, 23, 3), 64, 224), _txt(512), "quick_gelu"),
    "RN50x4": (640, _rn((4, 6, 10, 6), 80, 288), _txt(640), "quick_gelu"),
    "RN50x16": (768, _rn((6, 8, 18, 8), 96, 384), _txt(768), "quick_gelu"),
    "RN50x64": (1024, _rn((3, 15, 36, 10), 128, 448), _txt(1024), "quick_gelu"),
    "ViT-B/32": (512, _vit(768, 12, 32, 224), _txt(512), "quick_gelu"),
    "ViT-B/16": (512, _vit(768, 12, 16, 224), _txt(512), "quick_gelu"),
    "ViT-L/14": (768, _vit(1024, 24, 14, 224), _txt(768), "quick_gelu"),
    "ViT-L/14@336px": (768, _vit(1024, 24, 14, 336), _txt(768), "quick_gelu"),
    "ViT-H/14": (1024, _vit(1280, 32, 14, 224, num_attention_heads=16), _txt(1024, 24, 16), "gelu"),
    "ViT-g/14": (
        1024,
        _vit(1408, 40, 14, 224, num_attention_heads=16, intermediate_size=6144),
        _txt(1024, 24, 16),
        "gelu",
    ),
    "ViT-bigG/14": (
        1280,
        _vit(1664, 48, 14, 224, num_attention_heads=16, intermediate_size=8192),
        _txt(1280, 32, 20),
        "gelu",
    ),
}

PAPER_MODELS = tuple(list(PRESETS)[:9])


def _canonical(name: str) -> str:
    return name.strip().lower().replace("/", "-").replace("@336px", "-336")


_ALIASES = {_canonical(k): k for k in PRESETS}


def resolve_preset_name(name: str) -> tuple[str, str | None]:
    """Map OpenAI ("ViT-B/32") or open_clip ("ViT-B-32", "ViT-B-32-quickgelu") spellings to a preset name.

    Returns the preset and the activation the suffix forces (None when there is no suffix).
    """
    key, act = _canonical(name), None
    if key.endswith("-quickgelu"):
        key, act = key[: -len("-quickgelu")], "quick_gelu"
    if key not in _ALIASES:
        raise ValueError(
            f"Unknown preset {name!r}. Available: {', '.join(PRESETS)} (open_clip spellings accepted)."
        )
    return _ALIASES[key], act


class HfClipConfig(PretrainedConfig):
    """Joint config: both towers plus the shared embedding width and the learned temperature."""

    model_type = "hf_clip"
    sub_configs = {"text_config": HfClipTextConfig, "vision_config": HfClipVisionConfig}

    def __init__(
        self,
        text_config: dict[str, Any] | HfClipTextConfig | None = None,
        vision_config: dict[str, Any] | HfClipVisionConfig | None = None,
        projection_dim: int = 512,
        logit_scale_init_value: float = 2.6592,
        logit_bias_init_value: float | None = None,
        initializer_factor: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, HfClipTextConfig):
            text_config = text_config.to_dict()
        if isinstance(vision_config, HfClipVisionConfig):
            vision_config = vision_config.to_dict()
        text_config = dict(text_config or {})
        vision_config = dict(vision_config or {})
        for sub in (text_config, vision_config):
            sub["projection_dim"] = projection_dim
            for key in ("model_type", "transformers_version", "architectures"):
                sub.pop(key, None)
        self.text_config = HfClipTextConfig(**text_config)
        self.vision_config = HfClipVisionConfig(**vision_config)
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        # Set (e.g. to -10) for a SigLIP-style model: adds a learned bias to the logits and a sigmoid loss.
        self.logit_bias_init_value = logit_bias_init_value
        self.initializer_factor = initializer_factor
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HfClipConfig:
        """One of the paper's nine models (or a LAION size) by OpenAI or open_clip name.

        `overrides` may set `hidden_act` for both towers, or `text_config`/`vision_config` dicts that update
        the preset's values, e.g. to shrink a model for tests.
        """
        preset, forced_act = resolve_preset_name(name)
        projection_dim, vision, text, act = PRESETS[preset]
        act = overrides.pop("hidden_act", forced_act or act)
        vision = {**vision, "hidden_act": act, **overrides.pop("vision_config", {})}
        text = {**text, "hidden_act": act, **overrides.pop("text_config", {})}
        return cls(
            text_config=text,
            vision_config=vision,
            projection_dim=overrides.pop("projection_dim", projection_dim),
            **overrides,
        )

    def check_has_text_tower(self, use: str) -> None:
        """Refuse a folder saved by HfClipForImageClassification where both towers are needed (`use` says for
        what): loaded as HfClipModel it would get a random text tower and temperature, and score at chance."""
        if "HfClipForImageClassification" in (self.architectures or []):
            raise ValueError(
                f"This folder holds an image classifier (HfClipForImageClassification: the image tower and a "
                f"{self.num_labels}-class head, no text tower), so it cannot be used for {use}. Classify with "
                "pipeline('image-classification', model=...) or AutoModelForImageClassification; for the "
                "contrastive model, use the folder the classifier was made from."
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        return out


__all__ = [
    "HfClipConfig",
    "HfClipTextConfig",
    "HfClipVisionConfig",
    "PRESETS",
    "PAPER_MODELS",
    "resolve_preset_name",
]
