"""hf_clip: CLIP (Radford et al., 2021) for the Hugging Face ecosystem.

Importing the package registers the config, models, tokenizer, image processor and processor with
transformers' Auto classes under the model type `hf_clip`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
    AutoVideoProcessor,
)

from .configuration_hf_clip import PAPER_MODELS, PRESETS, HfClipConfig, HfClipTextConfig, HfClipVisionConfig
from .image_processing_hf_clip import HfClipImageProcessor, RandomResizedSquareCrop
from .modeling_hf_clip import (
    HfClipForImageClassification,
    HfClipModel,
    HfClipOutput,
    HfClipPreTrainedModel,
    HfClipTextModel,
    HfClipTextModelWithProjection,
    HfClipVisionModel,
    HfClipVisionModelWithProjection,
    contrastive_loss,
    plain_torch_layers,
)
from .processing_hf_clip import HfClipProcessor
from .tokenization_hf_clip import HfClipTokenizer
from .zero_shot import (
    ZERO_SHOT_TASK,
    EmbeddingIndex,
    HfClipZeroShotImageClassificationPipeline,
    SearchResult,
    ZeroShotClassifier,
    available_datasets,
    get_classnames,
    get_templates,
    register_pipelines,
)

__version__ = "0.1.0"


def _register() -> None:
    for config_cls in (HfClipConfig, HfClipTextConfig, HfClipVisionConfig):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(HfClipConfig, HfClipModel, exist_ok=True)
    AutoModel.register(HfClipTextConfig, HfClipTextModel, exist_ok=True)
    AutoModel.register(HfClipVisionConfig, HfClipVisionModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(HfClipConfig, HfClipModel, exist_ok=True)
    AutoModelForImageClassification.register(HfClipConfig, HfClipForImageClassification, exist_ok=True)
    AutoTokenizer.register(HfClipConfig, tokenizer_class=HfClipTokenizer, exist_ok=True)
    # One class serves both backends AutoImageProcessor may ask for.
    backends = {"pil": HfClipImageProcessor, "torchvision": HfClipImageProcessor}
    AutoImageProcessor.register(HfClipConfig, image_processor_classes=backends, exist_ok=True)
    AutoProcessor.register(HfClipConfig, HfClipProcessor, exist_ok=True)
    # No video processor, said explicitly: pipelines look for one, derive its remote-code name from the image
    # processor's auto_map, and would otherwise ask the user whether to trust that code (a 15 s prompt).
    AutoVideoProcessor.register(HfClipConfig, video_processor_classes={}, exist_ok=True)
    # save_pretrained writes the code and auto_map, so folders load with trust_remote_code=True.
    HfClipConfig.register_for_auto_class()
    for model_cls in (HfClipModel, HfClipTextModel, HfClipVisionModel):
        model_cls.register_for_auto_class("AutoModel")
    HfClipForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    HfClipTokenizer.register_for_auto_class("AutoTokenizer")
    HfClipImageProcessor.register_for_auto_class("AutoImageProcessor")
    HfClipProcessor.register_for_auto_class("AutoProcessor")
    register_pipelines()


_register()

__all__ = [
    "PAPER_MODELS",
    "PRESETS",
    "HfClipConfig",
    "HfClipTextConfig",
    "HfClipVisionConfig",
    "HfClipForImageClassification",
    "HfClipModel",
    "HfClipOutput",
    "HfClipPreTrainedModel",
    "HfClipTextModel",
    "HfClipTextModelWithProjection",
    "HfClipVisionModel",
    "HfClipVisionModelWithProjection",
    "contrastive_loss",
    "plain_torch_layers",
    "HfClipTokenizer",
    "HfClipImageProcessor",
    "RandomResizedSquareCrop",
    "HfClipProcessor",
    "ZERO_SHOT_TASK",
    "EmbeddingIndex",
    "HfClipZeroShotImageClassificationPipeline",
    "SearchResult",
    "ZeroShotClassifier",
    "available_datasets",
    "get_classnames",
    "get_templates",
    "register_pipelines",
]
