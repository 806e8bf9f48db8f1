"""A zero-shot image classification pipeline with prompt ensembling and cached class embeddings.

transformers' own "zero-shot-image-classification" pipeline runs the text tower on every call, with one
template. This subclass builds a `ZeroShotClassifier` per (labels, templates) pair, keeps the most recent
ones, and so encodes the prompts once however many images follow. `hypothesis_template` may be one template,
a list of templates (ensembled as in the paper), or a shipped template-set name such as "imagenet";
`candidate_labels` may be a shipped dataset name such as "cifar10".

Images reach hf_clip's image processor as given (PIL images, file paths, arrays), so the scores are those of
processor + model, with OpenAI's preprocessing; only URLs and base64 strings go through transformers'
`load_image`, which converts to RGB and applies EXIF rotation first (as transformers' own pipeline does for
every image).

    from transformers import pipeline
    import hf_clip  # registers the task

    classify = pipeline(ZERO_SHOT_TASK, model="path/to/hf_clip-model")
    classify(images, candidate_labels=["cat", "dog"], hypothesis_template="imagenet")
"""

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoModelForZeroShotImageClassification
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.zero_shot_image_classification import ZeroShotImageClassificationPipeline

from ._encode import check_model, check_tokenizer_kwargs
from .classifier import (
    ClassName,
    ZeroShotClassifier,
    check_top_k,
    resolve_classnames,
    resolve_templates,
)

ZERO_SHOT_TASK = "hf-clip-zero-shot-image-classification"
# Prompt encodings from which building a classifier shows a progress bar (ImageNet's ensemble has 80,000).
_PROGRESS_PROMPTS = 1_000

# (classes as tuples of synonyms, templates, sorted tokenizer_kwargs items): the identity of a classifier.
ClassifierKey = tuple[tuple[tuple[str, ...], ...], tuple[str, ...], tuple[tuple[str, Any], ...]]


class HfClipZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """Zero-shot image classification with prompt ensembles and class embeddings cached across calls.

    Extra init arguments: `cache_size` (classifiers kept, least recently used dropped first) and
    `prompt_batch_size` (prompts per text-tower batch). Call arguments: `candidate_labels`,
    `hypothesis_template` (default "a photo of a {}."), `tokenizer_kwargs` (passed to the tokenizer over
    the defaults padding=True, truncation=True, max_length=<the text tower's context>), `top_k`, `timeout`;
    `batch_size` batches images.
    Scores are the softmax of exp(logit_scale) * cosine similarity, as in transformers' pipeline; for a model
    trained with the sigmoid loss (it has a logit bias), each label's sigmoid of that plus the bias, as
    transformers' pipeline scores SigLIP models.
    """

    def __init__(self, *args: Any, cache_size: int = 8, prompt_batch_size: int = 256, **kwargs: Any) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}.")
        if (
            isinstance(prompt_batch_size, bool)
            or not isinstance(prompt_batch_size, int)
            or prompt_batch_size < 1
        ):
            # Checked here: the first call would otherwise fail with encode_texts' "batch_size must be ...".
            raise ValueError(f"prompt_batch_size must be an integer >= 1, got {prompt_batch_size!r}.")
        self.cache_size = cache_size
        self.prompt_batch_size = prompt_batch_size
        self._classifiers: OrderedDict[ClassifierKey, ZeroShotClassifier] = OrderedDict()
        super().__init__(*args, **kwargs)

    def __call__(
        self, image: Any = None, candidate_labels: str | Sequence[ClassName] | None = None, **kwargs: Any
    ) -> Any:
        """Scores for one image (a list of {label, score}, best first) or for each image of a list or tuple."""
        if "images" in kwargs:  # transformers' spelling; popped here so a tuple of images is seen below
            image = kwargs.pop("images")
        if isinstance(image, tuple):
            # transformers' Pipeline batches lists only: a tuple would reach preprocess as one input.
            image = list(image)
        if candidate_labels is None and "candidate_labels" not in self._preprocess_params:
            raise ValueError(
                "Pass candidate_labels: a list of class names, or a shipped dataset name such as 'cifar10'."
            )
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def check_model_type(self, supported_models: Any) -> None:
        # Any CLIP-style model works; the parent would only log an error for models outside transformers' table.
        check_model(self.model)

    def _sanitize_parameters(
        self,
        candidate_labels: str | Sequence[ClassName] | None = None,
        hypothesis_template: str | Sequence[str] | None = None,
        timeout: float | None = None,
        top_k: int | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        preprocess_params: dict[str, Any] = {}
        if candidate_labels is not None:
            preprocess_params["candidate_labels"] = candidate_labels
        if hypothesis_template is not None:
            preprocess_params["hypothesis_template"] = hypothesis_template
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if tokenizer_kwargs is not None:
            _tokenizer_items(tokenizer_kwargs)  # checked here, before any image is read
            preprocess_params["tokenizer_kwargs"] = dict(tokenizer_kwargs)
        if kwargs:
            raise TypeError(
                f"Unexpected argument(s) {', '.join(sorted(kwargs))}; this pipeline takes candidate_labels, "
                "hypothesis_template, tokenizer_kwargs, top_k, timeout (and batch_size, num_workers)."
            )
        check_top_k(top_k)
        postprocess_params = {"top_k": top_k} if top_k is not None else {}
        return preprocess_params, {}, postprocess_params

    # Classifier cache ---------------------------------------------------------------------------------------

    @staticmethod
    def classifier_key(
        candidate_labels: str | Sequence[ClassName],
        hypothesis_template: str | Sequence[str] | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
    ) -> ClassifierKey:
        classes = resolve_classnames(candidate_labels)
        return (
            tuple(tuple(c) for c in classes),
            tuple(resolve_templates(hypothesis_template)),
            _tokenizer_items(tokenizer_kwargs),
        )

    def get_classifier(
        self,
        candidate_labels: str | Sequence[ClassName],
        hypothesis_template: str | Sequence[str] | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
    ) -> ZeroShotClassifier:
        """The cached classifier for these labels, templates and tokenizer options, encoding the prompts on a
        miss."""
        return self._classifier_for(
            self.classifier_key(candidate_labels, hypothesis_template, tokenizer_kwargs)
        )

    def _classifier_for(self, key: ClassifierKey) -> ZeroShotClassifier:
        if key in self._classifiers:
            self._classifiers.move_to_end(key)
            return self._classifiers[key]
        classes, templates, tokenizer_items = key
        classifier = ZeroShotClassifier.from_model(
            self.model,
            self.tokenizer,
            [list(c) for c in classes],
            list(templates),
            batch_size=self.prompt_batch_size,
            progress=len(classes) * len(templates) >= _PROGRESS_PROMPTS,
            tokenizer_kwargs=dict(tokenizer_items),
        )
        self._classifiers[key] = classifier
        while len(self._classifiers) > self.cache_size:
            self._classifiers.popitem(last=False)
        return classifier

    def clear_cache(self) -> None:
        """Forget cached class embeddings, e.g. after the model's weights changed."""
        self._classifiers.clear()

    # Pipeline steps -----------------------------------------------------------------------------------------

    def preprocess(
        self,
        image: Any,
        candidate_labels: str | Sequence[ClassName] | None = None,
        hypothesis_template: str | Sequence[str] | None = None,
        timeout: float | None = None,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if candidate_labels is None:
            raise ValueError("candidate_labels is missing.")
        key = self.classifier_key(candidate_labels, hypothesis_template, tokenizer_kwargs)
        image = _fetch_if_remote(image, timeout)
        pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"].to(
            self.dtype
        )
        if pixel_values.shape[0] != 1:  # a nested list: the image processor flattened it into several images
            raise ValueError(
                f"One input held {pixel_values.shape[0]} images ({type(image).__name__}); pass a flat list of "
                "images to classify several, each one a PIL image, path, URL or [H, W, C] / [C, H, W] array."
            )
        return {"pixel_values": pixel_values, "classifier_key": key}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        key = model_inputs["classifier_key"]
        if isinstance(key, list):  # batched by the pipeline's collate: one key per image, all equal
            key = key[0]
        classifier = self._classifier_for(key)
        scores = classifier.scores(classifier(model_inputs["pixel_values"]))
        # One key per row so the pipeline's un-batching hands each image its own.
        return {"scores": scores, "classifier_key": [key] * scores.shape[0]}

    def postprocess(self, model_outputs: dict[str, Any], top_k: int | None = None) -> list[dict[str, Any]]:
        key = model_outputs["classifier_key"]
        if isinstance(key, list):
            key = key[0]
        labels = [synonyms[0] for synonyms in key[0]]
        probs = model_outputs["scores"][0]
        k = len(labels) if top_k is None else min(top_k, len(labels))
        scores, indices = probs.topk(k)
        return [{"score": s, "label": labels[i]} for s, i in zip(scores.tolist(), indices.tolist())]


def _tokenizer_items(tokenizer_kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """tokenizer_kwargs as sorted, hashable items: part of a classifier's cache key."""
    if tokenizer_kwargs is None:
        return ()
    if not isinstance(tokenizer_kwargs, Mapping):
        raise TypeError(
            f"tokenizer_kwargs must be a dict of tokenizer options, got {type(tokenizer_kwargs).__name__}."
        )
    items = tuple(sorted(tokenizer_kwargs.items()))
    try:
        hash(items)
    except TypeError as error:
        raise TypeError(
            f"tokenizer_kwargs values must be hashable (they key the cache of class embeddings): {error}."
        ) from None
    check_tokenizer_kwargs(tokenizer_kwargs)
    return items


def _fetch_if_remote(image: Any, timeout: float | None) -> Any:
    """A URL or base64 string fetched and decoded by transformers' `load_image`; anything else (PIL images,
    file paths, arrays, tensors) goes to the image processor as it is. `load_image` converts to RGB and
    applies EXIF rotation, which would make the pipeline disagree with processor + model (and with OpenAI's
    preprocessing) on transparent, palette, 16-bit and rotated images."""
    if not isinstance(image, str) or os.path.exists(image):
        return image
    try:
        return load_image(image, timeout=timeout)
    except Exception as error:
        shown = image if len(image) <= 100 else image[:60] + "..."
        raise ValueError(
            f"Could not load the image {shown!r} ({type(error).__name__}: {error}); pass a PIL image, an "
            "existing file path, an array, or a reachable URL."
        ) from error


def register_pipelines() -> None:
    """Make `pipeline(ZERO_SHOT_TASK, model=...)` build `HfClipZeroShotImageClassificationPipeline`."""
    registered = PIPELINE_REGISTRY.supported_tasks.get(ZERO_SHOT_TASK, {})
    if registered.get("impl") is HfClipZeroShotImageClassificationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        ZERO_SHOT_TASK,
        pipeline_class=HfClipZeroShotImageClassificationPipeline,
        pt_model=AutoModelForZeroShotImageClassification,
        type="multimodal",
    )
    # register_pipeline marks the class as Hub custom code, which makes Pipeline.save_pretrained copy this
    # module and its relative imports next to the weights (it fails on `.._io`, and the copy could not be
    # imported on its own anyway) and write `custom_pipelines` into the model's config. The task is
    # registered by `import hf_clip`, so a saved pipeline needs only the model, tokenizer and image processor.
    if "_registered_impl" in vars(HfClipZeroShotImageClassificationPipeline):
        del HfClipZeroShotImageClassificationPipeline._registered_impl
