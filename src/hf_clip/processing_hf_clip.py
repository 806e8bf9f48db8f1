"""Processor for hf_clip: the tokenizer and the image processor behind one call.

`processor(text=..., images=..., return_tensors="pt", padding=True)` returns `input_ids`, `attention_mask`
and `pixel_values`, ready for `HfClipModel`. The module imports only its siblings so that `save_pretrained`
can copy it next to a checkpoint for `trust_remote_code=True` loading.
"""

# No `from __future__ import annotations`: transformers reads the kwargs TypedDict's annotations as classes.
from typing import Any

from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_processing_hf_clip import HfClipImageProcessor, HfClipImagesKwargs
from .tokenization_hf_clip import HfClipTokenizer


class HfClipProcessorKwargs(ProcessingKwargs, total=False):
    """Routes the image processor's own options (`fast_path`, `num_threads`) through the processor call."""

    images_kwargs: HfClipImagesKwargs


class HfClipProcessor(ProcessorMixin):
    """Wraps an `HfClipTokenizer` and an `HfClipImageProcessor` into a single processor.

    Text goes to the tokenizer and images to the image processor; either may be omitted. Keyword arguments
    are routed to whichever of the two accepts them (for example `padding` to the tokenizer, `fast_path`
    to the image processor; `return_tensors` to both).
    """

    valid_processor_kwargs = HfClipProcessorKwargs

    def __init__(
        self,
        image_processor: HfClipImageProcessor | None = None,
        tokenizer: HfClipTokenizer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)


__all__ = ["HfClipProcessor"]
