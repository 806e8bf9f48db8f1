"""Each evaluation end to end through the CLI (`hf-clip eval ...`) with a tiny random HfClipModel saved with
its processor, on datasets written in the test (an imagefolder, `save_to_disk` datasets, csv files).

The model is untrained, so the numbers are arbitrary; what is checked is that the reported metrics equal the
ones recomputed here from the model's own embeddings, that the output files exist, and that bad input stops
with a message that names the problem.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, Value, load_dataset
from PIL import Image as PILImage

from hf_clip import HfClipConfig, HfClipModel
from hf_clip.cli import main as hf_clip_main
from hf_clip.evaluation.cli import add_eval_parser, run_eval
from hf_clip.image_processing_hf_clip import HfClipImageProcessor
from hf_clip.processing_hf_clip import HfClipProcessor
from hf_clip.tokenization_hf_clip import HfClipTokenizer

COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 30)}  # imagefolder sorts names


def _image(colour, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour) + rng.normal(scale=25, size=(40, 48, 3)), 0, 255).astype(np.uint8)
    return PILImage.fromarray(pixels)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = HfClipConfig(
        projection_dim=32,
        text_config=dict(hidden_size=64, num_hidden_layers=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2),
    )
    bpe = Path(importlib.util.find_spec("open_clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    processor = HfClipProcessor(
        image_processor=HfClipImageProcessor.for_image_size(32),
        tokenizer=HfClipTokenizer.from_openai_bpe(str(bpe)),
    )
    path = tmp_path_factory.mktemp("tiny_clip")
    HfClipModel(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    processor = HfClipProcessor(
        image_processor=HfClipImageProcessor.from_pretrained(str(model_dir)),
        tokenizer=HfClipTokenizer.from_pretrained(str(model_dir)),
    )
    return HfClipModel.from_pretrained(str(model_dir)).eval(), processor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    seed = 0
    for split, per_class in (("train", 8), ("test", 3)):
        for name, colour in COLOURS.items():
            folder = root / "colours" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                _image(colour, seed).save(folder / f"{i}.png")
    # A shifted dataset covering two of the three classes, in another order, darker.
    shifted = Dataset.from_dict(
        {
            "image": [
                _image(tuple(c // 2 for c in COLOURS[n]), 100 + i) for i, n in enumerate(["red", "blue"] * 3)
            ],
            "label": [0, 1] * 3,
        },
        features=Features({"image": Image(), "label": ClassLabel(names=["red", "blue"])}),
    )
    shifted.save_to_disk(str(root / "shifted"))
    captions = [
        ["a red square", "red noise"],
        ["a green square"],
        ["a blue square", "blue", "a photo of blue"],
    ]
    captions += [["another red one"], ["green again", "a green thing"]]
    colours = ["red", "green", "blue", "red", "green"]
    Dataset.from_dict(
        {"image": [_image(COLOURS[c], 200 + i) for i, c in enumerate(colours)], "captions": captions},
        features=Features({"image": Image(), "captions": List(Value("string"))}),
    ).save_to_disk(str(root / "captions"))
    return root


def run(argv, output_dir):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv, "--output_dir", str(output_dir), "--num_workers", "0"])
    assert run_eval(args) == 0
    outputs = sorted(Path(output_dir).iterdir())
    assert [p.suffix for p in outputs] == [".json", ".md", ".png"]
    assert all(p.stat().st_size > 0 for p in outputs)
    return json.loads(outputs[0].read_text())


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@torch.inference_mode()
def image_embeds(model, processor, images):
    pixels = processor.image_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")[
        "pixel_values"
    ]
    return _unit(model.get_image_features(pixel_values=pixels))


@torch.inference_mode()
def text_embeds(model, processor, texts):
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    return _unit(
        model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    )


def expected_classification(logits, labels, num_classes):
    predicted = logits.argmax(dim=1).numpy()
    top5 = np.mean(
        [label in row for label, row in zip(labels, logits.topk(min(5, num_classes), dim=1).indices.tolist())]
    )
    recalls = [np.mean(predicted[labels == c] == c) for c in range(num_classes) if (labels == c).any()]
    expected = {"top1_accuracy": np.mean(predicted == labels), "mean_per_class_recall": np.mean(recalls)}
    if num_classes > 5:  # top-5 of 5 or fewer classes is always 100%, so it is not reported
        expected["top5_accuracy"] = top5
    return expected


def test_zero_shot_end_to_end_through_console_entry(model_dir, loaded, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "eval",
        "zero-shot",
        "--model",
        str(model_dir),
        "--dataset",
        str(data / "colours"),
        "--split",
        "test",
    ]
    argv += [
        "--templates",
        "a photo of a {}.",
        "--output-dir",
        str(out),
        "--num-workers",
        "1",
        "--batch_size",
        "4",
    ]
    assert hf_clip_main(argv) == 0
    assert "zero-shot on colours: top1_accuracy=" in capsys.readouterr().out
    record = json.loads((out / "zero-shot_colours.json").read_text())
    assert (
        record["task"] == "zero-shot" and record["dataset"] == "colours" and record["model"] == str(model_dir)
    )
    assert record["config"]["num_examples"] == 9 and record["config"]["templates"] == ["a photo of a {}."]

    model, processor = loaded
    test = load_dataset(str(data / "colours"), split="test")
    names = test.features["label"].names
    logits = (
        image_embeds(model, processor, test["image"])
        @ text_embeds(model, processor, [f"a photo of a {n}." for n in names]).T
    )
    expected = expected_classification(logits, np.asarray(test["label"]), 3)
    for name, value in expected.items():
        assert record["metrics"][name] == pytest.approx(value), name
    assert set(record["per_class"]) == set(COLOURS)
    assert "| top1_accuracy |" in (out / "zero-shot_colours.md").read_text()


def test_zero_shot_classnames_override_and_template_ensemble(model_dir, data, tmp_path):
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of the {}.\n")
    record = run(
        ["zero-shot", "--model", str(model_dir), "--dataset", str(data / "colours"), "--classnames",
         "navy,lime,crimson", "--templates", str(tmp_path / "templates.txt"), "--max_samples", "4"],
        tmp_path / "out",
    )  # fmt: skip
    assert list(record["per_class"]) == ["navy", "lime", "crimson"]
    assert record["config"]["num_templates"] == 2 and record["config"]["num_examples"] == 4


def test_linear_probe_end_to_end(model_dir, loaded, data, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    record = run(
        ["linear-probe", "--model", str(model_dir), "--dataset", str(data / "colours"), "--max_iter", "100"],
        tmp_path / "out",
    )
    assert record["task"] == "linear-probe"
    assert (
        record["config"]["feature"] == "pooled"
        and record["config"]["validation"] == "20% of train (stratified)"
    )
    sweep = record["extra"]["sweep"]
    assert 11 <= len(sweep) <= 15 and {s["log10_C"] for s in sweep} >= {-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0}

    # Recompute: pooled (pre-projection) features, the same carve-out, a refit on train + val at the chosen C.
    model, processor = loaded

    @torch.inference_mode()
    def pooled(ds):
        pixels = processor.image_processor(
            images=[i.convert("RGB") for i in ds["image"]], return_tensors="pt"
        )
        return model.vision_model(pixels["pixel_values"]).pooler_output.numpy()

    train = load_dataset(str(data / "colours"), split="train")
    test = load_dataset(str(data / "colours"), split="test")
    x, y = pooled(train), np.asarray(train["label"])
    fit, val = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    order = np.concatenate([fit, val])
    probe = LogisticRegression(C=record["extra"]["best_C"], max_iter=100).fit(x[order], y[order])
    probs = torch.as_tensor(probe.predict_proba(pooled(test)))
    expected = expected_classification(probs, np.asarray(test["label"]), 3)
    for name, value in expected.items():
        assert record["metrics"][name] == pytest.approx(value), name
    assert (
        record["metrics"]["top1_accuracy"] >= 2 / 3
    )  # colour classes are linearly separable even at random init


def test_retrieval_end_to_end_with_several_captions(model_dir, loaded, data, tmp_path):
    record = run(
        ["retrieval", "--model", str(model_dir), "--dataset", str(data / "captions"), "--caption_column", "captions",
         "--k", "1", "2", "5"],
        tmp_path / "out",
    )  # fmt: skip
    assert record["config"]["num_images"] == 5 and record["config"]["num_captions"] == 9

    model, processor = loaded
    ds = Dataset.load_from_disk(str(data / "captions"))
    texts = [c for caps in ds["captions"] for c in caps]
    owners = np.asarray([i for i, caps in enumerate(ds["captions"]) for _ in caps])
    sim = image_embeds(model, processor, ds["image"]) @ text_embeds(model, processor, texts).T
    for k in (1, 2, 5):
        i2t = np.mean(
            [
                np.isin(sim[i].argsort(descending=True)[:k].numpy(), np.flatnonzero(owners == i)).any()
                for i in range(5)
            ]
        )
        t2i = np.mean(
            [owners[j] in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(len(texts))]
        )
        assert record["metrics"][f"image_to_text_recall@{k}"] == pytest.approx(i2t)
        if k < 5:
            assert record["metrics"][f"text_to_image_recall@{k}"] == pytest.approx(t2i)
    # Only 5 images: text->image recall@5 is 1.0 for any model, so it is not reported.
    assert "text_to_image_recall@5" not in record["metrics"]


def test_robustness_end_to_end_with_subset_shift(model_dir, loaded, data, tmp_path):
    record = run(
        ["robustness", "--model", str(model_dir), "--dataset", str(data / "colours"), "--shift-datasets",
         str(data / "shifted")],
        tmp_path / "out",
    )  # fmt: skip
    assert list(record["per_dataset"]) == ["colours", "shifted"]
    ref, shifted = record["per_dataset"]["colours"], record["per_dataset"]["shifted"]
    assert shifted["top1_accuracy_gap"] == pytest.approx(shifted["top1_accuracy"] - ref["top1_accuracy"])
    assert (
        "top1_accuracy_gap" not in ref and "top1_accuracy_gap_gap" not in shifted
    )  # gaps: shifted sets only
    assert "top1_accuracy_gap" not in record["metrics"] and "top5_accuracy" not in record["metrics"]

    # The shifted set names blue and red only: it is scored over those two classes, labels matched by name.
    model, processor = loaded
    names = ["blue", "green", "red"]
    weights = text_embeds(model, processor, [f"a photo of a {n}." for n in names])
    ds = Dataset.load_from_disk(str(data / "shifted"))
    logits = (image_embeds(model, processor, ds["image"]) @ weights.T)[:, [0, 2]]  # blue, red
    labels = np.asarray([{"red": 1, "blue": 0}[ds.features["label"].int2str(x)] for x in ds["label"]])
    expected = expected_classification(logits, labels, 2)
    for name, value in expected.items():
        assert shifted[name] == pytest.approx(value), name
    assert (tmp_path / "out" / "robustness_colours.png").read_bytes()[:4] == b"\x89PNG"


def test_robustness_scores_a_fine_tuned_classifier_with_its_own_head(model_dir, loaded, data, tmp_path):
    """A classifier folder is scored with its head, rows matched to the dataset's classes by name: started as
    the zero-shot classifier (labels in another order), it scores exactly as the zero-shot run."""
    from hf_clip import HfClipForImageClassification, ZeroShotClassifier
    from hf_clip.evaluation.loading import LabelInfo
    from hf_clip.evaluation.zero_shot import HeadClassifier

    model, processor = loaded
    argv = ["robustness", "--dataset", str(data / "colours"), "--shift-datasets", str(data / "shifted")]
    zero_shot = run([*argv, "--model", str(model_dir)], tmp_path / "zero_shot")
    classifier_dir = tmp_path / "classifier"
    order = ["red", "blue", "green"]  # not the dataset's (alphabetical) order
    head = ZeroShotClassifier.from_model(model, processor, order, progress=False)
    HfClipForImageClassification.from_zero_shot(model, head).save_pretrained(classifier_dir)
    processor.image_processor.save_pretrained(classifier_dir)  # no tokenizer: the head needs none
    fine_tuned = run([*argv, "--model", str(classifier_dir)], tmp_path / "head")
    assert fine_tuned["config"]["classifier"] == "head" and zero_shot["config"]["classifier"] == "zero-shot"
    for name, metrics in zero_shot["per_dataset"].items():
        assert fine_tuned["per_dataset"][name] == pytest.approx(metrics, abs=1e-9), name
    assert fine_tuned["per_class"] == pytest.approx(zero_shot["per_class"], abs=1e-9)
    # The linear probe reads the image tower alone: the same features, the same probe, as from the CLIP folder.
    probe = ["linear-probe", "--dataset", str(data / "colours"), "--max_iter", "50"]
    assert run([*probe, "--model", str(classifier_dir)], tmp_path / "p1")["metrics"] == pytest.approx(
        run([*probe, "--model", str(model_dir)], tmp_path / "p2")["metrics"]
    )

    # Unnamed heads are taken in index order; a head missing a class is refused with its labels listed.
    info = LabelInfo(np.arange(3), ["blue", "green", "red"], ["blue", "green", "red"])
    unnamed = HfClipForImageClassification(model.config.__class__(**model.config.to_dict(), num_labels=3))
    assert torch.equal(HeadClassifier(unnamed, info).weights, unnamed.classifier.weight)
    classifier = HfClipForImageClassification.from_pretrained(classifier_dir)
    classifier.config.id2label = {0: "red", 1: "blue", 2: "purple"}
    with pytest.raises(
        ValueError, match=r"no output named for 1 of the dataset's 3 classes \(e.g. 'green'\)"
    ):
        HeadClassifier(classifier, info)
    with pytest.raises(
        ValueError, match="needs the text tower.*robustness and linear-probe take a classifier"
    ):
        run(["zero-shot", "--model", str(classifier_dir), "--dataset", str(data / "colours")], tmp_path / "n")


def test_head_with_a_repeated_label_keeps_its_rows_apart(loaded):
    """ImageNet's class names repeat "missile" and "sunglasses", so a head made by from_zero_shot on them has
    repeated labels: on that same label list each class keeps its own row (by name, both would read the
    last), and a dataset naming the repeated class in another order is refused as ambiguous."""
    from hf_clip import HfClipForImageClassification
    from hf_clip.evaluation.loading import LabelInfo
    from hf_clip.evaluation.zero_shot import HeadClassifier

    model, _ = loaded
    names = ["missile", "cat", "Missile"]
    classifier = HfClipForImageClassification(model.config.__class__(**model.config.to_dict(), num_labels=3))
    classifier.config.id2label = dict(enumerate(names))
    for label_names in (names, ["n01", "n02", "n03"]):  # the class names match when the label names do not
        head = HeadClassifier(classifier, LabelInfo(np.arange(3), names, label_names))
        assert torch.equal(head.weights, classifier.classifier.weight)
    with pytest.raises(ValueError, match="several outputs named 'missile'"):
        HeadClassifier(classifier, LabelInfo(np.arange(2), ["cat", "missile"], ["cat", "missile"]))


def test_bad_input_errors(model_dir, data, tmp_path):
    def fails(argv, match):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            run(["zero-shot", "--model", str(model_dir), *argv], tmp_path / "never")

    ints = tmp_path / "ints.csv"
    ints.write_text("image,label\n" + "".join(f"{data}/colours/test/red/{i}.png,{i % 2}\n" for i in range(3)))
    fails(["--dataset", str(ints)], r"integers without class names.*--classnames")
    fails(
        ["--dataset", str(data / "colours"), "--label_column", "class"],
        r"'class' not found.*available columns: image, label",
    )
    empty = tmp_path / "empty.csv"
    empty.write_text("image,label\n" + f"{data}/colours/test/red/0.png,red\n")
    fails(["--dataset", str(empty), "--max_samples", "0"], "empty")
    fails(["--dataset", str(data / "colours"), "--classnames", "red,green"], "3 classes but 2 class names")
    fails(["--dataset", str(data / "colours"), "--classnames", "red,\ufeff,blue"], "tokenise to nothing")
    fails(["--dataset", str(data / "colours"), "--templates", "no placeholder here"], "placeholder")
    assert not (tmp_path / "never").exists()


def test_console_errors_are_one_line(model_dir, data, tmp_path, capsys, monkeypatch):
    argv = ["eval", "zero-shot", "--model", str(model_dir), "--dataset", str(data / "colours")]
    assert hf_clip_main([*argv, "--label_column", "class", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err  # after any progress bars of the dataset loading: one error line
    last = err.strip().splitlines()[-1]
    assert last.startswith("hf-clip eval: error:") and "available columns" in last and "Traceback" not in err
    # A local folder named like a shipped dataset does not turn --classnames cifar10 into one class "cifar10".
    from hf_clip.evaluation.cli import _classnames
    from hf_clip.zero_shot import get_classnames

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10").mkdir()
    assert _classnames(argparse.Namespace(classnames="cifar10")) == get_classnames("cifar10")


def test_robustness_sample_missing_some_classes_is_scored_over_all_its_classes(loaded):
    # A shifted dataset whose ClassLabel names every reference class still covers all of them when the
    # evaluated sample (--max_samples, a filtered copy) holds images of only some: scoring it over the
    # present classes alone inflated its accuracy, so an identical copy of the reference showed a gap.
    from hf_clip.evaluation import evaluate_robustness, evaluate_zero_shot

    model, processor = loaded
    names = list(COLOURS)
    images = [_image(COLOURS[n], 300 + i) for i, n in enumerate(names * 3)]
    logits = zero_shot_logits(model, processor, images, names)
    favoured = int(np.bincount(logits.argmax(1), minlength=3).argmax())  # the untrained model's pet class
    logits[:, favoured] = -np.inf
    # Label every image with its best class other than the favoured one: no image shows the favoured class,
    # and every image predicted as it is wrong over the 3 classes but right over the 2 present ones.
    sample = Dataset.from_dict(
        {"image": images, "label": logits.argmax(1).tolist()},
        features=Features({"image": Image(), "label": ClassLabel(names=names)}),
    )
    result = evaluate_robustness(model, processor, {"in": sample, "copy": sample})
    in_dist, copy = result.per_dataset["in"], result.per_dataset["copy"]
    assert in_dist["top1_accuracy"] < 1
    assert copy["top1_accuracy"] == in_dist["top1_accuracy"] and copy["top1_accuracy_gap"] == 0
    assert result.config["num_classes_scored"] == {"in": 3, "copy": 3}
    expected = evaluate_zero_shot(model, processor, sample)
    assert in_dist["top1_accuracy"] == pytest.approx(expected.metrics["top1_accuracy"])


def zero_shot_logits(model, processor, images, names):
    weights = text_embeds(model, processor, [f"a photo of a {n}." for n in names])
    return (image_embeds(model, processor, images) @ weights.T).numpy()


@pytest.mark.parametrize("missing", ["everything", "model.safetensors", "processor_config.json"])
def test_incomplete_model_folder_is_a_one_line_error(model_dir, data, tmp_path, capsys, missing):
    # A folder that is not a saved model (or lacks its weights or image processor) ended in an OSError
    # traceback from transformers instead of the CLI's one-line error.
    import shutil

    folder = tmp_path / "model"
    if missing == "everything":
        folder.mkdir()
    else:
        shutil.copytree(model_dir, folder)
        for path in folder.glob(missing):
            path.unlink()
    argv = ["eval", "zero-shot", "--model", str(folder), "--dataset", str(data / "colours")]
    assert hf_clip_main([*argv, "--num_workers", "0", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hf-clip eval: error: --model") and "hf-clip convert" in last


def test_max_samples_is_recorded_in_the_results(model_dir, data, tmp_path):
    # A --max_samples cut was reported like a run on the whole split (and filed so in model cards).
    argv = ["zero-shot", "--model", str(model_dir), "--dataset", str(data / "colours"), "--max_samples", "4"]
    record = run(argv, tmp_path / "out")
    assert record["config"]["max_samples"] == 4 and record["config"]["num_examples"] == 4
    assert "max_samples" not in run(argv[:-2], tmp_path / "all")["config"]


def test_bad_shifted_labels_are_named_before_any_image_is_encoded(loaded, monkeypatch):
    from hf_clip.evaluation import evaluate_robustness
    from hf_clip.evaluation.features import FeatureOptions

    model, processor = loaded
    names = list(COLOURS)
    images = [_image(COLOURS[n], 400 + i) for i, n in enumerate(names)]
    reference = Dataset.from_dict(
        {"image": images, "label": [0, 1, 2]},
        features=Features({"image": Image(), "label": ClassLabel(names=names)}),
    )
    shifted = Dataset.from_dict({"image": images, "label": [0, 1, 7]})  # plain integers, 7 out of range
    monkeypatch.setattr(FeatureOptions, "image_features", lambda *a, **k: pytest.fail("encoded images first"))
    with pytest.raises(
        ValueError, match=r"Shifted dataset 'v2': 1 labels in column 'label' fall outside 0\.\.2"
    ):
        evaluate_robustness(model, processor, {"in": reference, "v2": shifted})


@pytest.mark.parametrize("device", ["cdua", "cuda:0"])
def test_unusable_device_is_a_one_line_error(model_dir, data, tmp_path, capsys, device, monkeypatch):
    # A misspelt device, or a GPU this machine lacks, crashed with torch's traceback once the weights moved.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [
        "eval",
        "zero-shot",
        "--model",
        str(model_dir),
        "--dataset",
        str(data / "colours"),
        "--device",
        device,
    ]
    assert hf_clip_main([*argv, "--output_dir", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"hf-clip eval: error: --device {device}")
