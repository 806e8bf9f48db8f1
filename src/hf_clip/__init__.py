"""hf_clip: CLIP (Radford et al., 2021) for the Hugging Face ecosystem.

Importing the package registers the config, models, tokenizer, image processor and processor with
transformers' Auto classes under the model type `hf_clip`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
)

from .configuration_hf_clip import PAPER_MODELS, PRESETS, HfClipConfig, HfClipTextConfig, HfClipVisionConfig
from .modeling_hf_clip import (
    HfClipModel,
    HfClipOutput,
    HfClipPreTrainedModel,
    HfClipTextModel,
    HfClipTextModelWithProjection,
    HfClipVisionModel,
    HfClipVisionModelWithProjection,
    contrastive_loss,
)

__version__ = "0.1.0"


def _register() -> None:
    for config_cls in (HfClipConfig, HfClipTextConfig, HfClipVisionConfig):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(HfClipConfig, HfClipModel, exist_ok=True)
    AutoModel.register(HfClipTextConfig, HfClipTextModel, exist_ok=True)
    AutoModel.register(HfClipVisionConfig, HfClipVisionModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(HfClipConfig, HfClipModel, exist_ok=True)
    # save_pretrained writes the code and auto_map, so folders load with trust_remote_code=True.
    HfClipConfig.register_for_auto_class()
    for model_cls in (HfClipModel, HfClipTextModel, HfClipVisionModel):
        model_cls.register_for_auto_class("AutoModel")


_register()

__all__ = [
    "PAPER_MODELS",
    "PRESETS",
    "HfClipConfig",
    "HfClipTextConfig",
    "HfClipVisionConfig",
    "HfClipModel",
    "HfClipOutput",
    "HfClipPreTrainedModel",
    "HfClipTextModel",
    "HfClipTextModelWithProjection",
    "HfClipVisionModel",
    "HfClipVisionModelWithProjection",
    "contrastive_loss",
]
