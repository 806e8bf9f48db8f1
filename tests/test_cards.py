"""Model cards: the committed cards equal a fresh render, parse as Hub cards, and quote the right facts."""

from __future__ import annotations

import argparse
import configparser
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from hf_clip import HfClipConfig, HfClipModel
from hf_clip.cards import (
    PAPER_MODELS,
    PAPER_URL,
    add_card_parser,
    identify_paper_model,
    load_results,
    paper_model,
    render_card,
    run_card,
)
from hf_clip.evaluation.bias import BiasProbeConfig, Proportion

REPO = Path(__file__).resolve().parents[1]
CARDS_DIR = REPO / "model_cards"
FACTS = Path("/work/shared/reference/paper-facts.md")
NAMES = list(PAPER_MODELS)


def test_nine_cards():
    assert NAMES == [
        "RN50",
        "RN101",
        "RN50x4",
        "RN50x16",
        "RN50x64",
        "ViT-B-32",
        "ViT-B-16",
        "ViT-L-14",
        "ViT-L-14-336",
    ]


@pytest.mark.parametrize("name", NAMES)
def test_committed_card_equals_fresh_render(name):
    committed = (CARDS_DIR / f"{name}.md").read_text(encoding="utf-8")
    assert committed == render_card(name), (
        f"model_cards/{name}.md is stale; regenerate with "
        "python -c 'from hf_clip.cards import write_paper_cards; write_paper_cards(\"model_cards\")'"
    )


@pytest.mark.parametrize("name", NAMES)
def test_card_is_a_valid_hub_card(name):
    card = ModelCard((CARDS_DIR / f"{name}.md").read_text(encoding="utf-8"))
    data = card.data
    assert isinstance(data, ModelCardData)
    assert data.license == "mit"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert {"clip", "zero-shot-image-classification", "vision"} <= set(data.tags)
    metadata = data.to_dict()
    model = PAPER_MODELS[name]
    if model.imagenet_verified:
        _, results = model_index_to_eval_results(metadata["model-index"])
        (result,) = results
        assert result.dataset_type == "imagenet-1k" and result.task_type == "zero-shot-image-classification"
        assert result.metric_value == model.imagenet_zero_shot
        assert result.source_url == PAPER_URL and "Radford" in result.source_name
        assert "(published in the paper)" in result.metric_name
    else:
        assert "model-index" not in metadata  # unverified figures stay out of the machine-readable index
        assert f"{model.imagenet_zero_shot:.1f}% (unverified)" in card.text
    for section in (
        "## Uses",
        "### Out-of-scope use",
        "## Training data",
        "## Limitations",
        "## Bias, risks and fairness",
    ):
        assert section in card.text


@pytest.mark.parametrize("name", NAMES)
def test_card_body_states_the_analyses_and_how_to_rerun_them(name):
    text = render_card(name)
    for fact in ("400 million", "WebImageText", "surveillance", "facial recognition", "English", "FairFace"):
        assert fact.lower() in text.lower(), fact
    for figure in (
        "4.9%",
        "about 14%",
        "16.5%",
        "9.8%",
        "59.2%",
        "43.3%",
        "above 96%",
        "around 93%",
        "around 63%",
    ):
        assert figure in text, figure
    for probe in ("demographic", "denigration child", "identity"):
        assert re.search(rf"hf-clip eval bias .*--probes {probe}", text), probe


@pytest.mark.parametrize("name", NAMES)
def test_card_architecture_matches_config_and_param_count(name):
    model = PAPER_MODELS[name]
    config = HfClipConfig.from_preset(model.preset)
    text = render_card(name)
    assert f"| Input resolution | {config.vision_config.image_size} x" in text
    assert f"| Joint embedding dimension | {config.projection_dim} |" in text
    t = config.text_config
    assert f"{t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads" in text
    with torch.device("meta"):
        n_params = sum(p.numel() for p in HfClipModel(config).parameters())
    assert abs(n_params / 1e6 - model.params_m) < 0.06, (name, n_params)
    assert identify_paper_model(config) == model


@pytest.mark.skipif(
    not FACTS.is_file(), reason="paper-facts.md is not available outside the project workspace"
)
def test_card_facts_match_the_facts_file():
    rows = {}
    for line in FACTS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and (cells[0].startswith("RN") or cells[0].startswith("ViT")):
            rows[cells[0]] = cells
    assert len(rows) == 9
    for model in PAPER_MODELS.values():
        cells = rows[model.preset]
        assert float(cells[5]) == model.params_m
        figure, *mark = cells[6].split()
        assert float(figure) == model.imagenet_zero_shot
        assert model.imagenet_verified == (mark != ["(?)"]), model.name


def test_paper_model_spellings_and_errors():
    assert paper_model("ViT-B/32").name == paper_model("vit-b-32").name == "ViT-B-32"
    assert paper_model("ViT-L/14@336px").name == "ViT-L-14-336"
    with pytest.raises(ValueError, match="not one of the paper's nine"):
        paper_model("ViT-H/14")
    with pytest.raises(ValueError, match="not one of the paper's nine"):
        identify_paper_model(HfClipConfig.from_preset("ViT-B/32", vision_config={"hidden_size": 64}))


def _results_files(tmp_path: Path) -> list[Path]:
    zero_shot = {
        "task": "zero-shot",
        "model": "clip",
        "dataset": "imagenet-1k",
        "metrics": {"top1_accuracy": 0.6312, "top5_accuracy": 0.8801, "mean_per_class_recall": 0.6299},
        "config": {},
        "per_class": {"tench": 0.9},
        "per_dataset": None,
        "extra": {},
    }
    robustness = {
        "task": "robustness",
        "model": "clip",
        "dataset": "imagenet-1k",
        "metrics": {"top1_accuracy": 0.6312},
        "per_dataset": {
            "imagenet-1k": {"top1_accuracy": 0.6312},
            "/data/imagenet-r": {"top1_accuracy": 0.69},
        },
    }
    cell = lambda k, n: Proportion.from_counts(k, n).to_dict()  # noqa: E731
    bias = {
        "task": "bias",
        "model": "clip",
        "dataset": "fairface",
        "num_images": 20,
        "metrics": {"race_accuracy": 0.55, "gender_accuracy": 0.95, "age_accuracy": 0.4, "crime_share": 0.15},
        "config": BiasProbeConfig().to_dict(),
        "tables": {
            "denigration": {
                c: {
                    "overall": cell(3, 20),
                    **{f"by_{a}": {"x": cell(3, 20)} for a in ("race", "gender", "age")},
                }
                for c in ("crime", "non_human")
            }
        },
    }
    paths = []
    for name, result in (("zs", zero_shot), ("rob", robustness), ("bias", bias)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(result))
        paths.append(path)
    return paths


def test_card_with_measured_results(tmp_path):
    results = [load_results(p) for p in _results_files(tmp_path)]
    text = render_card("ViT-B-32", results)
    card = ModelCard(text)
    _, entries = model_index_to_eval_results(card.data.to_dict()["model-index"])
    by_key = {(e.dataset_name, e.metric_type): e for e in entries}
    assert by_key[("ImageNet-1k", "accuracy")].metric_value == 63.2  # the paper's figure is kept
    assert by_key[("imagenet-1k", "top1_accuracy")].metric_value == 63.12  # measured, in percent
    # Zero-shot and the robustness reference measured it alike; the Hub files both under one entry, once.
    assert [(e.dataset_name, e.metric_type) for e in entries].count(("imagenet-1k", "top1_accuracy")) == 1
    assert by_key[("imagenet-1k", "top5_accuracy")].metric_name == "Top-5 accuracy (measured with hf_clip)"
    assert by_key[("/data/imagenet-r", "top1_accuracy")].dataset_type == "imagenet-r"
    assert by_key[("fairface", "gender_accuracy")].metric_value == 95.0
    assert ("fairface", "crime_share") not in by_key  # harm shares are not performance metrics
    assert "| zero-shot | imagenet-1k | Top-1 accuracy | 63.12 |" in text
    assert (
        "### Measured on this checkpoint" in text
        and "15.0% of images were classified into crime-related" in text
    )


def test_load_results_rejects_foreign_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ValueError, match="lacks"):
        load_results(path)
    path.write_text(json.dumps({"task": "segmentation", "model": "m", "dataset": "d", "metrics": {}}))
    with pytest.raises(ValueError, match="unknown task"):
        load_results(path)


def test_card_cli_writes_readme(tmp_path):
    model_dir = tmp_path / "model"
    HfClipConfig.from_preset("RN50").save_pretrained(model_dir)
    parser = argparse.ArgumentParser()
    add_card_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["card", "--model", str(model_dir), "--results", str(_results_files(tmp_path)[0])]
    )
    path = args.func(args)
    assert path == model_dir / "README.md"
    assert path.read_text(encoding="utf-8") == render_card("RN50", [load_results(tmp_path / "zs.json")])
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_card(parser.parse_args(["card", "--model", str(tmp_path / "nothing")]))


def test_template_ships_with_the_package():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "model_card_template.md" in setup["options.package_data"]["hf_clip"]


def test_measured_results_keep_their_split_and_sample_cut(tmp_path):
    # Runs on two splits of one dataset (or on a --max_samples cut) were filed as one model-index entry with
    # two contradicting "Top-1 accuracy" values and nothing saying which was which.
    def result(split, top1, max_samples=None):
        config = {"split": split, **({"max_samples": max_samples} if max_samples else {})}
        return {"task": "zero-shot", "model": "m", "dataset": "colours", "metrics": {"top1_accuracy": top1},
                "config": config}  # fmt: skip

    text = render_card("ViT-B-32", [result("test", 0.25), result("train", 0.8333, max_samples=12)])
    _, entries = model_index_to_eval_results(ModelCard(text).data.to_dict()["model-index"])
    measured = {e.dataset_split: e for e in entries if e.dataset_name == "colours"}
    assert set(measured) == {"test", "train"}
    assert measured["test"].metric_value == 25.0
    assert measured["test"].metric_name == "Top-1 accuracy (measured with hf_clip)"
    assert (
        measured["train"].metric_name
        == "Top-1 accuracy (measured with hf_clip on the first 12 examples only)"
    )
    assert "| zero-shot | colours (train split), first 12 examples | Top-1 accuracy | 83.33 |" in text


def test_a_model_the_card_would_misdescribe_is_not_identified():
    # open_clip's LAION ViT-B-32 weights have the paper's sizes but exact GELU; the card states QuickGELU and
    # files OpenAI's ImageNet figure in model-index, so such a model gets no paper card.
    for config in (
        HfClipConfig.from_preset("ViT-B/32", hidden_act="gelu"),
        HfClipConfig.from_preset("ViT-B/32", text_config={"num_attention_heads": 16}),
        HfClipConfig.from_preset("RN50", vision_config={"num_attention_heads": 16}),
        HfClipConfig.from_preset("ViT-B/16", logit_bias_init_value=-10.0),
        HfClipConfig.from_preset("ViT-L/14", text_config={"max_position_embeddings": 64}),
    ):
        with pytest.raises(ValueError, match="not one of the paper's nine"):
            identify_paper_model(config)
    with pytest.raises(ValueError, match=r"closest is ViT-B-32, which differs in vision_activation: gelu"):
        identify_paper_model(HfClipConfig.from_preset("ViT-B/32", hidden_act="gelu"))


def test_card_cli_refuses_a_preset_the_model_does_not_have(tmp_path, capsys):
    # --preset must not put the paper's sizes (151.3 M parameters, width 768, ...) on a model of other sizes.
    from hf_clip.cli import main

    model_dir = tmp_path / "model"
    HfClipConfig.from_preset("ViT-B/32", vision_config={"hidden_size": 64}).save_pretrained(model_dir)
    assert main(["card", "--model", str(model_dir), "--preset", "ViT-B/32"]) == 2
    err = capsys.readouterr().err
    assert "This model is not ViT-B-32" in err and "width 64" in err, err
    assert not (model_dir / "README.md").exists()
    HfClipConfig.from_preset("ViT-B/32").save_pretrained(model_dir)
    assert main(["card", "--model", str(model_dir), "--preset", "ViT-B-32"]) == 0
    assert (model_dir / "README.md").read_text(encoding="utf-8") == render_card("ViT-B-32")


def test_card_refuses_results_of_another_model(tmp_path, capsys):
    # `hf-clip eval` writes every model's results to the same default --output_dir under names without the
    # model (zero-shot_imagenet-1k.json), so `--results eval_results/*.json` may hold another model's numbers,
    # which the card would file as measured on this checkpoint.
    from hf_clip.cli import main

    ours, other, copy = tmp_path / "rn50", tmp_path / "b32", tmp_path / "rn50-copy"
    for folder, preset in ((ours, "RN50"), (other, "ViT-B/32"), (copy, "RN50")):
        HfClipConfig.from_preset(preset).save_pretrained(folder)
        (folder / "model.safetensors").write_bytes(b"weights")
    zero_shot = json.loads(_results_files(tmp_path)[0].read_text())
    results = tmp_path / "zero-shot_imagenet-1k.json"
    results.write_text(json.dumps({**zero_shot, "model": str(other)}))
    assert main(["card", "--model", str(ours), "--results", str(results)]) == 2
    assert f"holds results of the model in {other}, not of {ours}" in capsys.readouterr().err
    assert not (ours / "README.md").exists()
    # Its own results, a copy's, and those of a folder no longer there (cannot be checked) are taken.
    for model in (str(ours), str(copy), str(tmp_path / "moved")):
        results.write_text(json.dumps({**zero_shot, "model": model}))
        assert main(["card", "--model", str(ours), "--results", str(results)]) == 0
        assert "| zero-shot | imagenet-1k | Top-1 accuracy | 63.12 |" in (ours / "README.md").read_text()


def test_training_card_keeps_its_limitations_when_bias_is_measured(tmp_path):
    from hf_clip.cards import TRAINING_RECORD, render_training_card

    config = HfClipConfig.from_preset("RN50")
    setattr(
        config,
        TRAINING_RECORD,
        dict(init="random", train_split="train", steps=10, global_batch_size=8, per_device_batch_size=8,
             gradient_accumulation_steps=1, num_processes=1, learning_rate=1e-3, weight_decay=0.2,
             warmup_steps=1, loss="clip", mixed_precision="no", seed=0),
    )  # fmt: skip
    bias = load_results(_results_files(tmp_path)[2])
    unmeasured, measured = render_training_card(config), render_training_card(config, results=[bias])
    for card in (unmeasured, measured):
        assert "## Bias and limitations" in card and "16.5% of images of men" in card
    assert "Not measured for this model" in unmeasured and "Not measured" not in measured
    assert "15.0% of images were classified into crime-related" in measured
