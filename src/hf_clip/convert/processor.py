"""Processor files (tokenizer + image processor) for a converted model directory.

Checkpoints carry weights only; the tokenizer is rebuilt from OpenAI's BPE merges file
(`bpe_simple_vocab_16e6.txt.gz`, shipped with open_clip or passed explicitly) and the image processor from
the model's input size, so the output directory is complete.
"""

from __future__ import annotations

import json
import logging
from os import PathLike
from pathlib import Path
from typing import Any

from transformers.image_utils import PILImageResampling

from ..configuration_hf_clip import HfClipConfig
from ..image_processing_hf_clip import HfClipImageProcessor
from ..processing_hf_clip import HfClipProcessor
from ..tokenization_hf_clip import END_OF_TEXT, START_OF_TEXT, HfClipTokenizer
from .rules import ConversionError

__all__ = [
    "check_open_clip_tokenizer",
    "check_processor_vocabulary",
    "image_settings",
    "model_folder_image_settings",
    "open_clip_preprocess",
    "save_processor_files",
]

logger = logging.getLogger(__name__)

_OPENAI_VOCAB_SIZE = 49408
# open_clip's interpolation names; "random" (a training option) resizes bicubic at inference, as open_clip does.
_RESAMPLE = {
    "bicubic": PILImageResampling.BICUBIC,
    "bilinear": PILImageResampling.BILINEAR,
    "random": PILImageResampling.BICUBIC,
}


def _three(value: Any, name: str, source: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise ConversionError(f"{source}: {name}={value!r} is not three numbers (one per RGB channel).")
    return [float(v) for v in values]


def image_settings(
    open_clip_preprocess: dict[str, Any] | None, source: str = "open_clip_config.json"
) -> dict:
    """Image-processor settings of an open_clip model (`preprocess_cfg` of its open_clip_config.json).

    open_clip models are not all preprocessed like OpenAI's: LAION's ViT-L/14 (laion2b_s32b_b82k) normalises
    with mean = std = 0.5, DFN's ViT-H/14 resizes the whole image to a square ("squash") instead of cropping
    it. "longest" (resize the long side and pad) has no hf_clip equivalent and is refused."""
    cfg = open_clip_preprocess or {}
    settings: dict[str, Any] = {}
    if "mean" in cfg:
        settings["image_mean"] = _three(cfg["mean"], "mean", source)
    if "std" in cfg:
        settings["image_std"] = _three(cfg["std"], "std", source)
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in _RESAMPLE:
        raise ConversionError(f"{source}: interpolation={interpolation!r} is not one of {sorted(_RESAMPLE)}.")
    settings["resample"] = _RESAMPLE[interpolation]
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode == "squash":
        settings["squash"] = True
    elif resize_mode != "shortest":
        raise ConversionError(
            f"{source}: resize_mode={resize_mode!r} (resize the longest side, then pad) has no equivalent in "
            "the image processor; convert without one (processor=False, CLI: --no-processor)."
        )
    return settings


def _saved_image_processor(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The image processor saved in a model folder (preprocessor_config.json, or the image_processor entry of
    processor_config.json) and its file, if there is one."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConversionError(f"{path} could not be read as JSON ({error}).") from error
        saved = saved.get(key) if key and isinstance(saved, dict) else saved
        if isinstance(saved, dict):
            return saved, path
    return None


def model_folder_image_settings(folder: Path) -> dict[str, Any]:
    """Image-processor settings saved in a transformers or hf_clip model folder (preprocessor_config.json, or
    the image_processor entry of processor_config.json), so that a round trip keeps them; OpenAI's if none."""
    found = _saved_image_processor(folder)
    if found is None:
        return {}
    saved, path = found
    settings: dict[str, Any] = {}
    for field in ("image_mean", "image_std"):
        if saved.get(field) is not None:
            settings[field] = _three(saved[field], field, str(path))
    if saved.get("resample") is not None:
        settings["resample"] = PILImageResampling(int(saved["resample"]))
    size = saved.get("size") or {}
    if saved.get("do_center_crop") is False and isinstance(size, dict) and {"height", "width"} <= set(size):
        settings["squash"] = True
    return settings


def _square(value: Any) -> int | None:
    """A saved size as one side: an int, or a dict with shortest_edge or equal height and width."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if value.get("shortest_edge") is not None:
            return int(value["shortest_edge"])
        if value.get("height") is not None and value.get("height") == value.get("width"):
            return int(value["height"])
    return None


def open_clip_preprocess(folder: Path | None, settings: dict[str, Any], image_size: int) -> dict[str, Any]:
    """open_clip's `preprocess_cfg` for `settings` (`image_settings` or `model_folder_image_settings`).

    open_clip's eval transform resizes (bicubic or bilinear) to the model's own input size, then centre crops
    to it ("shortest") or resizes the whole image to it ("squash"), converts to RGB, scales by 1/255 and
    normalises. A model folder's image processor that does otherwise (another resize or crop size, another
    filter, no rescaling or normalisation) is refused: open_clip would feed the model other pixels."""
    resample = settings.get("resample", PILImageResampling.BICUBIC)
    problems = []
    if resample not in (PILImageResampling.BICUBIC, PILImageResampling.BILINEAR):
        problems.append(f"resample={PILImageResampling(resample).name} (open_clip: bicubic or bilinear)")
    found = _saved_image_processor(folder) if folder is not None else None
    if found is not None:
        saved = found[0]
        if saved.get("do_resize") is False:
            problems.append("do_resize=False")
        elif (side := _square(saved.get("size"))) not in (None, image_size):
            problems.append(f"resizes to {side} px, not the model's {image_size}")
        if saved.get("do_center_crop", True) and (crop := _square(saved.get("crop_size"))) not in (
            None,
            image_size,
        ):
            problems.append(f"crops {crop} px, not the model's {image_size}")
        if (
            saved.get("do_rescale") is False
            or abs(float(saved.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12
        ):
            problems.append("pixels are not scaled by 1/255")
        if saved.get("do_normalize") is False:
            problems.append("do_normalize=False")
    if problems:
        raise ConversionError(
            f"The image processor does what open_clip's preprocessing cannot: {'; '.join(problems)}. Convert "
            "with processor=False (CLI: --no-processor) to write open_clip's defaults (OpenAI's) instead."
        )
    return {
        "mean": settings.get("image_mean", list(HfClipImageProcessor.image_mean)),
        "std": settings.get("image_std", list(HfClipImageProcessor.image_std)),
        "interpolation": "bilinear" if resample == PILImageResampling.BILINEAR else "bicubic",
        "resize_mode": "squash" if settings.get("squash") else "shortest",
    }


def check_open_clip_tokenizer(
    folder: Path | None, config: HfClipConfig, bpe_vocab: str | PathLike | None = None
) -> None:
    """open_clip tokenizes with OpenAI's BPE (its SimpleTokenizer) unless text_cfg names a Hugging Face
    tokenizer, loaded from the folder for `local-dir:` but from that Hub name for `hf-hub:`, and for hf_clip's
    tokenizer only with trust_remote_code: no config describes another vocabulary portably. So the model must
    use OpenAI's; a folder's saved tokenizer is compared with it entry for entry (a vocabulary trained by
    examples/pretrain.py is refused even at 49,408 tokens). Without one, the vocabulary size decides."""
    reason = None
    if config.text_config.vocab_size != _OPENAI_VOCAB_SIZE:
        reason = f"the model's vocabulary has {config.text_config.vocab_size} tokens, not OpenAI BPE's 49,408"
    elif folder is not None and (folder / "tokenizer.json").is_file():
        saved = json.loads((folder / "tokenizer.json").read_text()).get("model", {})
        openai = json.loads(HfClipTokenizer.from_openai_bpe(bpe_vocab).backend_tokenizer.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved.get("merges", [])]
        # Up to <start_of_text> and <end_of_text>, which transformers' tokenizer spells otherwise.
        specials = _OPENAI_VOCAB_SIZE - 2
        vocab = {token: index for token, index in saved.get("vocab", {}).items() if index < specials}
        if merges != [tuple(m) for m in openai["merges"]] or vocab != {
            token: index for token, index in openai["vocab"].items() if index < specials
        }:
            reason = f"its tokenizer ({folder / 'tokenizer.json'}) is not OpenAI's BPE vocabulary"
    elif folder is not None and (folder / "config.json").is_file():
        logger.warning(
            "%s saves no tokenizer.json: taking its 49,408-token vocabulary for OpenAI's BPE.", folder
        )
    if reason is not None:
        raise ConversionError(
            f"open_clip would tokenize captions with OpenAI's BPE vocabulary, but {reason}: the text embeddings "
            "would be computed from the wrong token ids. Keep this model in hf_clip's format."
        )


def _image_kwargs(size: int, settings: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in settings.items() if k != "squash"}
    if settings.get("squash"):  # open_clip's Resize((size, size)): the whole image, no crop
        return {**kwargs, "size": {"height": size, "width": size}, "do_center_crop": False}
    return {**kwargs, "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}


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
    image: dict[str, Any] | None = None,
) -> None:
    """Write the tokenizer and image processor next to the weights (`flavour`: "hf_clip" or "transformers").

    `image`: settings from `image_settings` (mean, std, resampling, squash); OpenAI's by default."""
    check_processor_vocabulary(config)
    if flavour not in ("hf_clip", "transformers"):
        raise ValueError(f"flavour={flavour!r}; use 'hf_clip' or 'transformers'.")
    size = config.vision_config.image_size
    max_length = config.text_config.max_position_embeddings
    tokenizer = HfClipTokenizer.from_openai_bpe(bpe_vocab, model_max_length=max_length)
    if flavour == "transformers":
        from transformers import CLIPImageProcessor, CLIPProcessor

        image_processor = CLIPImageProcessor(**_image_kwargs(size, image or {}))
        processor = CLIPProcessor(
            image_processor=image_processor, tokenizer=_transformers_tokenizer(tokenizer, max_length)
        )
    else:
        processor = HfClipProcessor(
            image_processor=HfClipImageProcessor(**_image_kwargs(size, image or {})), tokenizer=tokenizer
        )
    processor.save_pretrained(Path(out_dir))
