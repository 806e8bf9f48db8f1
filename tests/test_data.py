import io
import re

import numpy as np
import pytest
from datasets import Image as Image_
from PIL import Image

from hf_clip.data import (
    ALL_COMBINATIONS,
    HELD_OUT_COMBINATION_NAMES,
    HELD_OUT_COMBINATIONS,
    SYNTHETIC_ATTRIBUTES,
    TRAIN_COMBINATION_NAMES,
    load_synthetic_clip_dataset,
    synthetic_zero_shot_templates,
)
from hf_clip.data.synthetic import COLORS, POSITIONS, _encode_png


@pytest.fixture(scope="module")
def train():
    return load_synthetic_clip_dataset("train", num_samples=600, image_size=64, seed=0)


@pytest.fixture(scope="module")
def test_split():
    return load_synthetic_clip_dataset("test", num_samples=200, image_size=64, seed=0)


def _names(dataset, column):
    return [dataset.features[column].names[i] for i in dataset[column]]


def test_generation_is_deterministic_and_seeded(train):
    again = load_synthetic_clip_dataset("train", num_samples=600, image_size=64, seed=0)
    raw, raw_again = (d.cast_column("image", Image_(decode=False)) for d in (train, again))
    assert raw["image"] == raw_again["image"]
    assert train["caption"] == again["caption"]
    other = load_synthetic_clip_dataset("train", num_samples=20, image_size=64, seed=1)
    assert other["caption"] != train["caption"][:20]


def test_columns_and_images(train):
    assert set(train.column_names) == {
        "image",
        "caption",
        "shape",
        "color",
        "size",
        "position",
        "combination",
    }
    image = train[0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    small = load_synthetic_clip_dataset("validation", num_samples=3, image_size=32)
    assert small[0]["image"].size == (32, 32) and len(small) == 3


def test_held_out_combinations_never_appear_in_training(train, test_split):
    train_combos, test_combos = set(_names(train, "combination")), set(_names(test_split, "combination"))
    assert train_combos <= set(TRAIN_COMBINATION_NAMES) and len(train_combos) == len(TRAIN_COMBINATION_NAMES)
    assert test_combos == set(HELD_OUT_COMBINATION_NAMES)
    assert train_combos.isdisjoint(test_combos)
    validation = load_synthetic_clip_dataset("validation", num_samples=200)
    assert set(_names(validation, "combination")) <= set(TRAIN_COMBINATION_NAMES)
    assert validation["caption"][:50] != train["caption"][:50]  # its own stream, not a copy of train


def test_every_attribute_value_is_seen_in_training(train):
    for attribute, values in SYNTHETIC_ATTRIBUTES.items():
        assert set(_names(train, attribute)) == set(values), attribute
    held_out_shapes, held_out_colors = zip(*HELD_OUT_COMBINATIONS)
    assert set(held_out_shapes) == set(SYNTHETIC_ATTRIBUTES["shape"])
    assert set(held_out_colors) == set(SYNTHETIC_ATTRIBUTES["color"])


def test_captions_state_every_attribute(train):
    for row in train.select(range(200)):
        caption = row["caption"]
        for attribute in SYNTHETIC_ATTRIBUTES:
            value = train.features[attribute].names[row[attribute]]
            assert re.search(rf"\b{value}\b", caption), (attribute, value, caption)
        others = set(SYNTHETIC_ATTRIBUTES["color"]) - {train.features["color"].names[row["color"]]}
        assert not any(re.search(rf"\b{c}\b", caption) for c in others)
    attribute_words = "|".join(value for values in SYNTHETIC_ATTRIBUTES.values() for value in values)
    phrasings = {re.sub(rf"\b({attribute_words})\b", "_", caption) for caption in train["caption"]}
    assert len(phrasings) >= 5


def _shape_mask(pixels):
    """Pixels whose colour (3x3 mean, grey axis and the background's tint removed) stands out. A plain
    saturation threshold misses the darkest green shapes, which are no more saturated than the noise."""
    chroma = pixels - pixels.mean(-1, keepdims=True)
    chroma -= np.median(chroma.reshape(-1, 3), axis=0)
    padded = np.pad(chroma, ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = pixels.shape[:2]
    smooth = sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)) / 9
    return np.linalg.norm(smooth, axis=-1) > 35


def _chromaticity(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / rgb.sum()


def test_images_show_their_attributes(train):
    """The shape's pixels sit at the stated position, have the stated colour and size."""
    pixel_counts = {
        (shape, size): [] for shape in SYNTHETIC_ATTRIBUTES["shape"] for size in ("small", "large")
    }
    for row in train.select(range(120)):
        pixels = np.asarray(row["image"], dtype=np.float64)
        mask = _shape_mask(pixels)
        ys, xs = np.nonzero(mask)
        position = train.features["position"].names[row["position"]]
        fx, fy = POSITIONS[position]
        assert abs(xs.mean() - fx * 64) < 7 and abs(ys.mean() - fy * 64) < 7, position
        rgb = _chromaticity(np.median(pixels[mask], axis=0))
        nearest = min(COLORS, key=lambda name: np.linalg.norm(_chromaticity(COLORS[name]) - rgb))
        assert nearest == train.features["color"].names[row["color"]]
        shape, size = (train.features[c].names[row[c]] for c in ("shape", "size"))
        pixel_counts[shape, size].append(mask.sum())
    for shape in SYNTHETIC_ATTRIBUTES["shape"]:
        assert max(pixel_counts[shape, "small"]) < min(pixel_counts[shape, "large"]), shape


def test_png_encoder_round_trips_exactly():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(_encode_png(pixels))))
    np.testing.assert_array_equal(decoded, pixels)


def test_zero_shot_templates_ensemble_the_other_attributes():
    shape_templates = synthetic_zero_shot_templates("shape")
    assert len(shape_templates) == 6 * 2 * 5 and all(t.count("{}") == 1 for t in shape_templates)
    assert shape_templates[0].format("circle") == "a photo of a small red circle in the center."
    combination_templates = synthetic_zero_shot_templates("combination")
    assert len(combination_templates) == 2 * 5
    assert (
        combination_templates[-1].format("blue star") == "a photo of a large blue star in the bottom right."
    )
    assert len(synthetic_zero_shot_templates("position")) == 2 * 6 * 6
    assert len(ALL_COMBINATIONS) == 36


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split must be one of"):
        load_synthetic_clip_dataset("dev")
    with pytest.raises(ValueError, match="num_samples"):
        load_synthetic_clip_dataset("train", num_samples=0)
    with pytest.raises(ValueError, match="image_size"):
        load_synthetic_clip_dataset("train", num_samples=2, image_size=8)
    with pytest.raises(ValueError, match="attribute must be one of"):
        synthetic_zero_shot_templates("texture")


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_noise_is_independent_of_the_labels(split):
    """The first chunk's images once drew from the labels' own generator (numpy's SeedSequence ignores a
    trailing 0 key): image k's background brightness then fixed the combination of image 2k + 1."""
    data = load_synthetic_clip_dataset(split, num_samples=256, image_size=32, seed=0)
    brightness = np.array([np.median(np.asarray(data[k]["image"])) for k in range(128)])
    later_labels = np.array(data["combination"][1:256:2])

    def ranks(values):
        return np.argsort(np.argsort(values, kind="stable"), kind="stable")

    correlation = np.corrcoef(ranks(brightness), ranks(later_labels))[0, 1]
    assert abs(correlation) < 0.4, correlation
