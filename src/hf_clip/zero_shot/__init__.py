"""Zero-shot transfer: published prompts and class names, ensembled classifiers, a cached pipeline, retrieval."""

from .classifier import ZeroShotClassifier, fill_template
from .pipeline import ZERO_SHOT_TASK, HfClipZeroShotImageClassificationPipeline, register_pipelines
from .retrieval import EmbeddingIndex, SearchResult
from .templates import available_datasets, get_classnames, get_templates

__all__ = [
    "ZERO_SHOT_TASK",
    "EmbeddingIndex",
    "HfClipZeroShotImageClassificationPipeline",
    "SearchResult",
    "ZeroShotClassifier",
    "available_datasets",
    "fill_template",
    "get_classnames",
    "get_templates",
    "register_pipelines",
]
