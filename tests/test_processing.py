"""HfClipProcessor: one call for text and images, kwargs routing, save/load (incl. Auto classes), and the
zero-shot-image-classification pipeline with a tiny HfClipModel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, pipeline

from hf_clip import HfClipConfig, HfClipModel
from hf_clip.image_processing_hf_clip import HfClipImageProcessor
from hf_clip.processing_hf_clip import HfClipProcessor
from hf_clip.tokenization_hf_clip import HfClipTokenizer

TEXTS = ["a photo of a cat.", "a diagram of a very small dog"]
LABELS = ["cat", "dog", "car"]


def register_auto_classes() -> None:
    """The registrations `import hf_clip` is to make (idempotent), so Auto classes and remote code work."""
    AutoTokenizer.register(HfClipConfig, tokenizer_class=HfClipTokenizer, exist_ok=True)
    AutoImageProcessor.register(
        HfClipConfig,
        image_processor_classes={"pil": HfClipImageProcessor, "torchvision": HfClipImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(HfClipConfig, HfClipProcessor, exist_ok=True)
    HfClipTokenizer.register_for_auto_class("AutoTokenizer")
    HfClipImageProcessor.register_for_auto_class("AutoImageProcessor")
    HfClipProcessor.register_for_auto_class("AutoProcessor")


@pytest.fixture(scope="module")
def processor() -> HfClipProcessor:
    register_auto_classes()
    tokenizer = HfClipTokenizer.from_openai_bpe()
    return HfClipProcessor(image_processor=HfClipImageProcessor.for_image_size(32), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def model() -> HfClipModel:
    torch.manual_seed(0)
    config = HfClipConfig.from_preset(
        "RN50",
        vision_config={
            "hidden_size": 8,
            "resnet_layers": [1, 1, 1, 1],
            "image_size": 32,
            "num_attention_heads": 2,
        },
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    return HfClipModel(config).eval()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(load_sample_images().images[1])  # flower.jpg


def test_text_and_images_in_one_call(processor, photo):
    array = np.asarray(photo.convert("L"))
    out = processor(text=TEXTS, images=[photo, array], return_tensors="pt", padding=True)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["pixel_values"].shape == (2, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    expected_pixels = processor.image_processor([photo, array], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], expected_pixels, rtol=0, atol=0)
    expected_text = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    torch.testing.assert_close(out["input_ids"], expected_text["input_ids"])
    torch.testing.assert_close(out["attention_mask"], expected_text["attention_mask"])
    ids = out["input_ids"]
    assert (ids[:, 0] == 49406).all() and ((ids == 49407).sum(dim=1) == 1).all()
    assert out["attention_mask"][0].sum() < out["attention_mask"][1].sum()  # the shorter text is padded


def test_either_modality_alone_and_kwargs_routing(processor, photo):
    assert set(processor(text="a dog", return_tensors="pt")) == {"input_ids", "attention_mask"}
    images_only = processor(images=photo, return_tensors="pt")
    assert set(images_only) == {"pixel_values"}
    fast = processor(images=photo, return_tensors="pt", fast_path=True)["pixel_values"]
    expected_fast = processor.image_processor(photo, return_tensors="pt", fast_path=True)["pixel_values"]
    torch.testing.assert_close(fast, expected_fast, rtol=0, atol=0)
    assert not torch.equal(fast, images_only["pixel_values"])  # the kwarg reached the image processor
    with pytest.raises(ValueError, match="at least one input"):
        processor()


def test_save_and_load_round_trip(processor, photo, tmp_path):
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "HfClipProcessor"
    assert saved["auto_map"]["AutoProcessor"].endswith("HfClipProcessor")
    assert (tmp_path / "processing_hf_clip.py").is_file()
    expected = processor(text=TEXTS, images=photo, return_tensors="pt", padding=True)
    for loaded in (HfClipProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is HfClipProcessor
        assert type(loaded.tokenizer) is HfClipTokenizer
        assert type(loaded.image_processor) is HfClipImageProcessor
        assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
        out = loaded(text=TEXTS, images=photo, return_tensors="pt", padding=True)
        for key in expected:
            torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)


def manual_scores(model, processor, image, labels, template="This is a photo of {}.") -> dict[str, float]:
    inputs = processor(
        text=[template.format(label) for label in labels], images=image, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(dim=-1)[0]
    return dict(zip(labels, probs.tolist()))


def check_pipeline_result(result, expected: dict[str, float]) -> None:
    assert [r["label"] for r in result] == sorted(expected, key=expected.get, reverse=True)
    for row in result:
        assert row["score"] == pytest.approx(expected[row["label"]], abs=1e-5)


def test_zero_shot_pipeline_from_objects(model, processor, photo):
    classifier = pipeline(
        "zero-shot-image-classification",
        model=model,
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    expected = manual_scores(model, processor, photo, LABELS)
    check_pipeline_result(classifier(photo, candidate_labels=LABELS), expected)
    batch = classifier([photo, photo.rotate(90, expand=True)], candidate_labels=LABELS)
    assert len(batch) == 2
    check_pipeline_result(batch[0], expected)


def test_zero_shot_pipeline_from_a_saved_folder(model, processor, photo, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    assert type(classifier.image_processor) is HfClipImageProcessor
    assert type(classifier.tokenizer) is HfClipTokenizer
    path = Path(tmp_path) / "photo.png"
    photo.save(path)
    check_pipeline_result(
        classifier(str(path), candidate_labels=LABELS), manual_scores(model, processor, photo, LABELS)
    )
