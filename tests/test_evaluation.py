"""Evaluation building blocks on hand-made data: the shipped `evaluate` metrics (offline), classification
and retrieval arithmetic against manual computation, the linear-probe search, dataset/label loading and
its errors, feature extraction and caching, and the JSON/markdown/PNG reports.

End-to-end runs of each evaluation through the CLI with a tiny HfClipModel are in test_eval_cli.py.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from hf_clip.evaluation import (
    EvalResult,
    classification_metrics,
    extract_image_features,
    extract_text_features,
    load_eval_dataset,
    load_metric,
    parse_classnames,
    resolve_labels,
    retrieval_metrics,
    save_result,
    to_markdown,
)
from hf_clip.evaluation.classification import classification_result, per_class_names
from hf_clip.evaluation.linear_probe import evaluate_linear_probe, parametric_search, sweep_regularization
from hf_clip.evaluation.loading import LabelInfo, align_labels, check_dataset
from hf_clip.evaluation.metrics import METRICS_DIR, SHIPPED_METRICS
from hf_clip.evaluation.retrieval import evaluate_retrieval, flatten_captions

# --- shipped metric modules ----------------------------------------------------------------------------------


def test_metric_modules_load_offline_without_network(tmp_path):
    """evaluate.load(<local path>) with the Hub marked offline and every socket connection refused."""
    script = textwrap.dedent(
        """
        import socket, sys
        def refuse(*args, **kwargs):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import evaluate
        metrics_dir = sys.argv[1]
        top_k = evaluate.load(metrics_dir + "/top_k_accuracy", keep_in_memory=True)
        recall = evaluate.load(metrics_dir + "/mean_per_class_recall", keep_in_memory=True)
        retrieval = evaluate.load(metrics_dir + "/retrieval_recall/retrieval_recall.py")
        print(top_k.compute(predictions=[[2, 0], [1, 2]], references=[0, 1], k=[1, 2]))
        print(recall.compute(predictions=[0, 0], references=[0, 1])["mean_per_class_recall"])
        print(retrieval.compute(predictions=[[3, 1], [2, 0]], references=[[0, 1], [1]], k=[2]))
        """
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),  # an empty cache: nothing can come from an earlier download
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(METRICS_DIR)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines == ["{'top1_accuracy': 0.5, 'top2_accuracy': 1.0}", "0.5", "{'recall@2': 0.5}"]


def test_metric_modules_are_package_files():
    for name in SHIPPED_METRICS:
        assert (METRICS_DIR / name / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="Unknown metric"):
        load_metric("accuracy")


def test_metric_input_errors():
    with pytest.raises(ValueError, match="at least one"):
        load_metric("top_k_accuracy").compute(predictions=[], references=[])
    with pytest.raises(ValueError, match="relevant candidate"):
        load_metric("retrieval_recall").compute(predictions=[[0]], references=[[]])
    with pytest.raises(ValueError, match="num_classes"):
        load_metric("mean_per_class_recall").compute(predictions=[0, 3], references=[0, 1], num_classes=2)


# --- classification arithmetic -------------------------------------------------------------------------------


def test_classification_metrics_match_manual_computation():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 7))
    labels = rng.integers(0, 7, size=200)
    scores[np.arange(0, 200, 3), labels[::3]] += 3.0  # make it better than chance
    metrics = classification_metrics(torch.as_tensor(scores), labels, top_k=(1, 3, 5))

    order = np.argsort(-scores, axis=1)
    for k in (1, 3, 5):
        manual = np.mean([labels[i] in order[i, :k] for i in range(200)])
        assert metrics[f"top{k}_accuracy"] == pytest.approx(manual)
    predicted = order[:, 0]
    recalls = [np.mean(predicted[labels == c] == c) for c in range(7)]
    assert metrics["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
    assert metrics["per_class_recall"] == pytest.approx(recalls)
    assert metrics["top1_accuracy"] > 0.3  # the planted signal is seen


def test_mean_per_class_recall_by_hand():
    # class 0: 1 of 2 right, class 1: 2 of 3, class 2: 2 of 2, class 3: no examples (left out of the mean)
    scores = torch.zeros(7, 4)
    predictions = [0, 0, 1, 1, 2, 2, 2]
    scores[torch.arange(7), torch.tensor(predictions)] = 1.0
    labels = [0, 1, 1, 1, 2, 2, 0]
    metrics = classification_metrics(scores, labels, top_k=(1,))
    assert metrics["top1_accuracy"] == pytest.approx(5 / 7)
    assert metrics["mean_per_class_recall"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["per_class_recall"] == pytest.approx([0.5, 2 / 3, 1.0, None])


def test_top_k_beyond_class_count_and_bad_shapes():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    metrics = classification_metrics(scores, [0, 0], top_k=(1, 2, 5))
    # Top-5 of 3 classes is 100% whatever the scores: left out, not reported.
    assert (
        metrics["top1_accuracy"] == 0.5 and metrics["top2_accuracy"] == 1.0 and "top5_accuracy" not in metrics
    )
    for bad in ((), (0, 1), 5):
        with pytest.raises(ValueError, match="top_k must be"):
            classification_metrics(scores, [0, 0], top_k=bad)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        classification_metrics(scores, [0, 0, 1])


def test_repeated_class_names_keep_their_own_per_class_entries():
    # ImageNet's published list has two "missile" and two "sunglasses" classes.
    assert per_class_names(["missile", "cat", ["missile", "rocket"]]) == [
        "missile (#0)",
        "cat",
        "missile (#2)",
    ]
    info = LabelInfo(np.array([0, 1, 2]), ["missile", "cat", "missile"], ["a", "b", "c"])
    scores = torch.eye(3)[[0, 1, 0]]  # the third image is called the first missile
    metrics = classification_metrics(scores, info.labels, top_k=(1,))
    result = classification_result("zero-shot", metrics, info, "m", "d", {})
    assert result.per_class == {"missile (#0)": 1.0, "cat": 1.0, "missile (#2)": 0.0}


# --- retrieval arithmetic ------------------------------------------------------------------------------------

# Three images (unit axes) and five captions: image 0 has captions 0 and 1, image 1 has caption 2,
# image 2 has captions 3 and 4. Caption 0 points at image 1 and caption 2 at image 2 (both wrong).
IMAGES = torch.eye(3)
TEXTS = torch.tensor([[0.1, 1, 0], [1, 0, 0.2], [0, 0.5, 1], [0, 0, 1], [0.9, 0, 1]])
OWNERS = [0, 0, 1, 2, 2]


def test_retrieval_recall_by_hand_with_several_captions():
    metrics = retrieval_metrics(IMAGES, TEXTS, OWNERS, k=(1, 2, 10))
    # image->text: image 0's best caption is its own caption 1 (hit, though caption 0 is wrong), image 1's
    # best is caption 0 (miss; its caption 2 comes second), image 2's best is caption 3 (hit).
    assert metrics["image_to_text_recall@1"] == pytest.approx(2 / 3)
    assert metrics["image_to_text_recall@2"] == 1.0
    # text->image: captions 0 and 2 rank their image second, the other three first.
    assert metrics["text_to_image_recall@1"] == pytest.approx(3 / 5)
    assert metrics["text_to_image_recall@2"] == 1.0
    # k at least the number of candidates (5 captions, 3 images) is 1.0 for any model: left out, not averaged.
    assert not any(name.endswith("@10") for name in metrics)
    assert metrics["mean_recall"] == pytest.approx(np.mean([2 / 3, 1, 3 / 5, 1]))
    assert "text_to_image_recall@3" not in retrieval_metrics(IMAGES, TEXTS, OWNERS, k=(1, 2, 3))
    assert "image_to_text_recall@3" in retrieval_metrics(IMAGES, TEXTS, OWNERS, k=(1, 2, 3))


def test_retrieval_recall_matches_manual_on_random_features():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(20, 16))
    owners = np.repeat(np.arange(20), rng.integers(1, 6, size=20))
    texts = images[owners] + rng.normal(scale=1.5, size=(len(owners), 16))
    metrics = retrieval_metrics(torch.as_tensor(images), torch.as_tensor(texts), owners, k=(1, 5))

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sim = unit(images) @ unit(texts).T
    for k in (1, 5):
        i2t = np.mean(
            [np.isin(np.argsort(-sim[i])[:k], np.flatnonzero(owners == i)).any() for i in range(20)]
        )
        t2i = np.mean([owners[j] in np.argsort(-sim[:, j])[:k] for j in range(len(owners))])
        assert metrics[f"image_to_text_recall@{k}"] == pytest.approx(i2t)
        assert metrics[f"text_to_image_recall@{k}"] == pytest.approx(t2i)


def test_flatten_captions():
    texts, owners = flatten_captions(["a dog", ["a cat", "the cat"], ("x",)])
    assert texts == ["a dog", "a cat", "the cat", "x"] and owners.tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="Image 1 has no caption"):
        flatten_captions([["a"], []])
    with pytest.raises(ValueError, match="Image 0's caption is a int, not text.*--caption_column"):
        flatten_captions([0, 1])  # a label column chosen by mistake


# --- linear probe --------------------------------------------------------------------------------------------


def test_parametric_search_reaches_eighth_decade_resolution():
    calls = []

    def score(x):
        calls.append(x)
        return -abs(x - 1.375)  # peak exactly on the 1/8-decade grid

    best, scores = parametric_search(score)
    assert best == pytest.approx(1.375)
    assert len(calls) == len(set(calls)) == 15  # 7 coarse points + 2 per halving (4 halvings)
    assert sorted(scores)[:7] == [-6.0, -4.0, -2.0] + sorted(scores)[3:7]
    assert min(abs(x - 1.375) for x in calls if x != best) == pytest.approx(0.125)


def test_parametric_search_ties_prefer_stronger_regularisation():
    best, _ = parametric_search(lambda x: 1.0)
    assert best == -6.0


def test_regularization_sweep_on_imbalanced_blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3, size=(3, 8))
    labels = np.repeat(np.arange(3), [60, 20, 10])  # a crushed model predicts the majority class: 2/3 right
    features = (centers[labels] + rng.normal(size=(90, 8))).astype(np.float32)
    train, val = np.arange(90) % 3 != 0, np.arange(90) % 3 == 0
    sweep = sweep_regularization(
        features[train], labels[train], features[val], labels[val], 3, max_iter=300, progress=False
    )
    tried = [h["log10_C"] for h in sweep.history]
    assert set(range(-6, 7, 2)) <= set(tried) and 11 <= len(tried) <= 15
    assert sweep.best_score == max(h["top1_accuracy"] for h in sweep.history) >= 0.95
    assert sweep.history[0]["top1_accuracy"] < 0.8  # C=1e-6 underfits, so the choice of C matters
    best = np.log10(sweep.best_c)
    assert min(abs(t - best) for t in tried if t != best) == pytest.approx(0.125)


# --- datasets, labels and class names ------------------------------------------------------------------------


def _images(n, size=8):
    return [PILImage.new("RGB", (size, size), (i * 20 % 256, 0, 255 - i * 20 % 256)) for i in range(n)]


def test_label_resolution_and_errors():
    classlabel = Dataset.from_dict(
        {"label": [0, 1, 1]}, features=Features({"label": ClassLabel(names=["cat", "dog"])})
    )
    info = resolve_labels(classlabel, "label")
    assert info.classnames == ["cat", "dog"] and info.labels.tolist() == [0, 1, 1]
    assert resolve_labels(classlabel, "label", ["a cat", "a dog"]).label_names == ["cat", "dog"]
    with pytest.raises(ValueError, match="2 classes but 3 class names"):
        resolve_labels(classlabel, "label", ["a", "b", "c"])

    strings = Dataset.from_dict({"label": ["dog", "cat", "dog"]})
    info = resolve_labels(strings, "label")
    assert info.classnames == ["cat", "dog"] and info.labels.tolist() == [1, 0, 1]
    assert resolve_labels(strings, "label", ["dog", "cat"]).labels.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="not among the class names"):
        resolve_labels(strings, "label", ["dog", "bird"])

    # Shipped lists give some classes as synonyms (FER2013): a string label matches any of them.
    moods = resolve_labels(
        Dataset.from_dict({"label": ["joyful", "sad"]}), "label", ["angry", ["happy", "joyful"], "sad"]
    )
    assert moods.labels.tolist() == [1, 2] and moods.label_names == ["angry", "happy", "sad"]

    integers = Dataset.from_dict({"label": [0, 2]})
    with pytest.raises(ValueError, match=r"without class names.*--classnames"):
        resolve_labels(integers, "label")
    assert resolve_labels(integers, "label", ["a", "b", "c"]).labels.tolist() == [0, 2]
    with pytest.raises(ValueError, match="outside 0..1"):
        resolve_labels(integers, "label", ["a", "b"])


def test_align_labels_subset_by_name():
    reference = resolve_labels(Dataset.from_dict({"label": ["a", "b", "c", "d"]}), "label")
    subset = resolve_labels(Dataset.from_dict({"label": ["d", "b", "d"]}), "label")
    assert align_labels(subset, reference).tolist() == [3, 1, 3]
    with pytest.raises(ValueError, match="not in the reference label set"):
        align_labels(resolve_labels(Dataset.from_dict({"label": ["z"]}), "label"), reference)


def test_check_dataset_errors():
    ds = Dataset.from_dict({"img": [1], "label": [0]})
    with pytest.raises(ValueError, match=r"'image'.*available columns: img, label"):
        check_dataset(ds, ["image", "label"])
    with pytest.raises(ValueError, match="is empty"):
        check_dataset(ds.select([]), ["img"])


def test_parse_classnames(tmp_path):
    assert parse_classnames(" cat, dog ") == ["cat", "dog"]
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    assert parse_classnames(str(tmp_path / "names.txt")) == ["cat", "dog"]
    (tmp_path / "names.json").write_text(json.dumps({"1": "dog", "0": "cat"}))
    assert parse_classnames(str(tmp_path / "names.json")) == ["cat", "dog"]
    with pytest.raises(ValueError, match="empty name"):
        parse_classnames("cat,,dog")
    with pytest.raises(ValueError, match="repeated: cat"):
        parse_classnames("cat,dog,cat")


def test_load_eval_dataset_from_every_source(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    ds = Dataset.from_dict({"image": _images(4), "label": [0, 1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    assert len(load_eval_dataset(tmp_path / "single", "anything")) == 4
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_eval_dataset(tmp_path / "dict", "test")) == 1
    with pytest.raises(ValueError, match="available splits: train, test"):
        load_eval_dataset(tmp_path / "dict", "validation")

    for split, names in {"train": ["a", "b"], "test": ["a", "b"]}.items():
        for name in names:
            folder = tmp_path / "folder" / split / name
            folder.mkdir(parents=True)
            _images(1)[0].save(folder / "0.png")
    folder_ds = load_eval_dataset(tmp_path / "folder", "test")
    assert len(folder_ds) == 2 and folder_ds.features["label"].names == ["a", "b"]

    (tmp_path / "csv" / "pics").mkdir(parents=True)
    _images(1)[0].save(tmp_path / "csv" / "pics" / "x.png")
    (tmp_path / "csv" / "data.csv").write_text("image,label\npics/x.png,cat\n")
    csv_ds = load_eval_dataset(tmp_path / "csv" / "data.csv", "test")
    assert Path(csv_ds[0]["image"]).is_file()  # relative path resolved against the csv's folder

    ds.to_parquet(str(tmp_path / "data.parquet"))
    parquet_ds = load_eval_dataset(tmp_path / "data.parquet", "test")
    assert parquet_ds.features["label"].names == ["a", "b"] and parquet_ds[1]["image"].size == (8, 8)
    (tmp_path / "data.jsonl").write_text('{"image": "csv/pics/x.png", "label": "cat"}\n')
    json_ds = load_eval_dataset(tmp_path / "data.jsonl", "validation", image_column="image")
    assert json_ds[0]["image"] == str(tmp_path / "csv" / "pics" / "x.png")

    with pytest.raises(FileNotFoundError):
        load_eval_dataset(tmp_path / "missing", "test")
    (tmp_path / "data.xyz").write_text("")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_eval_dataset(tmp_path / "data.xyz", "test")


# --- feature extraction --------------------------------------------------------------------------------------


class _CountingModel(torch.nn.Module):
    """Image features = per-channel means of the pixels; text features = string length; counts its calls."""

    def __init__(self, name_or_path):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.name_or_path = name_or_path
        self.image_calls = 0

    def get_image_features(self, pixel_values):
        self.image_calls += 1
        return pixel_values.mean(dim=(2, 3)) * self.scale

    def get_text_features(self, input_ids, attention_mask=None):
        return torch.stack([attention_mask.sum(1).float(), input_ids[:, 0].float()], dim=1)


class _ToTensorProcessor:
    def __call__(self, images, return_tensors="pt"):
        arrays = [np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255 for img in images]
        return {"pixel_values": torch.as_tensor(np.stack(arrays))}

    def to_dict(self):
        return {"kind": "to-tensor"}


class _CharTokenizer:
    model_max_length = 77

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt"):
        width = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor([ord(c) for c in t])
            mask[i, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_extract_image_features_in_order_and_cached(tmp_path):
    (tmp_path / "model").mkdir()
    model = _CountingModel(str(tmp_path / "model"))
    images = _images(5)
    ds = Dataset.from_dict({"image": images}, features=Features({"image": Image()}))
    expected = torch.stack(
        [torch.as_tensor(np.asarray(i, dtype=np.float32) / 255).mean(dim=(0, 1)) for i in images]
    )

    feats = extract_image_features(
        model, _ToTensorProcessor(), ds, batch_size=2, cache_dir=tmp_path / "c", progress=False
    )
    torch.testing.assert_close(feats, expected)
    assert model.image_calls == 3 and len(list((tmp_path / "c").glob("image-features-*.safetensors"))) == 1
    again = extract_image_features(
        model, _ToTensorProcessor(), ds, batch_size=2, cache_dir=tmp_path / "c", progress=False
    )
    assert model.image_calls == 3  # served from the cache
    torch.testing.assert_close(again, expected)
    # A different split of rows (another fingerprint) is a different cache entry.
    extract_image_features(
        model, _ToTensorProcessor(), ds.select([0, 1]), cache_dir=tmp_path / "c", progress=False
    )
    assert model.image_calls == 4
    # The key follows the weights the model holds now, not its folder: edited or re-typed weights recompute.
    with torch.no_grad():
        model.scale.mul_(2)
    edited = extract_image_features(model, _ToTensorProcessor(), ds, cache_dir=tmp_path / "c", progress=False)
    assert model.image_calls == 5
    torch.testing.assert_close(edited, 2 * expected)
    model.double()
    extract_image_features(model, _ToTensorProcessor(), ds, cache_dir=tmp_path / "c", progress=False)
    assert model.image_calls == 6
    model.float()
    with torch.no_grad():
        model.scale.fill_(1)

    paths = Dataset.from_dict({"path": [str(tmp_path / "p.png")]})
    images[0].save(tmp_path / "p.png")
    workers = extract_image_features(
        model, _ToTensorProcessor(), paths, "path", num_workers=1, progress=False
    )
    torch.testing.assert_close(workers, expected[:1])  # path strings, preprocessing in a worker process
    with pytest.raises(ValueError, match="available columns: path"):
        extract_image_features(model, _ToTensorProcessor(), paths, "image")
    with pytest.raises(ValueError, match="empty dataset"):
        extract_image_features(model, _ToTensorProcessor(), paths.select([]), "path")


class _LinearImageModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 16)

    def get_image_features(self, pixel_values):
        return self.proj(pixel_values.mean(dim=(2, 3)))


def test_extract_image_features_bf16_autocast():
    torch.manual_seed(0)
    model = _LinearImageModel()
    ds = Dataset.from_dict({"image": _images(4)}, features=Features({"image": Image()}))
    full = extract_image_features(model, _ToTensorProcessor(), ds, progress=False)
    half = extract_image_features(model, _ToTensorProcessor(), ds, dtype="bf16", progress=False)
    assert half.dtype == full.dtype == torch.float32
    assert not torch.equal(half, full)  # the projection really ran in bfloat16
    torch.testing.assert_close(half, full, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="Unsupported dtype"):
        extract_image_features(model, _ToTensorProcessor(), ds, dtype="int8", progress=False)


def test_linear_probe_on_a_few_shot_training_set():
    # 10 classes x 2 images: a 20% validation share (4 images) cannot hold every class, so the split is random
    # instead of a stratified one that sklearn would refuse.
    torch.manual_seed(0)
    names = [f"c{i}" for i in range(10)]
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    images = [PILImage.new("RGB", (8, 8), (25 * c, 255 - 25 * c, (70 * c) % 256)) for c in range(10)]
    train = Dataset.from_dict({"image": images * 2, "label": list(range(10)) * 2}, features=features)
    test = Dataset.from_dict({"image": images, "label": list(range(10))}, features=features)
    processor = type("Processor", (), {"image_processor": _ToTensorProcessor()})()
    result = evaluate_linear_probe(
        _LinearImageModel(), processor, train, test, feature="projected", max_iter=200, top_k=(1, 5)
    )
    assert result.config["validation"] == "20% of train (random)" and result.config["num_validation"] == 4
    assert 0 <= result.metrics["top1_accuracy"] <= 1 and "top5_accuracy" in result.metrics


def test_extract_text_features_batches_and_cache(tmp_path):
    (tmp_path / "model").mkdir()
    model = _CountingModel(str(tmp_path / "model"))
    texts = ["ab", "a longer one", "xyz"]
    feats = extract_text_features(
        model, _CharTokenizer(), texts, batch_size=2, cache_dir=tmp_path, progress=False
    )
    assert feats.tolist() == [[2.0, 97.0], [12.0, 97.0], [3.0, 120.0]]
    assert len(list(tmp_path.glob("text-features-*.safetensors"))) == 1
    with pytest.raises(ValueError, match="empty list"):
        extract_text_features(model, _CharTokenizer(), [])


# --- reports -------------------------------------------------------------------------------------------------


def test_save_result_writes_json_markdown_png(tmp_path):
    result = EvalResult(
        task="zero-shot",
        model="tiny",
        dataset="pets",
        metrics={"top1_accuracy": 0.5, "top5_accuracy": 1.0, "mean_per_class_recall": 0.25},
        config={"split": "test"},
        per_class={"cat": 0.5, "dog": 0.0, "fish": None},
    )
    paths = save_result(result, tmp_path / "out")
    record = json.loads(paths["json"].read_text())
    assert record["task"] == "zero-shot" and record["dataset"] == "pets" and record["model"] == "tiny"
    assert record["metrics"]["top1_accuracy"] == 0.5 and record["config"] == {"split": "test"}
    assert "| top1_accuracy | 50.00 |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "zero-shot_pets.json",
        "zero-shot_pets.md",
        "zero-shot_pets.png",
    ]

    result.config["split"] = "train"  # another split gets its own files
    assert save_result(result, tmp_path / "out")["json"].name == "zero-shot_pets_train.json"

    multi = EvalResult(
        task="robustness",
        model="tiny",
        dataset="in",
        metrics={"top1_accuracy": 0.8},
        per_dataset={
            "in": {"top1_accuracy": 0.8},
            "shift": {"top1_accuracy": 0.6, "top1_accuracy_gap": -0.2},
        },
    )
    markdown = to_markdown(multi)
    assert "| in | 80.00 | n/a |" in markdown and "| shift | 60.00 | -20.00 |" in markdown
    assert save_result(multi, tmp_path / "multi")["plot"].read_bytes()[:4] == b"\x89PNG"
    assert save_result(multi, tmp_path / "out")["plot"].stat().st_size > 0


def test_align_labels_keeps_repeated_names_and_synonym_lists_apart():
    # ImageNet's published names hold two "missile" and two "sunglasses" classes; fer2013's hold synonym lists.
    names = ["missile", ["happy", "smiling"], "missile", "sunglasses", "sunglasses"]
    info = LabelInfo(np.array([0, 1, 2, 3, 4]), names, names)
    assert align_labels(info, info).tolist() == [0, 1, 2, 3, 4]
    subset = LabelInfo(np.array([0, 0]), ["missile"], ["missile"])
    with pytest.raises(ValueError, match="more than once"):
        align_labels(subset, info)
    reordered = [["happy", "smiling"], "missile"]
    unique = ["missile", ["happy", "smiling"], "c"]
    assert align_labels(
        LabelInfo(np.array([0, 1]), reordered, reordered), LabelInfo(np.arange(3), unique, unique)
    ).tolist() == [1, 0]


@pytest.mark.parametrize("names", [["missile", "b", "missile", "d"], ["a", ["b", "bee"], "c", "d"]])
def test_linear_probe_with_integer_labels_and_shipped_style_classnames(names):
    # `--classnames imagenet1k` (repeated names) merged one class's labels into its namesake's; `--classnames
    # fer2013` (synonym lists) crashed with "unhashable type: 'list'".
    torch.manual_seed(0)
    features = Features({"image": Image(), "label": Value("int64")})
    images = [PILImage.new("RGB", (8, 8), (60 * c, 255 - 60 * c, (90 * c) % 256)) for c in range(4)]
    train = Dataset.from_dict({"image": images * 5, "label": list(range(4)) * 5}, features=features)
    test = Dataset.from_dict({"image": images, "label": list(range(4))}, features=features)
    processor = type("Processor", (), {"image_processor": _ToTensorProcessor()})()
    result = evaluate_linear_probe(
        _LinearImageModel(), processor, train, test, classnames=names, feature="projected", max_iter=200
    )
    assert len(result.per_class) == 4 and all(recall is not None for recall in result.per_class.values())


def test_saved_results_and_feature_cache_get_the_usual_file_mode(tmp_path):
    # mkstemp creates its file 0600; renamed over the final name, results in a shared folder were unreadable
    # by anyone else (0644 expected under the usual umask 022).
    from hf_clip._io import atomic_write_text
    from hf_clip.evaluation.features import _save_cached

    old = os.umask(0o022)
    try:
        result = EvalResult(task="zero-shot", model="m", dataset="d", metrics={"top1_accuracy": 0.5})
        paths = list(save_result(result, tmp_path / "out").values())
        _save_cached(tmp_path / "cache" / "f.safetensors", torch.zeros(2, 3), {"kind": "image"})
        paths += [tmp_path / "cache" / "f.safetensors", atomic_write_text(tmp_path / "a" / "bias.md", "text")]
    finally:
        os.umask(old)
    assert len(paths) == 5 and {oct(p.stat().st_mode & 0o777) for p in paths} == {"0o644"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_options_fail_before_any_feature_is_extracted():
    class Untouchable(_LinearImageModel):
        def forward(self, *args, **kwargs):
            raise AssertionError("features were extracted before the options were checked")

        get_image_features = forward

    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    images = [PILImage.new("RGB", (8, 8), (60 * c, 0, 0)) for c in range(4)]
    data = Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)
    processor = type("Processor", (), {"image_processor": _ToTensorProcessor()})()
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        evaluate_linear_probe(Untouchable(), processor, data, data, val_fraction=1.5)
    captions = Dataset.from_dict({"image": images, "caption": ["a", "b", "c", "d"]})
    with pytest.raises(ValueError, match=r"k must be integers >= 1, got \[0, 5\]"):
        evaluate_retrieval(Untouchable(), processor, captions, k=[0, 5])
