"""Zero-shot data (published prompts and class names), the ensembled classifier and the retrieval index.

The classifier and index are model-agnostic, so these tests drive them with a tiny fake CLIP (a bag of token
embeddings and a linear image map) whose features are easy to recompute by hand. The tests against a real
HfClipModel, tokenizer and image processor live in test_pipeline.py.
"""

import json
import math

import pytest
import torch
from torch import nn

from hf_clip.zero_shot import (
    EmbeddingIndex,
    ZeroShotClassifier,
    available_datasets,
    fill_template,
    get_classnames,
    get_templates,
)

# (classes, templates) as published in openai/CLIP data/prompts.md and the ImageNet notebook.
PUBLISHED_COUNTS = {
    "imagenet1k": (1000, 80),
    "birdsnap": (500, 1),
    "caltech101": (102, 34),
    "cifar10": (10, 18),
    "cifar100": (100, 18),
    "clevr_counts": (8, 1),
    "country211": (211, 5),
    "dtd": (47, 8),
    "eurosat": (10, 3),
    "fer2013": (7, 6),
    "fgvc_aircraft": (100, 2),
    "flowers102": (102, 1),
    "food101": (101, 1),
    "gtsrb": (43, 3),
    "hateful_memes": (2, 1),
    "kitti_distance": (4, 1),
    "mnist": (10, 1),
    "oxford_pets": (37, 1),
    "pcam": (2, 1),
    "resisc45": (45, 18),
    "sst2": (2, 1),
    "stanford_cars": (196, 8),
    "stl10": (10, 2),
    "sun397": (397, 2),
    "ucf101": (101, 48),
    "voc2007": (20, 1),
}


# --- published data ------------------------------------------------------------------------------------------


def test_every_published_dataset_is_shipped():
    assert available_datasets() == sorted(PUBLISHED_COUNTS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_counts_and_placeholders(name):
    classes, templates = get_classnames(name), get_templates(name)
    assert (len(classes), len(templates)) == PUBLISHED_COUNTS[name]
    assert len(set(templates)) == len(templates)
    for template in templates:
        assert template.count("{}") == 1, template
    for entry in classes:
        for synonym in [entry] if isinstance(entry, str) else entry:
            assert synonym.strip() == synonym and synonym, repr(synonym)


def test_imagenet_matches_open_clip_copy_of_openai_lists():
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    assert get_classnames("imagenet1k") == list(metadata.IMAGENET_CLASSNAMES)
    assert get_templates("imagenet1k") == [t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES]


def test_known_entries():
    assert get_templates("imagenet")[:2] == ["a bad photo of a {}.", "a photo of many {}."]
    assert get_classnames("imagenet")[:3] == ["tench", "goldfish", "great white shark"]
    # OpenAI's cleaned names disambiguate the two "crane" synsets and keep two published duplicates.
    assert (
        get_classnames("imagenet")[134] == "crane bird"
        and get_classnames("imagenet")[517] == "construction crane"
    )
    assert get_classnames("cifar10") == "airplane automobile bird cat deer dog frog horse ship truck".split()
    assert get_templates("food101") == ["a photo of {}, a type of food."]
    assert get_classnames("fer2013")[3] == ["happy", "smiling"]
    assert get_templates("ucf101")[1] == "a video of a person {}."
    assert get_templates("ucf101")[-1] == "a demonstration of the person practicing {}."


def test_names_are_normalised_and_aliased():
    assert get_templates("ImageNet-1k") == get_templates("imagenet") == get_templates("imagenet1k")
    assert get_classnames("Food-101") == get_classnames("food101")
    assert get_classnames("pets") == get_classnames("oxford_pets")


def test_unknown_dataset_lists_the_available_ones():
    with pytest.raises(KeyError, match="Available: birdsnap, caltech101"):
        get_templates("not-a-dataset")


def test_returned_lists_are_copies():
    get_classnames("fer2013")[3].append("mutated")
    get_templates("cifar10").clear()
    assert get_classnames("fer2013")[3] == ["happy", "smiling"]
    assert len(get_templates("cifar10")) == 18


# --- a fake CLIP whose features are easy to recompute ----------------------------------------------------------


class FakeTokenizer:
    """Words to ids by a fixed hash; BOS 1000, EOS 1001, pad 0; truncation keeps EOS last, like CLIP's."""

    model_max_length = 12

    def _ids(self, text):
        return [1 + (sum(map(ord, word)) * 31) % 999 for word in text.split()]

    def __call__(
        self,
        texts,
        padding=False,
        truncation=False,
        max_length=None,
        return_tensors=None,
        add_special_tokens=True,
    ):
        rows = []
        for text in [texts] if isinstance(texts, str) else texts:
            ids = [1000, *self._ids(text), 1001] if add_special_tokens else self._ids(text)
            if truncation and max_length and len(ids) > max_length:
                ids = ids[: max_length - 1] + [1001]
            rows.append(ids)
        if return_tensors != "pt":
            return {"input_ids": rows}
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return {"input_ids": ids, "attention_mask": mask}


class FakeClip(nn.Module):
    """Text: mean of token + position embeddings over the mask; image: a linear map of the flat pixels."""

    def __init__(self, dim=8, context=12):
        super().__init__()
        self.token = nn.Embedding(1002, dim)
        self.position = nn.Parameter(torch.randn(context, dim))
        self.image = nn.Linear(3 * 4 * 4, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.text_calls = 0

    def get_text_features(self, input_ids, attention_mask):
        assert input_ids.shape[1] <= self.position.shape[0], "prompt longer than the context"
        self.text_calls += 1
        x = self.token(input_ids) + self.position[: input_ids.shape[1]]
        mask = attention_mask.unsqueeze(-1).float()
        return (x * mask).sum(1) / mask.sum(1)

    def get_image_features(self, pixel_values):
        return self.image(pixel_values.flatten(1))


@pytest.fixture
def fake():
    torch.manual_seed(0)
    return FakeClip().eval(), FakeTokenizer()


def _text_embedding(model, tokenizer, text):
    tokens = tokenizer([text], truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        return model.get_text_features(**tokens)[0]


def _manual_weights(model, tokenizer, classes, templates):
    rows = []
    for synonyms in classes:
        embeds = [
            _text_embedding(model, tokenizer, t.replace("{}", name)) for name in synonyms for t in templates
        ]
        mean = torch.stack([e / e.norm() for e in embeds]).mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


# --- classifier ------------------------------------------------------------------------------------------------

TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of the {}."]


def test_ensemble_logits_equal_manual_computation(fake):
    model, tokenizer = fake
    classes = [["cat"], ["dog"], ["happy", "smiling"]]
    classifier = ZeroShotClassifier.from_model(model, tokenizer, classes, TEMPLATES, progress=False)
    weights = _manual_weights(model, tokenizer, classes, TEMPLATES)
    torch.testing.assert_close(classifier.weights, weights)
    assert classifier.labels == ["cat", "dog", "happy"]

    pixels = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        image = model.get_image_features(pixels)
    expected = math.exp(model.logit_scale.item()) * (image / image.norm(dim=-1, keepdim=True)) @ weights.t()
    torch.testing.assert_close(classifier(pixels), expected)
    torch.testing.assert_close(classifier(image_embeds=image), expected)
    torch.testing.assert_close(classifier(image), expected)  # 2-d input is read as embeddings


def test_prompts_are_encoded_once_in_batches(fake):
    model, tokenizer = fake
    classes = [f"class{i}" for i in range(7)]
    classifier = ZeroShotClassifier.from_model(
        model, tokenizer, classes, TEMPLATES, batch_size=4, progress=False
    )
    assert model.text_calls == math.ceil(7 * 3 / 4)
    classifier(torch.randn(2, 3, 4, 4))
    classifier.classify([torch.rand(3, 4, 4)], processor=_stack_processor)
    assert model.text_calls == math.ceil(7 * 3 / 4)
    one_by_one = ZeroShotClassifier.from_model(
        model, tokenizer, classes, TEMPLATES, batch_size=1, progress=False
    )
    torch.testing.assert_close(one_by_one.weights, classifier.weights)


def test_placeholder_spellings_and_template_sets(fake):
    model, tokenizer = fake
    base = ZeroShotClassifier.from_model(model, tokenizer, ["cat", "dog"], "a photo of a {}.", progress=False)
    for template in ["a photo of a {label}.", "a photo of a {c}.", "a photo of a {0}.", ["a photo of a {}."]]:
        other = ZeroShotClassifier.from_model(model, tokenizer, ["cat", "dog"], template, progress=False)
        torch.testing.assert_close(other.weights, base.weights)
    assert fill_template("a {} with {braces}", "x") == "a x with {braces}"
    shipped = ZeroShotClassifier.from_model(model, tokenizer, "cifar10", "cifar10", progress=False)
    assert shipped.weights.shape == (10, 8) and shipped.templates == get_templates("cifar10")


def test_bad_inputs_get_clear_errors(fake):
    model, tokenizer = fake
    with pytest.raises(ValueError, match=r"\['   '\] tokenise to nothing"):
        ZeroShotClassifier.from_model(model, tokenizer, ["cat", "   "], TEMPLATES, progress=False)
    with pytest.raises(ValueError, match="no class-name placeholder"):
        ZeroShotClassifier.from_model(model, tokenizer, ["cat"], ["a photo of a cat."], progress=False)
    with pytest.raises(ValueError, match="neither a template"):
        ZeroShotClassifier.from_model(model, tokenizer, ["cat"], "no-such-set", progress=False)
    with pytest.raises(ValueError, match="not a shipped dataset"):
        ZeroShotClassifier.from_model(model, tokenizer, "cat", TEMPLATES, progress=False)
    with pytest.raises(TypeError, match="Linear lacks get_text_features, get_image_features"):
        ZeroShotClassifier.from_model(nn.Linear(2, 2), tokenizer, ["cat"], TEMPLATES, progress=False)
    # A number as a class name: the class-name message, not "'int' object is not iterable".
    with pytest.raises(TypeError, match="A class must be a name or a non-empty list of names, got 3"):
        ZeroShotClassifier.from_model(model, tokenizer, ["cat", 3], TEMPLATES, progress=False)
    assert model.text_calls == 0


def test_long_prompts_are_truncated_not_fatal(fake):
    model, tokenizer = fake
    long_label = " ".join(["very"] * 40) + " long label"
    classifier = ZeroShotClassifier.from_model(
        model, tokenizer, [long_label, "cat"], TEMPLATES[:1], progress=False
    )
    expected = _manual_weights(model, tokenizer, [[long_label]], TEMPLATES[:1])[0]
    torch.testing.assert_close(classifier.weights[0], expected)


def test_save_load_round_trip(fake, tmp_path):
    model, tokenizer = fake
    classes = [["cat"], ["happy", "smiling"]]
    classifier = ZeroShotClassifier.from_model(model, tokenizer, classes, TEMPLATES, progress=False)
    classifier.save(tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [
        "zero_shot_classifier.json",
        "zero_shot_classifier.safetensors",
    ]
    meta = json.loads((tmp_path / "clf" / "zero_shot_classifier.json").read_text())
    assert meta["classnames"] == classes and meta["templates"] == TEMPLATES

    pixels = torch.randn(3, 3, 4, 4)
    with_model = ZeroShotClassifier.load(tmp_path / "clf", model=model)
    torch.testing.assert_close(with_model(pixels), classifier(pixels))
    calls = model.text_calls
    alone = ZeroShotClassifier.load(tmp_path / "clf")
    embeds = model.get_image_features(pixels).detach()
    torch.testing.assert_close(alone(image_embeds=embeds), classifier(image_embeds=embeds))
    assert model.text_calls == calls
    with pytest.raises(ValueError, match="no model attached"):
        alone(pixels)
    with pytest.raises(FileNotFoundError, match="ZeroShotClassifier.save"):
        ZeroShotClassifier.load(tmp_path / "missing")


def _stack_processor(images, return_tensors):
    return {"pixel_values": torch.stack(list(images))}


def test_classify_returns_sorted_softmax_scores(fake):
    model, tokenizer = fake
    classifier = ZeroShotClassifier.from_model(
        model, tokenizer, ["cat", "dog", "car"], TEMPLATES, progress=False
    )
    images = [torch.rand(3, 4, 4), torch.rand(3, 4, 4)]
    results = classifier.classify(images, processor=_stack_processor, top_k=2)
    probs = classifier(torch.stack(images)).softmax(-1)
    assert len(results) == 2 and all(len(r) == 2 for r in results)
    for result, row in zip(results, probs):
        best = row.argmax().item()
        assert result[0]["label"] == classifier.labels[best]
        assert result[0]["score"] == pytest.approx(row[best].item())
        assert result[0]["score"] >= result[1]["score"]
    for bad in (0, True, 1.5):  # a bool or float reached torch.topk, which failed with its own message
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            classifier.classify(images, processor=_stack_processor, top_k=bad)
    with pytest.raises(ValueError, match=r"image_embeds=embedding.unsqueeze\(0\)"):
        classifier(torch.randn(8))
    # A stacked array of images is a batch, not one image.
    stacked = classifier.classify(
        torch.stack(images).numpy(),
        processor=lambda images, return_tensors: _stack_processor(
            [torch.as_tensor(i) for i in images], return_tensors
        ),
    )
    assert [r[0]["label"] for r in stacked] == [r[0]["label"] for r in results]


def test_encoding_runs_in_eval_mode_and_restores_the_callers_mode(fake):
    model, tokenizer = fake
    seen = []
    model.image.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    model.train()
    classifier = ZeroShotClassifier.from_model(model, tokenizer, ["cat", "dog"], progress=False)
    classifier(torch.rand(2, 3, 4, 4))
    assert seen == [False]  # dropout / patch dropout off while encoding
    assert model.training and model.image.training  # and the caller's mode given back


# --- retrieval -------------------------------------------------------------------------------------------------


class _Processor:
    """Tokenizer and image processor in one object, as a CLIP processor is."""

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.image_processor = _stack_processor


def test_index_search_matches_brute_force(fake, tmp_path):
    model, _ = fake
    index = EmbeddingIndex(model, _Processor())
    pixels = torch.randn(6, 3, 4, 4)
    index.add_images(pixels, ids=[f"img{i}.jpg" for i in range(6)])
    captions = ["a cat", "a dog on a sofa", "a red car", "two birds"]
    index.add_texts(captions)
    assert repr(index) == "EmbeddingIndex(images=6, texts=4)"

    with torch.no_grad():
        image = model.get_image_features(pixels)
    image = image / image.norm(dim=-1, keepdim=True)
    query = _text_embedding(model, FakeTokenizer(), "a cat")
    expected = (image @ (query / query.norm())).topk(3)

    found = index.search_images("a cat", k=3)
    assert found.indices.tolist() == expected.indices.tolist()
    torch.testing.assert_close(found.scores, expected.values)
    assert found.ids == [f"img{i}.jpg" for i in expected.indices.tolist()]
    batched = index.search_images(["a cat", "a red car"], k=10)  # k beyond the index is clamped
    assert (
        batched.indices.shape == (2, 6)
        and batched.indices[0].tolist() == index.search_images("a cat", 6).indices.tolist()
    )

    texts = index.search_texts(pixels[2], k=2)
    text_embeds = torch.stack([_text_embedding(model, FakeTokenizer(), c) for c in captions])
    expected_texts = (image[2] @ (text_embeds / text_embeds.norm(dim=-1, keepdim=True)).t()).topk(2)
    assert texts.indices.tolist() == expected_texts.indices.tolist()
    assert texts.ids == [captions[i] for i in expected_texts.indices.tolist()]

    index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")  # no model: embedding queries only
    again = loaded.search_images(query, k=3)
    assert again.indices.tolist() == found.indices.tolist() and again.ids == found.ids
    with pytest.raises(ValueError, match="needs a model and a processor"):
        loaded.search_images("a cat")


def test_index_errors(fake):
    model, _ = fake
    index = EmbeddingIndex(model, _Processor())
    with pytest.raises(ValueError, match="holds no images"):
        index.search_images("a cat")
    index.add_images(torch.randn(2, 8))
    with pytest.raises(ValueError, match="width 4, the index holds width 8"):
        index.add_images(torch.randn(2, 4))
    with pytest.raises(ValueError, match="Got 1 ids for 2 items"):
        index.add_images(torch.randn(2, 8), ids=["only-one"])
