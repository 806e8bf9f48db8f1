"""Processor files (tokenizer + image processor) for a converted model directory.

Checkpoints carry weights only; the tokenizer is rebuilt from OpenAI's BPE merges file
(`bpe_simple_vocab_16e6.txt.gz`, shipped with open_clip or passed explicitly) and the image processor from
the model's input size, so the output directory is complete.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

from ..configuration_hf_clip import HfClipConfig
from ..image_processing_hf_clip import HfClipImageProcessor
from ..processing_hf_clip import HfClipProcessor
from ..tokenization_hf_clip import END_OF_TEXT, START_OF_TEXT, HfClipTokenizer
from .rules import ConversionError

__all__ = ["check_processor_vocabulary", "save_processor_files"]

_OPENAI_VOCAB_SIZE = 49408


def _transformers_tokenizer(openai: HfClipTokenizer, max_length: int):
    """transformers' `CLIPTokenizer` with the same vocabulary and merges (its special tokens are spelled
    `<|startoftext|>` / `<|endoftext|>`, which its word-splitting pattern hard-codes)."""
    from transformers import CLIPTokenizer

    model = json.loads(openai.backend_tokenizer.to_str())["model"]
    renamed = {START_OF_TEXT: "<|startoftext|>", END_OF_TEXT: "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in model["vocab"].items()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def check_processor_vocabulary(config: HfClipConfig) -> None:
    """The processor is built from OpenAI's BPE file, so the model must use that 49,408-token vocabulary."""
    if config.text_config.vocab_size != _OPENAI_VOCAB_SIZE:
        raise ConversionError(
            f"The model's vocabulary has {config.text_config.vocab_size} tokens, not OpenAI BPE's 49,408: no "
            "processor can be built from the BPE file. Convert with processor=False (CLI: --no-processor)."
        )


def save_processor_files(
    out_dir: str | PathLike,
    config: HfClipConfig,
    bpe_vocab: str | PathLike | None = None,
    flavour: str = "hf_clip",
) -> None:
    """Write the tokenizer and image processor next to the weights (`flavour`: "hf_clip" or "transformers")."""
    check_processor_vocabulary(config)
    if flavour not in ("hf_clip", "transformers"):
        raise ValueError(f"flavour={flavour!r}; use 'hf_clip' or 'transformers'.")
    size = config.vision_config.image_size
    max_length = config.text_config.max_position_embeddings
    tokenizer = HfClipTokenizer.from_openai_bpe(bpe_vocab, model_max_length=max_length)
    if flavour == "transformers":
        from transformers import CLIPImageProcessor, CLIPProcessor

        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        processor = CLIPProcessor(
            image_processor=image_processor, tokenizer=_transformers_tokenizer(tokenizer, max_length)
        )
    else:
        processor = HfClipProcessor(
            image_processor=HfClipImageProcessor.for_image_size(size), tokenizer=tokenizer
        )
    processor.save_pretrained(Path(out_dir))
