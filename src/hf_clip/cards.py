"""Model cards for the paper's nine CLIP models, rendered from one template and per-model facts.

The committed cards in `model_cards/` are the output of `render_card(name)` (a test keeps them equal), and
`hf-clip card --model DIR --results ...` renders the same card with measured results added: a
`model-index` entry per measured metric and the bias section written from the measured numbers.
Published figures are always attributed to the paper; figures the project has not checked against the
paper are labelled unverified and kept out of `model-index`. A model trained with examples/pretrain.py
gets the card of its own run instead (`render_training_card`), whatever its architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from ._io import atomic_write_text
from .configuration_hf_clip import HfClipConfig, resolve_preset_name

PAPER_URL = "https://arxiv.org/abs/2103.00020"
PAPER_SOURCE = "Radford et al. (2021), Learning Transferable Visual Models From Natural Language Supervision"
TEMPLATE_NAME = "model_card_template.md"
CARD_TAGS = ["clip", "zero-shot-image-classification", "vision", "hf_clip"]


@dataclass(frozen=True)
class PaperModel:
    """Facts of one released model that the config cannot tell: its size and published ImageNet figure."""

    name: str  # open_clip spelling, also the card's file name
    preset: str  # hf_clip preset / OpenAI spelling
    params_m: float
    imagenet_zero_shot: float
    imagenet_verified: bool


# Parameter counts and ImageNet zero-shot top-1 (%) from the paper, via /shared/reference/paper-facts.md; the
# four ResNet figures are marked there as not yet checked against the paper.
PAPER_MODELS: dict[str, PaperModel] = {
    m.name: m
    for m in (
        PaperModel("RN50", "RN50", 102.0, 59.6, False),
        PaperModel("RN101", "RN101", 119.7, 62.2, False),
        PaperModel("RN50x4", "RN50x4", 178.3, 65.8, False),
        PaperModel("RN50x16", "RN50x16", 291.0, 70.5, False),
        PaperModel("RN50x64", "RN50x64", 623.3, 73.6, True),
        PaperModel("ViT-B-32", "ViT-B/32", 151.3, 63.2, True),
        PaperModel("ViT-B-16", "ViT-B/16", 149.6, 68.6, True),
        PaperModel("ViT-L-14", "ViT-L/14", 427.6, 75.3, True),
        PaperModel("ViT-L-14-336", "ViT-L/14@336px", 427.9, 76.2, True),
    )
}

# How each evaluation task (EvalResult.task) is filed in model-index.
_TASKS = {
    "zero-shot": ("zero-shot-image-classification", "Zero-shot image classification"),
    "robustness": ("zero-shot-image-classification", "Zero-shot classification under distribution shift"),
    "linear-probe": ("image-classification", "Linear probe on frozen image features"),
    "retrieval": ("image-text-retrieval", "Zero-shot image-text retrieval"),
    "bias": ("zero-shot-image-classification", "Zero-shot demographic classification (bias probe)"),
}


def paper_model(name: str) -> PaperModel:
    """The paper model for an OpenAI ("ViT-B/32") or open_clip ("ViT-B-32") spelling."""
    preset, _ = resolve_preset_name(name)
    for model in PAPER_MODELS.values():
        if model.preset == preset:
            return model
    raise ValueError(
        f"{name!r} is not one of the paper's nine models ({', '.join(PAPER_MODELS)}); cards describe only those, "
        "because their text quotes the paper's training data and published results."
    )


def _template() -> string.Template:
    return string.Template(resources.files("hf_clip").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8"))


def _architecture(config: HfClipConfig) -> dict[str, Any]:
    vision, text = config.vision_config, config.text_config
    if vision.vision_type == "resnet":
        image_tower = (
            f"modified ResNet, stages {list(vision.resnet_layers)}, stem width {vision.hidden_size}, "
            f"attention pooling with {vision.num_attention_heads} heads"
        )
        notes = (
            "The ResNet differs from torchvision's ResNet-D: a three-convolution stem with an average pool "
            "instead of a max pool; anti-aliased strided blocks (an average pool before the stride-1 3x3 "
            "convolution; the downsample branch is average pool + 1x1 convolution + batch norm); and attention "
            "pooling instead of global average pooling: one multi-head attention layer whose query is the mean "
            "of the spatial tokens, with its own positional embedding."
        )
    else:
        image_tower = (
            f"Vision Transformer, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
            f"{vision.num_attention_heads} heads, patch {vision.patch_size}"
        )
        notes = (
            "The ViT embeds patches with a bias-free convolution, prepends a class token, adds a learned positional "
            "embedding and applies an extra LayerNorm before the transformer (`ln_pre`); the class token's output "
            "is normalised and linearly projected (no bias) into the joint space."
        )
    return {
        "image_tower": image_tower,
        "image_size": vision.image_size,
        "text_layers": text.num_hidden_layers,
        "text_width": text.hidden_size,
        "text_heads": text.num_attention_heads,
        "embed_dim": config.projection_dim,
        "vocab_size": f"{text.vocab_size:,}",
        "context_length": text.max_position_embeddings,
        "architecture_notes": notes,
    }


# ----------------------------------------------------------------------------------------------------------
# Results -> model-index


def load_results(path: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """A results JSON written by hf_clip.evaluation (keys dataset, model, task, metrics); with `model_dir`, an
    error when the file records another model folder (see `_check_evaluated_model`)."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    missing = [k for k in ("dataset", "model", "task", "metrics") if k not in result]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}; pass results files written by `hf-clip eval ...` (they hold dataset, "
            "model, task and metrics)."
        )
    if result["task"] not in _TASKS:
        raise ValueError(f"{path}: unknown task {result['task']!r}; cards know {sorted(_TASKS)}.")
    if model_dir is not None:
        _check_evaluated_model(result, path, Path(model_dir))
    return result


def _same_model_folder(a: Path, b: Path) -> bool:
    """The same folder, or a copy of it: equal config.json (up to what `hf-clip push` and the saving version
    add) and weights of equal size."""
    if a.resolve() == b.resolve():
        return True
    try:
        configs = [json.loads((d / "config.json").read_text(encoding="utf-8")) for d in (a, b)]
        for config in configs:
            config.pop("auto_map", None)
            config.pop("transformers_version", None)
        sizes = [(d / "model.safetensors").stat().st_size for d in (a, b)]
    except (OSError, ValueError):
        return False
    return configs[0] == configs[1] and sizes[0] == sizes[1]


def _check_evaluated_model(result: dict[str, Any], path: str | os.PathLike, model_dir: Path) -> None:
    """Refuse results of another model: `hf-clip eval` writes every model's results to the same default
    --output_dir under names without the model (zero-shot_cifar10.json), so `--results eval_results/*.json`
    can hold another model's numbers, which the card would present as measured on this checkpoint. The file
    records the --model it was run with; a folder that no longer exists there (moved, or evaluated from
    another working directory) cannot be checked and is accepted."""
    evaluated = Path(str(result["model"])).expanduser()
    if evaluated.is_dir() and not _same_model_folder(evaluated, model_dir):
        raise ValueError(
            f"{path} holds results of the model in {result['model']}, not of {model_dir}; pass only results of "
            "this model (give each model its own `hf-clip eval --output_dir`)."
        )


def _metric_name(key: str) -> str:
    match = re.fullmatch(r"top(\d+)_accuracy", key)
    if match:
        return f"Top-{match.group(1)} accuracy"
    return key.replace("_", " ").capitalize()


def _model_index_metrics(result: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(dataset, metrics) pairs to file; bias runs contribute only their classification accuracies."""
    if result.get("per_dataset"):
        return list(result["per_dataset"].items())
    metrics = result["metrics"]
    if result["task"] == "bias":
        metrics = {k: v for k, v in metrics.items() if k.endswith("_accuracy")}
    return [(result["dataset"], metrics)]


def _dataset_type(name: str) -> str:
    """A dataset id for model-index: a Hub id as is, a local path by its folder or file name."""
    name = str(name).rstrip("/")
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        name = Path(name).name
    return re.sub(r"[^A-Za-z0-9._/-]+", "-", name) or "dataset"


def _split_and_cut(result: dict[str, Any]) -> tuple[str | None, int | None]:
    """The split a result was measured on and its ``--max_samples`` cut (None when it used every row)."""
    config = result.get("config") or {}
    split = config.get("split", result.get("split"))
    cut = config.get("max_samples", result.get("max_samples"))
    return (str(split) if split else None), (int(cut) if cut is not None else None)


def _measured_by(result: dict[str, Any]) -> str:
    _, cut = _split_and_cut(result)
    return "measured with hf_clip" + (f" on the first {cut} examples only" if cut is not None else "")


def measured_eval_results(results: Sequence[dict[str, Any]]) -> list[EvalResult]:
    """model-index entries for measured metrics (percentages, like the paper's figures), filed under the split
    they were measured on; a ``--max_samples`` run says so in its metric names.

    The Hub files results by task type, dataset and split, so a zero-shot run and a robustness run that used
    the same dataset as its reference share one entry: a metric both measured with the same value is listed
    once."""
    entries = []
    seen = set()
    for result in results:
        task_type, task_name = _TASKS[result["task"]]
        split, _ = _split_and_cut(result)
        for dataset, metrics in _model_index_metrics(result):
            for key, value in metrics.items():
                if not isinstance(value, (int, float)) or value != value:  # skip NaN and non-numbers
                    continue
                name, percent = f"{_metric_name(key)} ({_measured_by(result)})", round(100 * float(value), 2)
                identity = (task_type, _dataset_type(dataset), split, key, name, percent)
                if identity in seen:
                    continue
                seen.add(identity)
                entries.append(
                    EvalResult(
                        task_type=task_type,
                        task_name=task_name,
                        dataset_type=_dataset_type(dataset),
                        dataset_name=str(dataset),
                        dataset_split=split,
                        metric_type=key,
                        metric_name=name,
                        metric_value=percent,
                    )
                )
    return entries


def paper_eval_results(model: PaperModel) -> list[EvalResult]:
    """The paper's ImageNet zero-shot figure, attributed to the paper; empty while it is unverified."""
    if not model.imagenet_verified:
        return []
    return [
        EvalResult(
            task_type="zero-shot-image-classification",
            task_name="Zero-shot image classification",
            dataset_type="imagenet-1k",
            dataset_name="ImageNet-1k",
            dataset_split="validation",
            metric_type="accuracy",
            metric_name="Top-1 accuracy (published in the paper)",
            metric_value=model.imagenet_zero_shot,
            source_name=PAPER_SOURCE,
            source_url=PAPER_URL,
        )
    ]


def _metadata(model: PaperModel, results: Sequence[dict[str, Any]]) -> str:
    eval_results = paper_eval_results(model) + measured_eval_results(results)
    data = ModelCardData(
        license="mit",
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        language="en",
        tags=CARD_TAGS,
        model_name=f"clip-{model.name.lower()}" if eval_results else None,
        eval_results=eval_results or None,
    )
    return "---\n" + data.to_yaml() + "\n---"


def _measured_section(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for result in results:
        if result["task"] == "bias":
            continue
        split, cut = _split_and_cut(result)
        where = (f" ({split} split)" if split else "") + (
            f", first {cut} examples" if cut is not None else ""
        )
        for dataset, metrics in _model_index_metrics(result):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and value == value:
                    rows.append(
                        f"| {result['task']} | {dataset}{where} | {_metric_name(key)} | {100 * float(value):.2f} |"
                    )
    if not rows:
        return ""
    return (
        "### Measured with hf_clip\n\nMeasured on this checkpoint with `hf-clip eval` (percentages):\n\n"
        "| Task | Dataset | Metric | Value |\n|---|---|---|---:|\n" + "\n".join(rows)
    )


def _bias_section(results: Sequence[dict[str, Any]]) -> str:
    from .evaluation.bias import bias_card_section

    sections = [bias_card_section(r) for r in results if r["task"] == "bias"]
    return "\n\n".join(["### Measured on this checkpoint", *sections]) if sections else ""


def render_card(preset_name: str, results: Sequence[dict[str, Any]] | None = None) -> str:
    """The model card of one of the paper's nine models, with measured `results` (loaded results dicts) added."""
    model = paper_model(preset_name)
    results = list(results or [])
    config = HfClipConfig.from_preset(model.preset)
    verified = model.imagenet_verified
    figure = f"{model.imagenet_zero_shot:.1f}%" + ("" if verified else " (unverified)")
    note = (
        ""
        if verified
        else "The figure marked unverified was transcribed from the paper but has not yet been checked against "
        "it by this project, so it is left out of the card's machine-readable `model-index`."
    )
    values = {
        "name": model.name,
        "openai_name": model.preset,
        "params_m": f"{model.params_m:.1f}",
        "metadata": _metadata(model, results),
        "paper_imagenet": figure,
        "paper_imagenet_note": note,
        "training_note": (
            " This model received one extra epoch at 336 px after training at 224 px."
            if "336" in model.preset
            else ""
        ),
        "measured_section": _measured_section(results),
        "bias_section": _bias_section(results),
        **_architecture(config),
    }
    text = _template().substitute(values)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------------------
# Cards of models trained with hf_clip's pretraining

TRAINING_RECORD = "hf_clip_pretraining"  # the config attribute examples/pretrain.py writes


def training_record(config: HfClipConfig) -> dict[str, Any] | None:
    """How examples/pretrain.py trained this model (its config records it), or None for other models."""
    record = getattr(config, TRAINING_RECORD, None)
    return record if isinstance(record, dict) else None


def _training_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    data = record.get("dataset") or "hf_clip's built-in synthetic shapes (hf_clip.data)"
    if record.get("dataset_config"):
        data += f" ({record['dataset_config']})"
    if record.get("data_files"):
        data += f", files `{record['data_files']}`"
    batch = (
        f"{record['global_batch_size']:,} ({record['num_processes']} process(es) x "
        f"{record['per_device_batch_size']} x {record['gradient_accumulation_steps']} accumulated)"
    )
    rows = [
        ("Initialisation", record["init"]),
        ("Data", f"{data}, split `{record.get('train_split', 'train')}`"),
        (
            "Steps",
            f"{record['steps']:,} ({record['steps'] * record['global_batch_size']:,} image-text pairs)",
        ),
        ("Global batch", batch),
        (
            "Optimiser",
            f"AdamW, learning rate {record['learning_rate']:g}, weight decay {record['weight_decay']:g}, "
            f"{record['warmup_steps']} warm-up steps, cosine decay",
        ),
        ("Loss", "sigmoid (SigLIP)" if record["loss"] == "siglip" else "symmetric contrastive (InfoNCE)"),
        (
            "Precision",
            {"no": "fp32"}.get(record["mixed_precision"], f"{record['mixed_precision']} mixed precision"),
        ),
        ("Seed", str(record["seed"])),
    ]
    if record.get("patch_dropout"):
        rows.append(("Patch dropout", f"{record['patch_dropout']:g} of the patch tokens (FLIP)"))
    locked = record.get("locked_towers") or {}
    for tower, lock in locked.items():
        rows.append((f"Locked {tower} tower (LiT)", _lock_description(tower, lock)))
    if locked and record.get("trainable_parameters") is not None:
        rows.append(
            ("Trainable parameters", f"{record['trainable_parameters']:,} of {record['parameters']:,}")
        )
    return rows


def _lock_description(tower: str, lock: dict[str, Any]) -> str:
    groups, unlocked = lock["groups"], lock["unlocked_groups"]
    if unlocked:
        text = (
            f"its first {groups - unlocked} of {groups} parameter groups kept at their initial weights, "
            f"the last {unlocked} trained"
        )
    else:
        text = f"kept at its initial weights (all {groups} parameter groups)"
    if tower == "image" and lock.get("freeze_bn_stats"):
        text += "; BatchNorm statistics frozen"
    if tower == "text" and lock.get("freeze_layer_norm") is False:
        text += "; its LayerNorm gains and biases trained"
    return text


def _table(rows: Sequence[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    return f"| {header[0]} | {header[1]} |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def render_training_card(
    config: HfClipConfig,
    run_metrics: dict[str, float] | None = None,
    results: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The card of a model trained with hf_clip's pretraining: its data, recipe, architecture and the results
    measured on it. None of the paper's data, figures or analyses are claimed for it, whatever its size (a
    ViT-B/32 trained on one's own data is not OpenAI's)."""
    record = training_record(config)
    if record is None:
        raise ValueError("This model has no record of hf_clip pretraining; use render_card for paper models.")
    results = list(results or [])
    dataset = record.get("dataset")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=CARD_TAGS,
        datasets=[dataset] if dataset and re.fullmatch(r"[\w.-]+/[\w.-]+", dataset) else None,
        model_name="hf_clip-pretrained" if results else None,
        eval_results=measured_eval_results(results) or None,
    )
    arch = _architecture(config)
    parts = [
        "---\n" + data.to_yaml() + "\n---",
        "<!-- Generated by hf_clip.cards.render_training_card from the training record in config.json. -->",
        "# CLIP model trained with hf_clip",
        "A dual image-text encoder trained with the contrastive recipe of Radford et al. (2021), *Learning "
        f"Transferable Visual Models From Natural Language Supervision* ([arXiv:2103.00020]({PAPER_URL})), "
        "using hf_clip's `examples/pretrain.py`. It is **not** one of OpenAI's released CLIP models: its "
        "abilities and biases are those of the data below, and no figure from the paper applies to it.",
        "## Training\n\nAs recorded in `config.json` by `examples/pretrain.py` at the end of its run (training "
        "with other tools afterwards is not recorded).\n\n" + _table(_training_rows(record)),
        "## Architecture\n\n"
        + _table(
            [
                ("Image encoder", arch["image_tower"]),
                ("Input resolution", f"{arch['image_size']} x {arch['image_size']} px"),
                (
                    "Text encoder",
                    f"causal Transformer, {arch['text_layers']} layers, width {arch['text_width']}, "
                    f"{arch['text_heads']} heads",
                ),
                ("Joint embedding dimension", str(arch["embed_dim"])),
                (
                    "Vocabulary / context",
                    f"{arch['vocab_size']} BPE tokens / {arch['context_length']} tokens",
                ),
                (
                    "Activation (image / text)",
                    f"{config.vision_config.hidden_act} / {config.text_config.hidden_act}",
                ),
            ]
        ),
    ]
    if run_metrics:
        rows = [(key, f"{100 * float(value):.1f}%") for key, value in sorted(run_metrics.items())]
        parts.append("## Held-out results of the training run\n\n" + _table(rows, ("Metric", "Value")))
    measured, bias = _measured_section(results), _bias_section(results)
    if measured or bias:
        parts.append("\n\n".join(["## Evaluation", *(section for section in (measured, bias) if section)]))
    measured_note = (
        "This model's own bias probes are under Evaluation above."
        if bias
        else "Not measured for this model: run `hf-clip eval bias` before using it on images of people; "
        "`hf-clip card --results` adds the results to this card."
    )
    parts.append(
        "## Bias and limitations\n\nCLIP models learn the associations of their training data, harmful ones "
        "included: in the paper's probe, OpenAI's model put 4.9% of FairFace images into non-human classes "
        "(about 14% of images of Black people) and 16.5% of images of men into crime-related ones. "
        + measured_note
    )
    parts.append(
        "## How to use\n\n```python\nimport hf_clip  # registers the model type with transformers\n"
        "from transformers import pipeline\n\n"
        'classifier = pipeline("zero-shot-image-classification", model="PATH_OR_REPO_ID")\n'
        'classifier("photo.jpg", candidate_labels=["a cat", "a dog"])\n```'
    )
    return "\n\n".join(parts) + "\n"


def render_model_card(
    model_dir: str | os.PathLike, results: Sequence[dict[str, Any]] = (), preset: str | None = None
) -> tuple[str, str]:
    """(what the card describes, the card) for a saved model folder: the run's own card for a model trained
    with hf_clip (its held-out results read from the folder's results.json), else the paper card of the
    paper model whose architecture it has (`preset` checked against it)."""
    model_dir = Path(model_dir)
    config = HfClipConfig.from_pretrained(model_dir)
    config.check_has_text_tower(
        "a CLIP model card (its zero-shot and bias sections); write its card yourself"
    )
    if training_record(config) is not None:
        if preset:
            raise ValueError(
                f"This model was trained with hf_clip's pretraining, not released by OpenAI: the {preset} paper "
                "card would misdescribe its data and results. Leave --preset out for the card of its own run."
            )
        run_file = model_dir / "results.json"
        run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
        return "hf_clip training run", render_training_card(config, run.get("metrics"), results)
    model = check_paper_model(config, preset) if preset else identify_paper_model(config)
    return model.name, render_card(model.name, results)


def card_path(directory: str | os.PathLike, name: str) -> Path:
    return Path(directory) / f"{paper_model(name).name}.md"


def write_paper_cards(directory: str | os.PathLike) -> list[Path]:
    """(Re)generate the nine committed cards, `model_cards/<name>.md`."""
    return [atomic_write_text(card_path(directory, name), render_card(name)) for name in PAPER_MODELS]


# ----------------------------------------------------------------------------------------------------------
# Which paper model a saved folder holds


def _card_facts(config: HfClipConfig) -> dict[str, Any]:
    """What a card states about a model's architecture, which must hold for the model the card describes: the
    architecture table, the activation (the template states QuickGELU), the MLP widths (the parameter count)
    and the loss (the template states the contrastive loss, not a sigmoid one with a logit bias)."""
    vision, text = config.vision_config, config.text_config
    facts = {key: value for key, value in _architecture(config).items() if key != "architecture_notes"}
    facts.update(
        vision_activation=vision.hidden_act,
        text_activation=text.hidden_act,
        vision_intermediate_size=vision.intermediate_size,
        text_intermediate_size=text.intermediate_size,
        logit_bias=config.logit_bias_init_value is not None,
    )
    return facts


def _differences(config: HfClipConfig, model: PaperModel) -> list[str]:
    ours, paper = _card_facts(config), _card_facts(HfClipConfig.from_preset(model.preset))
    return [f"{key}: {ours[key]} (the paper's {paper[key]})" for key in paper if ours[key] != paper[key]]


def identify_paper_model(config: HfClipConfig) -> PaperModel:
    """The paper model whose architecture `config` has; a clear error for any other size or activation."""
    differences = {model.name: _differences(config, model) for model in PAPER_MODELS.values()}
    for name, diff in differences.items():
        if not diff:
            return PAPER_MODELS[name]
    vision_type = config.vision_config.vision_type
    closest = min(
        differences,
        key=lambda name: (
            HfClipConfig.from_preset(PAPER_MODELS[name].preset).vision_config.vision_type != vision_type,
            len(differences[name]),
        ),
    )
    raise ValueError(
        "This model's architecture is not one of the paper's nine models, so a card quoting the paper's sizes "
        f"and results would misdescribe it; closest is {closest}, which differs in "
        f"{'; '.join(differences[closest])}. Write the model card yourself."
    )


def check_paper_model(config: HfClipConfig, name: str) -> PaperModel:
    """The paper model `name`, or a clear error when `config` is not its architecture."""
    model = paper_model(name)
    differences = _differences(config, model)
    if differences:
        raise ValueError(
            f"This model is not {model.name}: it differs in {'; '.join(differences)}, so the {model.name} card "
            "would misdescribe it. Write the model card yourself."
        )
    return model


# ----------------------------------------------------------------------------------------------------------
# CLI: hf-clip card


def add_card_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "card",
        help="Write a model folder's README.md (model card) from the template and measured results.",
        description="Write MODEL/README.md: for a model trained with examples/pretrain.py, the card of its own "
        "run (recorded in its config.json); otherwise the Hub card of the paper model whose architecture it "
        "has. Measured results (JSON files written by `hf-clip eval`) go into model-index, the results "
        "section and the bias section.",
    )
    parser.add_argument("--model", required=True, help="Saved model folder (config.json inside).")
    parser.add_argument(
        "--results", nargs="*", default=[], help="Results JSON files from `hf-clip eval ...`."
    )
    parser.add_argument(
        "--preset",
        help="Paper model name (default: read from the config); the model must have its architecture.",
    )
    parser.add_argument("--output", help="Where to write the card (default MODEL/README.md).")
    parser.set_defaults(func=run_card)
    return parser


def run_card(args: argparse.Namespace) -> Path:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir / 'config.json'} not found; --model must be a saved hf_clip folder."
        )
    results = [load_results(p, model_dir) for p in args.results]
    name, card = render_model_card(model_dir, results, args.preset)
    path = atomic_write_text(Path(args.output) if args.output else model_dir / "README.md", card)
    print(f"Wrote the {name} card to {path}")
    return path


__all__ = [
    "PAPER_MODELS",
    "PaperModel",
    "add_card_parser",
    "check_paper_model",
    "identify_paper_model",
    "load_results",
    "measured_eval_results",
    "paper_eval_results",
    "paper_model",
    "render_card",
    "render_model_card",
    "render_training_card",
    "run_card",
    "training_record",
    "write_paper_cards",
]
