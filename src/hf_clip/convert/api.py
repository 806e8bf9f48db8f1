"""Convert a CLIP checkpoint into a complete hf_clip model directory, or an hf_clip model into transformers' or
open_clip's.

Sources: OpenAI's TorchScript archives (read without executing them), OpenAI / open_clip state dicts
(``.pt``/``.bin``/``.pth`` via ``torch.load(weights_only=True)``, or ``.safetensors``), transformers
``CLIPModel`` directories and hf_clip directories. Every tensor is accounted for: missing, unexpected or
mis-shaped tensors raise `ConversionError` naming them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel
from transformers.initialization import no_init_weights

from .._io import give_open_modes, umask
from ..configuration_hf_clip import ACTIVATIONS, HfClipConfig
from ..modeling_hf_clip import HfClipModel
from ..tokenization_hf_clip import _find_openai_bpe
from .download import resolve_source
from .infer import detect_layout, infer_openai_config, infer_transformers_config
from .loading import load_state_dict_file
from .open_clip_config import (
    OPEN_CLIP_CONFIG,
    apply_open_clip_config,
    find_open_clip_config,
    find_open_clip_preprocess,
    open_clip_activation,
    open_clip_model_cfg,
    open_clip_weights_file,
)
from .openai import OPENAI_EXTRA_KEYS, openai_rules
from .processor import (
    check_open_clip_tokenizer,
    check_processor_vocabulary,
    image_settings,
    model_folder_image_settings,
    open_clip_preprocess,
    save_processor_files,
)
from .rules import ConversionError, apply_rules, check_shapes, invert_rules
from .transformers import (
    TRANSFORMERS_EXTRA_KEYS,
    config_from_transformers,
    config_to_transformers,
    transformers_rules,
)

__all__ = ["convert_checkpoint", "load_hf_clip_state_dict"]

logger = logging.getLogger(__name__)

_TARGETS = ("hf_clip", "transformers", "open_clip")
# The first weights file open_clip's local-dir and hf-hub loads look for.
_OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _load_directory_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Weights of a save_pretrained directory: one file, or shards listed in an index json."""
    for name in _WEIGHT_FILES:
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state_dict: dict[str, torch.Tensor] = {}
            for shard in shards:
                state_dict.update(load_state_dict_file(directory / shard))
            return state_dict
        if (directory / name).is_file():
            return load_state_dict_file(directory / name)
    raise FileNotFoundError(f"{directory} has no {' or '.join(_WEIGHT_FILES)} (or sharded index).")


def _load_source(src: Path) -> tuple[dict[str, torch.Tensor], HfClipConfig | CLIPConfig | None]:
    if not src.is_dir():
        return load_state_dict_file(src), None
    config_file = src / "config.json"
    if not config_file.is_file() and (src / OPEN_CLIP_CONFIG).is_file():  # an open_clip Hub folder
        return load_state_dict_file(open_clip_weights_file(src)), None
    if not config_file.is_file():
        raise FileNotFoundError(f"{src} is a directory without config.json; pass a checkpoint file instead.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == "clip":
        config: HfClipConfig | CLIPConfig = CLIPConfig.from_pretrained(src)
    elif model_type == HfClipConfig.model_type:
        config = HfClipConfig.from_pretrained(src)
        config.check_has_text_tower("conversion to a CLIP checkpoint")
    else:
        raise ConversionError(
            f"{src} holds a '{model_type}' model; expected 'clip' (transformers) or 'hf_clip'."
        )
    return _load_directory_weights(src), config


def _model_folder_of(src: Path, config: object = None) -> Path:
    """A model folder's own weights file stands for the folder: its config.json names the heads and activation
    (guessed from shapes otherwise) and its image processor the preprocessing (OpenAI's otherwise). Not when
    the caller names the architecture (`config`)."""
    config_file = src.parent / "config.json"
    if config is None and src.is_file() and src.name in _WEIGHT_FILES and config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return src
        if model_type in ("clip", HfClipConfig.model_type):
            logger.info(
                "%s is the weights file of the model folder %s: converting the folder.", src, src.parent
            )
            return src.parent
    return src


def _set_activation(config: HfClipConfig, activation: str) -> None:
    config.text_config.hidden_act = activation
    config.vision_config.hidden_act = activation


def _config_file(path: Path) -> HfClipConfig:
    """An hf_clip config.json, or a transformers one (translated: its legacy eos_token_id=2 means "pool at
    the highest id", which read as an hf_clip config would pool at token 2); a folder stands for its config."""
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--config (config=): no config file at {path}.")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"--config (config=): {path} is not a JSON config ({error}).") from error
    if model_type == "clip":
        return config_from_transformers(CLIPConfig.from_json_file(path))
    if model_type not in (None, HfClipConfig.model_type):
        raise ConversionError(f"--config (config=): {path} describes a '{model_type}' model, not a CLIP.")
    return HfClipConfig.from_json_file(path)


def _given_config(config: HfClipConfig | str, activation: str | None = None) -> HfClipConfig:
    if isinstance(config, HfClipConfig):
        return config
    path = Path(config).expanduser()
    if str(config).endswith(".json") or (path / "config.json").is_file():
        return _config_file(path)
    try:
        preset = HfClipConfig.from_preset(config)
    except ValueError:
        if path.is_dir():  # a folder without config.json: say so rather than "unknown preset"
            return _config_file(path)
        raise
    if activation is None and "/" not in str(config) and not str(config).endswith("-quickgelu"):
        if preset.vision_config.hidden_act == "quick_gelu":
            logger.warning(
                "--config %s: hf_clip's preset is OpenAI's model, with QuickGELU; open_clip's config of that "
                "name uses exact GELU (its QuickGELU one is '%s-quickgelu'). Pass --gelu if the checkpoint "
                "was trained with GELU.",
                config,
                config,
            )
    return preset


def _refuse_second_config(config: object, src: Path) -> None:
    if config is not None:
        raise ValueError(
            f"{src} comes with its own config.json, which describes it; --config (config=) is for files that "
            "do not (OpenAI / open_clip state dicts, bare weights). Leave it out."
        )


def load_hf_clip_state_dict(
    src: str | PathLike,
    activation: str | None = None,
    config: HfClipConfig | str | None = None,
    revision: str | None = None,
) -> tuple[dict[str, torch.Tensor], HfClipConfig]:
    """Read any supported checkpoint and return its weights under hf_clip names, with the matching config.

    `activation` ("quick_gelu" or "gelu") overrides the config. An open_clip_config.json in the folder or
    beside the file supplies activation, heads and end-of-text id (and refuses variants hf_clip does not
    compute). Without any config file (OpenAI / open_clip checkpoints) sizes that are a preset's take its
    head counts and activation (LAION's ViT-H/g/bigG: 16 heads, GELU); other sizes get heads of
    width // 64 and "quick_gelu", the activation of OpenAI's released weights. Where that is wrong, name the architecture with `config`: an `HfClipConfig`, a preset name
    ("ViT-H-14") or a config.json path; the weights are then checked against it. `src` may be a Hub repository
    id (`revision`: its branch, tag or commit): see `download.resolve_source`.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; use one of {ACTIVATIONS}.")
    src = _model_folder_of(resolve_source(src, revision), config)
    state_dict, source_config = _load_source(src)
    layout = detect_layout(state_dict)
    what = f"{layout} checkpoint {src.name}"
    if layout == "openai":
        if config is not None:
            config = _given_config(config, activation)
        elif (model_cfg := find_open_clip_config(src)) is not None:
            activation = activation or open_clip_activation(model_cfg)  # set on both towers below
            config = apply_open_clip_config(infer_openai_config(state_dict, activation), model_cfg, src)
        else:
            config = infer_openai_config(state_dict, activation)
        state_dict = apply_rules(state_dict, openai_rules(config), OPENAI_EXTRA_KEYS, what)
    elif layout == "transformers":
        if isinstance(source_config, CLIPConfig):
            _refuse_second_config(config, src)
            config = config_from_transformers(source_config)
        elif config is not None:
            config = _given_config(config)
        else:
            config = infer_transformers_config(state_dict, activation)
        state_dict = apply_rules(state_dict, transformers_rules(config), TRANSFORMERS_EXTRA_KEYS, what)
    else:
        if not isinstance(source_config, HfClipConfig):
            raise ConversionError(f"{src} holds hf_clip weights without a config: pass its model directory.")
        _refuse_second_config(config, src)
        config = source_config
    if activation is not None:
        _set_activation(config, activation)
    with torch.device("meta"):
        expected = HfClipModel(config).state_dict()
    check_shapes(state_dict, expected, what)
    return state_dict, config


def _source_image_settings(src: Path) -> dict:
    """The preprocessing the source states: a model folder's saved image processor, or an open_clip source's
    open_clip_config.json (a folder without config.json, or beside a weights file); OpenAI's otherwise."""
    if src.is_dir() and (src / "config.json").is_file():
        return model_folder_image_settings(src)
    preprocess = find_open_clip_preprocess(src)
    return image_settings(preprocess, str((src if src.is_dir() else src.parent) / OPEN_CLIP_CONFIG))


def _open_clip_files(
    src: Path, config: HfClipConfig, bpe_vocab: str | PathLike | None, processor: bool
) -> dict:
    """open_clip_config.json's content, checked before anything is written: open_clip's CLIP must compute the
    model, its tokenizer (OpenAI's BPE) must be the model's, and its preprocessing the image processor's."""
    model_cfg = open_clip_model_cfg(config)
    folder = src if src.is_dir() else None
    check_open_clip_tokenizer(folder, config, bpe_vocab)
    preprocess: dict = {}
    if processor:
        model_folder = folder if folder is not None and (folder / "config.json").is_file() else None
        preprocess = open_clip_preprocess(
            model_folder, _source_image_settings(src), config.vision_config.image_size
        )
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def _write_open_clip(
    out: Path, state_dict: dict[str, torch.Tensor], config: HfClipConfig, files: dict
) -> None:
    """The two files open_clip's `local-dir:` and `hf-hub:` loads read; weights under OpenAI's (= open_clip's
    CLIP) names, written back through the same rules that read them."""
    weights = invert_rules(state_dict, openai_rules(config))
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, out / _OPEN_CLIP_WEIGHTS, metadata={"format": "pt"}
    )
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(files, indent=2) + "\n")


def _build(model_class: type, config: object, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Instantiate without random initialisation (every weight is overwritten) and load strictly."""
    with no_init_weights():
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _prepare_output(out_dir: Path, overwrite: bool, src: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory.")
    source = src.expanduser().resolve()
    if src.expanduser().exists() and (source == out_dir or out_dir in source.parents):
        # Replacing OUT_DIR's contents would delete the checkpoint being converted (and its open_clip config).
        raise FileExistsError(
            f"{src} is inside the output directory {out_dir}, whose contents the conversion replaces: "
            "write the model to another directory."
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} is not empty; choose a new directory or pass overwrite=True (CLI: --overwrite)."
        )


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished files into place, so a crash never leaves a half-written model behind.

    A new directory is renamed into place whole (with the mode `mkdir` would give it, not `mkdtemp`'s 0700).
    An existing one keeps its inode and mode (it may be the shell's working directory, or shared): its old
    entries are moved aside, the new ones moved in, and on any failure the old ones are put back."""
    if not out_dir.exists():
        tmp.chmod(0o777 & ~umask())
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for entry in list(out_dir.iterdir()):
            os.replace(entry, old / entry.name)
            moved_out.append(entry.name)
        for entry in list(tmp.iterdir()):
            os.replace(entry, out_dir / entry.name)
            moved_in.append(entry.name)
    except BaseException:
        for name in moved_in:
            os.replace(out_dir / name, tmp / name)
        for name in moved_out:
            os.replace(old / name, out_dir / name)
        old.rmdir()
        raise
    shutil.rmtree(old)
    tmp.rmdir()


def convert_checkpoint(
    src: str | PathLike,
    out_dir: str | PathLike,
    to: str = "hf_clip",
    bpe_vocab: str | PathLike | None = None,
    activation: str | None = None,
    overwrite: bool = False,
    processor: bool = True,
    config: HfClipConfig | str | None = None,
    revision: str | None = None,
) -> Path:
    """Convert `src` and write a complete model directory (config, safetensors weights, processor) to `out_dir`.

    to="hf_clip" writes an `HfClipModel` directory; to="transformers" a transformers `CLIPModel` one (ViT
    only); to="open_clip" an open_clip folder (open_clip_config.json + open_clip_model.safetensors) that
    `open_clip.create_model_and_transforms("local-dir:OUT")` loads: only for models with OpenAI's vocabulary
    (open_clip's tokenizer), with the source's image preprocessing (open_clip's defaults, OpenAI's, with
    `processor=False`). The processor files are built from the OpenAI BPE vocabulary (`bpe_vocab`, by default
    the copy shipped with open_clip) and the model's input size; `processor=False` skips them (needed when the
    vocabulary is not OpenAI's). `activation` overrides the activation ("quick_gelu" is assumed for
    OpenAI / open_clip checkpoints, whose files do not record it). An existing non-empty `out_dir` is only
    replaced with `overwrite=True`. `config` (an `HfClipConfig`, preset name or config.json) names the
    architecture where shapes cannot tell it (head counts). `src` may also be a Hub repository id
    ("openai/clip-vit-base-patch32", "hf-hub:laion/..."; `revision` picks its branch, tag or commit): only
    the files of one convertible copy are downloaded.
    """
    if to not in _TARGETS:
        raise ValueError(f"to={to!r}; use one of {_TARGETS}.")
    out_dir = Path(out_dir).expanduser().resolve()  # "." has no name to publish under, nor a real parent
    _prepare_output(out_dir, overwrite, Path(src))  # before any download
    src = _model_folder_of(resolve_source(src, revision), config)
    state_dict, config = load_hf_clip_state_dict(src, activation, config)
    # What CLIPModel cannot hold (a ResNet tower) is refused before any processor check.
    clip_config = config_to_transformers(config) if to == "transformers" else None
    if to == "transformers" and "logit_bias" in state_dict:
        raise ConversionError(
            f"{src} has a logit bias (trained with the sigmoid loss), which transformers' CLIPModel lacks: "
            "its logits would be wrong. Keep it in hf_clip's format."
        )
    open_clip_files = _open_clip_files(src, config, bpe_vocab, processor) if to == "open_clip" else None
    if processor and open_clip_files is None:
        check_processor_vocabulary(config)
        image = _source_image_settings(src)
        # A missing vocabulary file is reported before any weights are written.
        if bpe_vocab is None:
            _find_openai_bpe()
        elif not Path(bpe_vocab).expanduser().is_file():
            raise FileNotFoundError(f"BPE vocabulary not found: {bpe_vocab} (--bpe-vocab).")
    if clip_config is not None:
        model = _build(CLIPModel, clip_config, invert_rules(state_dict, transformers_rules(config)))
    elif open_clip_files is None:
        model = _build(HfClipModel, config, state_dict)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp."))
    try:
        if open_clip_files is not None:
            _write_open_clip(tmp, state_dict, config, open_clip_files)
        else:
            model.save_pretrained(tmp)
        if processor and open_clip_files is None:
            save_processor_files(tmp, config, bpe_vocab, flavour=to, image=image)
        give_open_modes(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote %s model to %s", to, out_dir)
    return out_dir
