"""HfClipImageProcessor: bit-exactness with OpenAI's preprocessing (open_clip's transform), every input type,
errors that name the input, the fast path's bounded difference, the training augmentation, save/load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import AutoImageProcessor

from hf_clip.configuration_hf_clip import HfClipConfig
from hf_clip.image_processing_hf_clip import (
    HfClipImageProcessor,
    RandomResizedSquareCrop,
    _pil_vertical_first,
    _resize_uint8,
    center_crop_box,
    resize_and_crop,
    resized_size,
)

COLOUR = [
    "astronaut",
    "cat",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
]
GREY = [
    "camera",
    "coins",
    "moon",
    "clock",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "cell",
    "microaneurysms",
]
SYNTHETIC = ["colorwheel", "logo"]  # logo is RGBA
ONE_LEVEL = 1 / 255 / min(open_clip.OPENAI_DATASET_STD)  # one 8-bit step in normalised units


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """The photographs shipped with scikit-image and scikit-learn (nothing downloaded)."""
    arrays = {name: getattr(skimage.data, name)() for name in COLOUR + GREY + SYNTHETIC}
    left, right, _ = skimage.data.stereo_motorcycle()
    arrays.update(motorcycle_left=left, motorcycle_right=right)
    for path, array in zip(load_sample_images().filenames, load_sample_images().images):
        arrays[Path(path).name] = array
    return arrays


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(load_sample_images().images[0])  # china.jpg, 640x427: a half-pixel crop offset


def reference(image: Image.Image, size: int = 224) -> np.ndarray:
    return open_clip.transform.image_transform(size, is_train=False)(image).numpy()


def ours(image, size: int = 224, **kwargs) -> np.ndarray:
    return HfClipImageProcessor.for_image_size(size)(image, return_tensors="np", **kwargs)["pixel_values"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """open_clip's reference runs small torch ops; one thread keeps them fast on a busy 2-core CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [224, 288, 336, 384, 448])
def test_bit_exact_with_open_clip_on_real_photos(photos, size):
    """Max |difference| 0.0 in float32, landscape and portrait (the transpose), at every paper resolution:
    all photos at 224 and 336, the colour ones at the others."""
    processor = HfClipImageProcessor.for_image_size(size)
    images = []
    for name, array in photos.items():
        if size in (224, 336) or name not in GREY + SYNTHETIC:
            images += [
                Image.fromarray(array),
                Image.fromarray(np.ascontiguousarray(np.swapaxes(array, 0, 1))),
            ]
        if name in COLOUR:  # a tall strip: Pillow 13 resizes tall reductions vertically first
            images.append(Image.fromarray(np.ascontiguousarray(array[:, : array.shape[1] // 3])))
    batch = processor(images, return_tensors="pt")["pixel_values"]
    assert batch.shape == (len(images), 3, size, size) and batch.dtype == torch.float32
    for index, image in enumerate(images):
        np.testing.assert_array_equal(batch[index].numpy(), reference(image, size), err_msg=f"image {index}")


def test_photo_set_exercises_the_half_pixel_crop(photos):
    """At least one photo needs round-half-to-even (flooring the offset, as CLIPImageProcessor does, fails)."""
    odd = []
    for name, array in photos.items():
        new_w, new_h = resized_size(array.shape[1], array.shape[0], HfClipImageProcessor().size)
        if (new_w - 224) % 2 or (new_h - 224) % 2:
            odd.append(name)
    assert {"china.jpg", "flower.jpg", "rocket"} <= set(odd)


def test_crop_aware_resize_equals_resize_then_crop(photos):
    """The two-pass, crop-restricted resize against PIL's single call: every filter, mode, pass order and
    direction (3,400 random cases passed once; 60 run here)."""
    assert _pil_vertical_first() is not None, "the installed Pillow's pass order is unknown: fast resize off"
    rng = np.random.default_rng(0)
    base = Image.fromarray(photos["coffee"])
    filters = [Image.Resampling[name] for name in ("BICUBIC", "BILINEAR", "LANCZOS", "BOX", "HAMMING")]
    for case in range(60):
        mode = ["RGB", "RGBA", "L", "LA", "CMYK"][case % 5]
        width, height = (int(v) for v in rng.integers(5, 400, 2))
        if case % 3 == 0:
            height *= 4  # tall: vertical pass first on Pillow 13
        image = base.resize((width, height)).convert(mode)
        if mode in ("RGBA", "LA"):
            image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        new_size = tuple(int(v) for v in rng.integers(8, 500, 2))
        crop_w, crop_h = (int(rng.integers(1, v + 1)) for v in new_size)
        box = center_crop_box(*new_size, crop_w, crop_h)
        resample = filters[case % len(filters)]
        expected = image.resize(new_size, resample).crop(box)
        got = resize_and_crop(image, new_size, box, resample)
        assert got.mode == expected.mode
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=f"case {case}")


def test_center_crop_box_rounds_half_to_even_and_pads_like_torchvision():
    assert center_crop_box(335, 224, 224, 224) == (56, 0, 280, 224)  # 55.5 -> 56
    assert center_crop_box(333, 224, 224, 224) == (54, 0, 278, 224)  # 54.5 -> 54
    assert center_crop_box(101, 300, 224, 224) == (-61, 38, 163, 262)  # pad (224 - 101) // 2 = 61 before


@pytest.mark.parametrize(
    "mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr", "RGBX", "RGBa", "HSV", "LAB", "I;16"]
)
def test_every_8bit_mode_matches_open_clip(photo, mode):
    rgba = photo.copy()
    alpha = np.tile(np.linspace(0, 255, photo.width, dtype=np.uint8), (photo.height, 1))
    rgba.putalpha(Image.fromarray(alpha))  # real transparency, so premultiplied resizing matters
    image = rgba.convert(mode) if mode != "I;16" else photo.convert("L")
    if mode == "I;16":  # 16-bit: open_clip would clip at 255; we scale by 1/257, which inverts * 257
        sixteen = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
        assert sixteen.mode == "I;16"
        np.testing.assert_array_equal(ours(sixteen)[0], reference(image))
        return
    np.testing.assert_array_equal(ours(image)[0], reference(image))


def test_modes_open_clip_mishandles_are_converted_first(photo):
    grey = photo.convert("L")
    expected = reference(grey)
    as_int = Image.fromarray(np.asarray(grey).astype(np.int32) * 257)  # mode "I", 16-bit range
    as_float = Image.fromarray(np.asarray(grey).astype(np.float32) / 255)  # mode "F", [0, 1]
    big_endian = Image.fromarray((np.asarray(grey).astype(np.uint16) * 257).astype(">u2"))
    for image in (as_int, as_float, big_endian):
        np.testing.assert_array_equal(ours(image)[0], expected, err_msg=image.mode)
    rgba = photo.convert("RGBA")
    np.testing.assert_array_equal(ours(rgba.convert("PA"))[0], ours(rgba.convert("PA").convert("RGBA"))[0])
    la = grey.convert("LA")
    np.testing.assert_array_equal(ours(la.convert("La"))[0], reference(la.convert("La").convert("LA")))


def test_arrays_tensors_and_paths_equal_the_pil_path(photo, tmp_path):
    array = np.asarray(photo)
    expected = ours(photo)[0]
    png = tmp_path / "photo.png"
    photo.save(png)
    inputs = {
        "hwc uint8": array,
        "chw uint8": np.ascontiguousarray(array.transpose(2, 0, 1)),
        "tensor chw": torch.from_numpy(array.copy()).permute(2, 0, 1),
        "tensor hwc + format": torch.from_numpy(array.copy()),
        "float64 / 255": array / 255.0,
        "float32 / 255": array.astype(np.float32) / 255,
        "float tensor": torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255,
        "uint16 * 257": array.astype(np.uint16) * 257,
        "path str": str(png),
        "path Path": png,
    }
    for name, value in inputs.items():
        kwargs = {"input_data_format": "channels_last"} if name == "tensor hwc + format" else {}
        np.testing.assert_array_equal(ours(value, **kwargs)[0], expected, err_msg=name)
    grey = np.asarray(photo.convert("L"))
    grey_expected = ours(photo.convert("L"))[0]
    for value in (grey, grey[..., None], torch.from_numpy(grey.copy())[None], grey > 127):
        # bool arrays are intensities 0 / 255 (mode "L", bicubic), not PIL's nearest-resized mode "1"
        want = grey_expected if value.dtype != torch.bool and value.dtype != np.bool_ else None
        if want is None:
            want = ours(Image.fromarray(value.astype(np.uint8) * 255))[0]
        np.testing.assert_array_equal(ours(value)[0], want)
    batch = np.stack([array, array[:, ::-1]])  # a 4-D array is a batch
    out = ours(batch)
    np.testing.assert_array_equal(out[1], ours(Image.fromarray(np.ascontiguousarray(array[:, ::-1])))[0])


def test_jpeg_file_matches_open_clip_on_the_opened_file(photo, tmp_path):
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=90)
    np.testing.assert_array_equal(ours(path)[0], reference(Image.open(path)))


def test_mixed_batch_keeps_order_and_threads_do_not_change_results(photos):
    items = [Image.fromarray(photos[name]) for name in ("astronaut", "coins", "logo", "chelsea")]
    items.append(photos["coffee"])
    processor = HfClipImageProcessor()
    one = processor(items, num_threads=1, return_tensors="np")["pixel_values"]
    two = processor(items, num_threads=2, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(one, two)
    for index, item in enumerate(items):
        np.testing.assert_array_equal(one[index], ours(item)[0])


def test_one_pixel_image_matches_open_clip():
    image = Image.new("RGB", (1, 1), (200, 30, 90))
    out = ours(image)[0]
    np.testing.assert_array_equal(out, reference(image))
    assert out.shape == (3, 224, 224) and np.all(out == out[:, :1, :1])


def test_extreme_aspect_ratio_landscape_is_cheap_and_exact():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2, 900, 3), dtype=np.uint8))
    np.testing.assert_array_equal(ours(image)[0], reference(image))  # resized to 100800 x 224 first


def test_output_formats_and_options(photo):
    processor = HfClipImageProcessor()
    assert isinstance(processor(photo)["pixel_values"], np.ndarray)
    assert isinstance(processor(photo, return_tensors="pt")["pixel_values"], torch.Tensor)
    last = processor(photo, data_format="channels_last", return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(last[0], ours(photo)[0].transpose(1, 2, 0))
    raw = processor(photo, do_normalize=False, do_rescale=False)["pixel_values"]
    assert raw.min() >= 0 and raw.max() <= 255 and np.array_equal(raw, np.round(raw))
    squash = processor(photo, size={"height": 100, "width": 50}, do_center_crop=False)["pixel_values"]
    assert squash.shape == (1, 3, 100, 50)
    with pytest.raises(ValueError, match="different sizes"):
        processor([photo, photo.rotate(90, expand=True)], do_center_crop=False)


def make_truncated_jpeg(tmp_path: Path, photo: Image.Image) -> Path:
    full = tmp_path / "full.jpg"
    photo.save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return cut


def test_unreadable_files_raise_errors_naming_them(photo, tmp_path, monkeypatch):
    processor = HfClipImageProcessor()
    truncated = make_truncated_jpeg(tmp_path, photo)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(os.urandom(2000))
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match=f"image 1 .*{bad.name}.*truncated, corrupt"):
            processor([photo, bad])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        processor(str(tmp_path / "missing.jpg"))
    big = tmp_path / "big.png"
    photo.save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="big.png.*decompression-bomb limit"):
        processor(big)
    with pytest.raises(ValueError, match="image 0 .*aspect ratio is too extreme"):
        processor(Image.new("RGB", (1, 100)))  # 224 x 22400 resized pixels > 1000


def test_bad_in_memory_inputs_raise_errors_naming_them(photo):
    processor = HfClipImageProcessor()
    array = np.asarray(photo)
    cases = [
        (array * 2.0, r"image 1 .*float image with values in \[0, 510\]"),
        (np.full((4, 4, 3), np.nan, np.float32), "image 1 .*NaN"),
        (np.zeros((5, 6, 7), np.uint8), "image 1 .*channel axis"),
        (np.zeros((0, 6, 3), np.uint8), "image 1 .*empty"),
        (array.astype(np.int32) * 4, r"image 1 .*integer values in \[0, 1020\]"),
        ("https://example.com/cat.jpg", "image 1 .*is a URL"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            processor([photo, bad])
    with pytest.raises(TypeError, match="image 1 .*unsupported input type dict"):
        processor([photo, {"pixels": 1}])


@pytest.mark.parametrize("size", [224, 336])
def test_fast_path_difference_is_bounded(photos, size):
    """Documented bound: at most two 8-bit levels (0.030 normalised), on under 1% of values."""
    processor = HfClipImageProcessor.for_image_size(size)
    images = [Image.fromarray(a) for a in photos.values() if a.ndim == 2 or a.shape[-1] == 3]
    exact = processor(images, return_tensors="pt")["pixel_values"]
    fast = processor(images, return_tensors="pt", fast_path=True)["pixel_values"]
    assert fast.shape == exact.shape and fast.dtype == torch.float32
    diff = (fast - exact).abs()
    assert float(diff.max()) <= 2 * ONE_LEVEL + 1e-5
    assert float((diff > 1e-5).float().mean()) < 0.01


def test_float_resize_used_off_cpu_stays_close(photos):
    """The fast path's non-CPU branch (float32 resize, rounded), exercised here on the CPU."""
    for name in ("astronaut", "chelsea", "retina"):
        image = Image.fromarray(photos[name])
        width, height = image.size
        new_size = resized_size(width, height, HfClipImageProcessor().size)
        batch = torch.from_numpy(np.array(image))[None].permute(0, 3, 1, 2)
        fast = _resize_uint8(batch, new_size[::-1], "bicubic", uint8_kernel=False)[0].permute(1, 2, 0)
        pil = torch.from_numpy(np.array(image.resize(new_size, Image.Resampling.BICUBIC)))
        diff = (fast.int() - pil.int()).abs()
        assert int(diff.max()) <= 8 and float((diff > 2).float().mean()) < 1e-3, name


def test_fast_path_batches_same_size_images_like_single_ones(photo):
    processor = HfClipImageProcessor()
    array = np.asarray(photo)
    items = [
        photo,
        torch.from_numpy(array.copy()).permute(2, 0, 1),
        photo.convert("L"),
        photo.resize((50, 60)),
    ]
    batch = processor(items, fast_path=True, return_tensors="pt")["pixel_values"]
    for index, item in enumerate(items):
        single = processor(item, fast_path=True, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(batch[index], single, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fast_path supports"):
        processor(photo, fast_path=True, resample=Image.Resampling.LANCZOS)


def test_train_transform_is_deterministic_and_square(photo):
    transform = HfClipImageProcessor().train_transform(scale=(0.5, 1.0), seed=7)
    first = transform([photo, photo])
    again = HfClipImageProcessor().train_transform(scale=(0.5, 1.0), seed=7)([photo, photo])
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert first.shape == (2, 3, 224, 224)
    assert not torch.equal(first[0], first[1])  # two draws within one run differ
    other = HfClipImageProcessor().train_transform(scale=(0.5, 1.0), seed=8)([photo, photo])
    assert not torch.equal(first, other)
    generator = torch.Generator().manual_seed(3)
    a = RandomResizedSquareCrop(size=64, generator=generator)(photo)
    b = RandomResizedSquareCrop(size=64, generator=torch.Generator().manual_seed(3))(photo)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    per_call = transform(photo, torch.Generator().manual_seed(5))  # a per-call generator wins
    assert torch.equal(per_call, transform(photo, torch.Generator().manual_seed(5)))


def test_train_transform_boxes_are_squares_inside_the_image():
    transform = RandomResizedSquareCrop(scale=(0.2, 0.6), seed=0)
    for width, height in [(640, 427), (300, 900), (1, 1), (2, 500)]:
        for _ in range(50):
            left, top, right, bottom = transform.sample_box(width, height)
            side = right - left
            assert side == bottom - top and 0 <= left and 0 <= top and right <= width and bottom <= height
            short = min(width, height)
            assert side == 1 or round(short * 0.2**0.5) - 1 <= side <= round(short * 0.6**0.5) + 1


def test_train_transform_full_scale_on_square_image_is_plain_resize(photos):
    image = Image.fromarray(photos["astronaut"])  # 512 x 512: the only square of side 512 is the image
    out = RandomResizedSquareCrop(size=224, scale=(1.0, 1.0), seed=0)(image)
    expected = ours(image.resize((224, 224), Image.Resampling.BICUBIC), do_resize=False)[0]
    np.testing.assert_array_equal(out.numpy(), expected)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedSquareCrop(scale=(0.0, 1.0))


def register_auto_classes() -> None:
    """What `import hf_clip` does for the image processor (idempotent)."""
    AutoImageProcessor.register(
        HfClipConfig,
        image_processor_classes={"pil": HfClipImageProcessor, "torchvision": HfClipImageProcessor},
        exist_ok=True,
    )
    HfClipImageProcessor.register_for_auto_class("AutoImageProcessor")


def test_save_and_load_round_trip(photo, tmp_path):
    register_auto_classes()
    processor = HfClipImageProcessor.for_image_size(336)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "HfClipImageProcessor"
    assert saved["crop_size"] == {"height": 336, "width": 336} and saved["size"] == {"shortest_edge": 336}
    assert saved["auto_map"]["AutoImageProcessor"].endswith("HfClipImageProcessor")
    assert (tmp_path / "image_processing_hf_clip.py").is_file()
    for loaded in (
        HfClipImageProcessor.from_pretrained(tmp_path),
        AutoImageProcessor.from_pretrained(tmp_path),
    ):
        assert type(loaded) is HfClipImageProcessor
        assert loaded.to_dict() == processor.to_dict()
        np.testing.assert_array_equal(loaded(photo)["pixel_values"], reference(photo, 336)[None])


def test_remote_code_loads_without_hf_clip(photo, tmp_path):
    """The copied module is self-contained: a fresh interpreter without hf_clip loads and runs it."""
    register_auto_classes()
    HfClipImageProcessor.for_image_size(288).save_pretrained(tmp_path / "ckpt")
    np.save(tmp_path / "expected.npy", reference(photo, 288))
    photo.save(tmp_path / "photo.png")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        import numpy as np
        from transformers import AutoImageProcessor
        assert importlib.util.find_spec("hf_clip") is None or "hf_clip" not in sys.modules
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert not type(processor).__module__.startswith("hf_clip"), type(processor).__module__
        out = processor({str(tmp_path / "photo.png")!r}, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(out, np.load({str(tmp_path / "expected.npy")!r}))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("fast_path", [False, True])
def test_do_rescale_false_means_floats_are_already_rescaled(fast_path):
    # transformers' convention: pass images already in [0, 1] with do_rescale=False.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    processor = HfClipImageProcessor.for_image_size(32)
    expected = processor(pixels, return_tensors="pt", fast_path=fast_path)["pixel_values"]
    as_float = pixels.astype(np.float32) / 255
    for image in (as_float, torch.from_numpy(as_float).permute(2, 0, 1)):
        got = processor(image, do_rescale=False, return_tensors="pt", fast_path=fast_path)["pixel_values"]
        assert torch.equal(got, expected)
    # 8-bit input with do_rescale=False keeps meaning "do not divide by 255", and a mixed batch each its own.
    raw = processor([pixels, as_float], do_rescale=False, return_tensors="pt", fast_path=fast_path)[
        "pixel_values"
    ]
    assert raw[0].max() > 100 and torch.equal(raw[1], expected[0])
