"""Zero-shot pipelines on a tiny HfClipModel saved with its tokenizer and image processor.

Covers transformers' own "zero-shot-image-classification" pipeline (loaded from the folder through the Auto
classes) and hf_clip's cached, prompt-ensembling pipeline registered under its own task name.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from hf_clip import HfClipConfig, HfClipModel
from hf_clip.image_processing_hf_clip import HfClipImageProcessor
from hf_clip.processing_hf_clip import HfClipProcessor
from hf_clip.tokenization_hf_clip import HfClipTokenizer
from hf_clip.zero_shot import (
    ZERO_SHOT_TASK,
    EmbeddingIndex,
    HfClipZeroShotImageClassificationPipeline,
    ZeroShotClassifier,
    get_classnames,
    get_templates,
    register_pipelines,
)

open_clip = pytest.importorskip("open_clip")

IMAGE_SIZE = 32
LABELS = ["cat", "dog", "red sports car"]
# Over 77 tokens once templated: must be truncated by the tokenizer, not crash the 77-position text tower.
LONG_LABEL = " ".join(f"word{i}" for i in range(120))


@pytest.fixture(autouse=True)
def never_ask_to_trust_remote_code(monkeypatch):
    """transformers asks on the terminal (and waits 15 s) before running a folder's own code; loading a folder
    with hf_clip imported must never come to that."""
    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail(f"prompted: {args}"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = HfClipConfig(
        projection_dim=32,
        text_config=dict(hidden_size=64, num_hidden_layers=2),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, num_hidden_layers=2),
    )
    model = HfClipModel(config).eval()
    with torch.no_grad():  # a non-default temperature, so a missing exp() or scale would show
        model.logit_scale.fill_(3.0)
    tokenizer = HfClipTokenizer.from_openai_bpe()
    processor = HfClipProcessor(HfClipImageProcessor.for_image_size(IMAGE_SIZE), tokenizer)
    path = tmp_path_factory.mktemp("tiny_hf_clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parts(clip_dir):
    model = HfClipModel.from_pretrained(clip_dir).eval()
    return model, HfClipProcessor.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


def _model_softmax(model, processor, image, prompts):
    """The reference: the model's own forward, softmax over logits_per_image."""
    text = processor.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=77)
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(**text, pixel_values=pixels).logits_per_image.softmax(dim=-1)[0]


def _as_dict(result):
    return {entry["label"]: entry["score"] for entry in result}


# --- transformers' own pipeline ----------------------------------------------------------------------------


def test_stock_pipeline_scores_equal_model_softmax(clip_dir, parts, images):
    model, processor = parts
    classify = pipeline("zero-shot-image-classification", model=str(clip_dir))
    assert isinstance(classify.model, HfClipModel)
    result = classify(images[0], candidate_labels=LABELS)
    assert [entry["score"] for entry in result] == sorted((entry["score"] for entry in result), reverse=True)
    expected = _model_softmax(
        model, processor, images[0], [f"This is a photo of {label}." for label in LABELS]
    )
    got = _as_dict(result)
    for label, score in zip(LABELS, expected.tolist()):
        assert got[label] == pytest.approx(score, abs=1e-5)


def test_stock_pipeline_truncates_long_labels(clip_dir, parts, images):
    model, processor = parts
    classify = pipeline("zero-shot-image-classification", model=str(clip_dir))
    result = _as_dict(classify(images[0], candidate_labels=[LONG_LABEL, "cat"]))
    expected = _model_softmax(
        model, processor, images[0], [f"This is a photo of {x}." for x in (LONG_LABEL, "cat")]
    )
    assert result[LONG_LABEL] == pytest.approx(expected[0].item(), abs=1e-5)


# --- hf_clip's pipeline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pipe(clip_dir):
    register_pipelines()
    register_pipelines()  # idempotent
    return pipeline(ZERO_SHOT_TASK, model=str(clip_dir))


class _TextTowerCalls:
    """Counts forward calls of the text tower with a hook, so the test sees what the model really ran."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.text_model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def close(self):
        self._handle.remove()


def test_sigmoid_loss_models_score_each_label_with_its_sigmoid(parts, images, tmp_path):
    """A model trained with --loss siglip has a logit bias; its scores are per-label sigmoids of the model's own
    logits (bias included), as transformers' pipeline scores SigLIP models, and the classifier keeps the bias
    through save and load."""
    model, processor = parts
    siglip = HfClipModel(HfClipConfig(**{**model.config.to_dict(), "logit_bias_init_value": -4.0})).eval()
    siglip.load_state_dict(model.state_dict(), strict=False)
    classify = pipeline(
        ZERO_SHOT_TASK, model=siglip, tokenizer=processor.tokenizer, image_processor=processor.image_processor
    )
    got = _as_dict(classify(images[0], candidate_labels=LABELS))
    text = processor.tokenizer(
        [f"a photo of a {label}." for label in LABELS], return_tensors="pt", padding=True
    )
    pixels = processor.image_processor(images=[images[0]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = siglip(**text, pixel_values=pixels).logits_per_image.sigmoid()[0]
    for label, score in zip(LABELS, expected.tolist()):
        assert got[label] == pytest.approx(score, abs=1e-6)
    assert sum(got.values()) != pytest.approx(1.0, abs=1e-3)  # not a softmax
    classifier = ZeroShotClassifier.from_model(siglip, processor, LABELS, progress=False)
    classifier.save(tmp_path / "head")
    assert ZeroShotClassifier.load(tmp_path / "head").logit_bias == pytest.approx(-4.0)


def test_registered_task_builds_the_pipeline(hf_pipe):
    assert isinstance(hf_pipe, HfClipZeroShotImageClassificationPipeline)
    assert isinstance(hf_pipe.model, HfClipModel)


def test_single_template_scores_equal_model_softmax(hf_pipe, parts, images):
    model, processor = parts
    result = _as_dict(hf_pipe(images[1], candidate_labels=LABELS, hypothesis_template="a photo of a {}."))
    expected = _model_softmax(model, processor, images[1], [f"a photo of a {label}." for label in LABELS])
    for label, score in zip(LABELS, expected.tolist()):
        assert result[label] == pytest.approx(score, abs=1e-5)


def test_ensemble_scores_equal_classifier(hf_pipe, parts, images):
    model, processor = parts
    templates = get_templates("imagenet")
    classifier = ZeroShotClassifier.from_model(model, processor, LABELS, templates, progress=False)
    pixels = processor.image_processor(images=[images[0]], return_tensors="pt")["pixel_values"]
    expected = classifier(pixels).softmax(dim=-1)[0]
    for spelling in ("imagenet", templates, [t.replace("{}", "{label}") for t in templates]):
        result = _as_dict(hf_pipe(images[0], candidate_labels=LABELS, hypothesis_template=spelling))
        for label, score in zip(LABELS, expected.tolist()):
            assert result[label] == pytest.approx(score, abs=1e-5)


def test_class_embeddings_are_cached_across_calls(hf_pipe, images):
    hf_pipe.clear_cache()
    calls = _TextTowerCalls(hf_pipe.model)
    try:
        first = hf_pipe(
            images[0], candidate_labels=LABELS, hypothesis_template=["a photo of a {}.", "art of the {}."]
        )
        assert calls.count == 1  # 6 prompts, one text-tower batch
        second = hf_pipe(
            images[1], candidate_labels=LABELS, hypothesis_template=["a photo of a {}.", "art of the {}."]
        )
        batched = hf_pipe(
            images,
            candidate_labels=LABELS,
            hypothesis_template=["a photo of a {}.", "art of the {}."],
            batch_size=2,
        )
        assert calls.count == 1
        hf_pipe(images[0], candidate_labels=LABELS, hypothesis_template="a photo of a {}.")  # new templates
        assert calls.count == 2
        hf_pipe(images[0], candidate_labels=LABELS[:2], hypothesis_template="a photo of a {}.")  # new labels
        assert calls.count == 3
    finally:
        calls.close()
    assert _as_dict(batched[0]) == pytest.approx(_as_dict(first))
    assert _as_dict(batched[1]) == pytest.approx(_as_dict(second))
    assert len(batched) == 3


def test_cache_is_bounded(clip_dir, images):
    register_pipelines()
    small = pipeline(ZERO_SHOT_TASK, model=str(clip_dir), cache_size=2)
    for labels in (["a", "b"], ["c", "d"], ["e", "f"]):
        small(images[0], candidate_labels=labels)
    assert len(small._classifiers) == 2
    assert small.classifier_key(["a", "b"]) not in small._classifiers
    for bad in (0, 2.5):  # refused when the pipeline is built, naming the argument
        with pytest.raises(ValueError, match="prompt_batch_size must be an integer >= 1"):
            pipeline(ZERO_SHOT_TASK, model=str(clip_dir), prompt_batch_size=bad)


def test_long_labels_truncate_in_hf_pipeline(hf_pipe, parts, images):
    model, processor = parts
    result = _as_dict(
        hf_pipe(images[0], candidate_labels=[LONG_LABEL, "cat"], hypothesis_template="a photo of a {}.")
    )
    expected = _model_softmax(
        model, processor, images[0], [f"a photo of a {x}." for x in (LONG_LABEL, "cat")]
    )
    assert result[LONG_LABEL] == pytest.approx(expected[0].item(), abs=1e-5)


def test_shipped_labels_top_k_and_errors(hf_pipe, images):
    result = hf_pipe(images[0], candidate_labels="cifar10", top_k=3)
    assert len(result) == 3 and {entry["label"] for entry in result} <= set(get_classnames("cifar10"))
    with pytest.raises(ValueError, match="Pass candidate_labels"):
        hf_pipe(images[0])
    with pytest.raises(TypeError, match="Unexpected argument.*hypothesis_templates"):
        hf_pipe(images[0], candidate_labels=LABELS, hypothesis_templates="a photo of a {}.")
    with pytest.raises(ValueError, match=r"\[''\] tokenise to nothing"):
        hf_pipe(images[0], candidate_labels=["cat", ""])
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            hf_pipe(images[0], candidate_labels=LABELS, top_k=bad)


def test_classifier_accepts_transformers_clip_model(parts, images):
    """transformers' CLIPModel returns output objects from get_*_features in v5; the classifier reads either."""
    from transformers import CLIPConfig, CLIPModel

    _, processor = parts
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    classifier = ZeroShotClassifier.from_model(model, processor, LABELS, "a photo of a {}.", progress=False)
    pixels = processor.image_processor(images=images[:2], return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(
        [f"a photo of a {label}." for label in LABELS], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = model(**text, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(classifier(pixels), expected, rtol=1e-4, atol=1e-4)


def test_embedding_index_with_real_processor(parts, images, tmp_path):
    model, processor = parts
    index = EmbeddingIndex(model, processor, batch_size=2).add_images(images, ids=["a.jpg", "b.jpg", "c.jpg"])
    index.add_texts(LABELS)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(["a photo of a cat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        image_embeds = torch.nn.functional.normalize(model.get_image_features(pixels), dim=-1)
        query = torch.nn.functional.normalize(model.get_text_features(**text), dim=-1)[0]
    expected = (image_embeds @ query).topk(2)
    found = index.search_images("a photo of a cat", k=2)
    assert found.ids == [["a.jpg", "b.jpg", "c.jpg"][i] for i in expected.indices.tolist()]
    torch.testing.assert_close(found.scores, expected.values, rtol=1e-5, atol=1e-5)
    best_texts = index.search_texts(images[0], k=1)
    assert best_texts.ids[0] in LABELS and best_texts.scores.shape == (1,)
    index.save(tmp_path / "index")
    reloaded = EmbeddingIndex.load(tmp_path / "index", model=model, processor=processor)
    assert reloaded.search_images("a photo of a cat", k=2).ids == found.ids


def _awkward_images(tmp_path):
    """Images whose pixels depend on how they are read: transparency, a palette, 16 bits, EXIF rotation."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    rgba[:, :24, 3] = 0  # left half fully transparent: black for OpenAI's preprocessing, not its colours
    palette = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).convert("P")
    deep = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 65536, (40, 48), dtype=np.uint16)).save(deep)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(rotated, exif=exif)
    return {
        "rgba": Image.fromarray(rgba),
        "palette": palette,
        "16-bit path": str(deep),
        "exif path": str(rotated),
        "array": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),
    }


def test_pipeline_reads_images_as_processor_and_model_do(hf_pipe, parts, tmp_path):
    """The pipeline hands images to hf_clip's image processor as they are (no RGB conversion, no EXIF
    rotation), so its scores are those of processor + model, OpenAI's preprocessing."""
    from transformers.image_utils import load_image

    model, processor = parts
    classifier = ZeroShotClassifier.from_model(model, processor, LABELS, ["a photo of a {}."], progress=False)
    for name, image in _awkward_images(tmp_path).items():
        expected = _as_dict(classifier.classify(image, processor)[0])
        result = _as_dict(hf_pipe(image, candidate_labels=LABELS, hypothesis_template="a photo of a {}."))
        assert result == pytest.approx(expected, abs=1e-6), name
        if name != "array":  # transformers' loader (RGB, EXIF) gives other scores: the test can tell
            loaded = _as_dict(classifier.classify(load_image(image), processor)[0])
            assert max(abs(loaded[k] - expected[k]) for k in LABELS) > 1e-4, name
    # A 4-D tensor batch classifies like a list of its images.
    batch = torch.rand(2, 3, 40, 48)
    assert classifier.classify(batch, processor) == classifier.classify(list(batch), processor)


def test_unreachable_url_error_names_it(hf_pipe):
    with pytest.raises(ValueError, match="http://127.0.0.1:9/cat.jpg"):
        hf_pipe("http://127.0.0.1:9/cat.jpg", candidate_labels=LABELS)


def test_saved_pipeline_reloads(hf_pipe, images, tmp_path):
    """Pipeline.save_pretrained writes the model, tokenizer and image processor, as for transformers' own
    pipelines; it used to fail copying this module as Hub custom code (and left `custom_pipelines` in the
    model's config)."""
    expected = _as_dict(hf_pipe(images[0], candidate_labels=LABELS))
    hf_pipe.save_pretrained(tmp_path / "saved")
    assert not hasattr(hf_pipe.model.config, "custom_pipelines")
    reloaded = pipeline(ZERO_SHOT_TASK, model=str(tmp_path / "saved"))
    assert isinstance(reloaded, HfClipZeroShotImageClassificationPipeline)
    assert _as_dict(reloaded(images[0], candidate_labels=LABELS)) == pytest.approx(expected, abs=1e-6)


def test_call_arguments_given_at_init(clip_dir, images):
    """candidate_labels and hypothesis_template fixed when the pipeline is built serve every call."""
    fixed = pipeline(
        ZERO_SHOT_TASK, model=str(clip_dir), candidate_labels=LABELS, hypothesis_template="art of a {}."
    )
    per_call = pipeline(ZERO_SHOT_TASK, model=str(clip_dir))
    expected = per_call(images[0], candidate_labels=LABELS, hypothesis_template="art of a {}.")
    assert _as_dict(fixed(images[0])) == pytest.approx(_as_dict(expected), abs=1e-6)
    batch = per_call(images[:2], candidate_labels=LABELS, hypothesis_template="art of a {}.")
    for got, want in zip(fixed(images[:2]), batch, strict=True):
        assert _as_dict(got) == pytest.approx(_as_dict(want), abs=1e-6)
    assert {r["label"] for r in fixed(images[0], candidate_labels=["cat", "dog"])} == {"cat", "dog"}


def test_tuple_of_images_is_a_batch_and_nested_lists_are_refused(hf_pipe, images):
    """A tuple of images used to reach preprocess as one input: the image processor flattened it and only
    the first image's scores came back."""
    as_list = hf_pipe(images[:2], candidate_labels=LABELS)
    as_tuple = hf_pipe(tuple(images[:2]), candidate_labels=LABELS)
    assert len(as_tuple) == 2
    for got, want in zip(as_tuple, as_list, strict=True):
        assert _as_dict(got) == pytest.approx(_as_dict(want), abs=1e-6)
    assert len(hf_pipe(images=tuple(images[:2]), candidate_labels=LABELS)) == 2
    with pytest.raises(ValueError, match="One input held 2 images"):
        hf_pipe([images[:2], images[2]], candidate_labels=LABELS)


def test_tokenizer_kwargs_reach_the_tokenizer_and_key_the_cache(hf_pipe, parts, images):
    model, processor = parts
    template = "a photo of a {}."
    prompts = [template.format(label) for label in LABELS]
    plain = _as_dict(hf_pipe(images[0], candidate_labels=LABELS, hypothesis_template=template))
    short = _as_dict(
        hf_pipe(
            images[0],
            candidate_labels=LABELS,
            hypothesis_template=template,
            tokenizer_kwargs={"max_length": 6},
        )
    )
    text = processor.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=6)
    pixels = processor.image_processor(images=[images[0]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(**text, pixel_values=pixels).logits_per_image.softmax(dim=-1)[0]
    assert short == pytest.approx(dict(zip(LABELS, expected.tolist())), abs=1e-5)
    assert short != pytest.approx(plain, abs=1e-4)  # the truncated prompts were not served from the cache
    # Padding to the context changes nothing for a model that pools at the end-of-text token.
    padded = hf_pipe(
        images[0],
        candidate_labels=LABELS,
        hypothesis_template=template,
        tokenizer_kwargs={"padding": "max_length"},
    )
    assert _as_dict(padded) == pytest.approx(plain, abs=1e-5)
    with pytest.raises(TypeError, match="tokenizer_kwargs must be a dict"):
        hf_pipe(images[0], candidate_labels=LABELS, tokenizer_kwargs="max_length")
    with pytest.raises(ValueError, match="tokenizer_kwargs may not set return_tensors"):
        hf_pipe(images[0], candidate_labels=LABELS, tokenizer_kwargs={"return_tensors": "np"})
