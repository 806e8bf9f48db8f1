"""Image processor for hf_clip: OpenAI's CLIP preprocessing, bit for bit, plus a batched fast path.

Why not transformers' `CLIPImageProcessor`: it floors the centre-crop offset where torchvision (and so
OpenAI's released preprocessing and open_clip) rounds it half to even. Whenever the resized long side minus
the crop is odd the crop moves by one pixel, which changes values by up to 2.69 (normalised units) on 7 of
the 25 sample images of scikit-image and scikit-learn. The exact path here reproduces OpenAI's pipeline
(`Resize(n, bicubic)` on the PIL image, `CenterCrop(n)`, `convert("RGB")`, `ToTensor`, `Normalize`) with a
maximum difference of 0.0 in float32.

The module imports nothing from hf_clip so that `save_pretrained` can copy it next to a checkpoint for
`trust_remote_code=True` loading.
"""

# No `from __future__ import annotations`: transformers validates kwargs against HfClipImagesKwargs' annotations,
# which must therefore be real types.
import functools
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike

# PIL filters whose two passes (horizontal, then vertical) are separable, so each pass may be run on the
# part of the image the centre crop needs without changing a single output value.
_SEPARABLE_FILTERS = {
    int(Image.Resampling.BOX),
    int(Image.Resampling.BILINEAR),
    int(Image.Resampling.HAMMING),
    int(Image.Resampling.BICUBIC),
    int(Image.Resampling.LANCZOS),
}
_FILTER_SUPPORT = {0: 0.5, 1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 1.0}  # PIL Resampling value -> support in px
_SEPARABLE_MODES = {"L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "La"}
_PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}  # PIL resizes these modes with premultiplied alpha
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_TORCH_INTERPOLATION = {int(Image.Resampling.BILINEAR): "bilinear", int(Image.Resampling.BICUBIC): "bicubic"}


def _describe(image: Any, index: int) -> str:
    """Names an input in error messages: its batch position, and its path when it has one."""
    if isinstance(image, (str, os.PathLike)):
        return f"image {index} ({os.fspath(image)!r})"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"image {index} ({type(image).__name__} of shape {tuple(image.shape)}, dtype {image.dtype})"
    if isinstance(image, Image.Image):
        return f"image {index} (PIL {image.mode} image of size {image.size[0]}x{image.size[1]})"
    return f"image {index} ({type(image).__name__})"


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file, raising an error that names the file on any failure.

    No EXIF rotation is applied, as in OpenAI's pipeline (`Image.open`). Files over PIL's
    decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) are refused rather than decoded.
    """
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if name.startswith(("http://", "https://")):
        raise ValueError(
            f"{name!r} is a URL; hf_clip does not download at preprocessing time. Fetch it first "
            "(for example with transformers.image_utils.load_image) and pass the PIL image."
        )
    if not os.path.isfile(name):
        raise FileNotFoundError(f"Image file not found: {name!r}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(name) as image:
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(
            f"Image {name!r} is over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
            f"({err}). If the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS before preprocessing it."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ValueError(
            f"Could not decode image {name!r}: the file is truncated, corrupt or not an image ({err})."
        ) from err
    return image


def _array_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Brings an image array to uint8: floats are read as [0, 1], uint16 as 16-bit, bool as black/white.

    Floats are rounded (not truncated), so `np.asarray(img) / 255` gives the same pixels as `img`.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
        if array.size and not np.isfinite(array).all():
            raise ValueError(f"{what} contains NaN or infinite values.")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{what} is a float image with values in [{low:g}, {high:g}]; float images must be in [0, 1]. "
                "Divide 0-255 data by 255 or pass it as uint8."
            )
        return np.round(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 255:
            raise ValueError(
                f"{what} has integer values in [{low}, {high}]; pass 8-bit data (0-255) as uint8, "
                "16-bit data as uint16, or floats in [0, 1]."
            )
        return array.astype(np.uint8)
    raise TypeError(f"{what} has unsupported dtype {array.dtype}; use uint8, uint16, bool or float.")


def _array_to_hwc_uint8(
    image: np.ndarray | torch.Tensor, what: str, input_data_format: str | ChannelDimension | None
) -> np.ndarray:
    """Validates an array or tensor and returns it as (H, W) or (H, W, C) uint8, C in {1, 2, 3, 4}.

    Without `input_data_format`, a NumPy array is read channels-last and a tensor channels-first (each
    library's own convention) unless only the other layout has a plausible channel count.
    """
    channels_first_default = isinstance(image, torch.Tensor)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        array = tensor.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 1 and array.shape[-1] not in (1, 2, 3, 4):
        array = array[0]
    if array.ndim == 2:
        pass
    elif array.ndim == 3:
        first, last = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        if input_data_format is not None:
            channels_first = ChannelDimension(input_data_format) == ChannelDimension.FIRST
        elif first and last:
            channels_first = channels_first_default
        elif first or last:
            channels_first = first
        else:
            raise ValueError(
                f"{what}: cannot find the channel axis (1, 2, 3 or 4 channels first or last); "
                "pass input_data_format='channels_first' or 'channels_last'."
            )
        if channels_first:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
        elif array.shape[-1] not in (2, 3, 4):
            raise ValueError(
                f"{what}: {array.shape[-1]} channels; expected 1 (grey), 2 (grey+alpha), 3 or 4."
            )
    else:
        raise ValueError(
            f"{what}: expected a 2-D (H, W) or 3-D (H, W, C) / (C, H, W) image, got {array.ndim}-D."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} is empty.")
    return np.ascontiguousarray(_array_to_uint8(array, what))


def _canonical_pil(image: Image.Image, what: str) -> Image.Image:
    """Maps PIL modes to ones OpenAI's pipeline handles correctly; 8-bit modes pass through unchanged.

    OpenAI's pipeline converts to RGB after resizing, where PIL clips 16-bit and float values at 255
    (a real 16-bit photograph turns white), resizes palette indices of "PA" images as if they were
    intensities, and cannot convert "La" at all. These are rescaled or converted first instead.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), mode="L")
    if mode == "F":
        return Image.fromarray(_array_to_uint8(np.asarray(image), what), mode="L")
    if mode == "PA":
        return image.convert("RGBA")
    if mode == "La":
        return image.convert("LA")
    if mode in ("1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        return image
    return image.convert("RGB")


def load_image_8bit(
    image: ImageLike, index: int = 0, input_data_format: str | ChannelDimension | None = None
) -> Image.Image:
    """Turns any supported input into an 8-bit PIL image, keeping its mode where OpenAI's pipeline would."""
    what = _describe(image, index)
    if isinstance(image, (str, os.PathLike)):
        try:
            image = open_image(image)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{what}: {err}") from err
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from err
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{what} is empty.")
        try:
            image.load()  # a lazily opened file fails here, not deep inside the resize
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ValueError(
                f"{what}: could not decode the image; it is truncated or corrupt ({err})."
            ) from err
        return _canonical_pil(image, what)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        array = _array_to_hwc_uint8(image, what, input_data_format)
        mode = {2: "L", 3: {2: "LA", 3: "RGB", 4: "RGBA"}.get(array.shape[-1])}[array.ndim]
        return Image.fromarray(array, mode=mode)
    raise TypeError(
        f"{what}: unsupported input type {type(image).__name__}; pass a PIL image, a NumPy array, a torch "
        "tensor or a file path."
    )


def resized_size(width: int, height: int, size: SizeDict) -> tuple[int, int]:
    """Output (width, height) of torchvision's `Resize`: the short side becomes `shortest_edge` and the long
    side `int(shortest_edge * long / short)` (truncated), capped by `longest_edge` like its `max_size`."""
    if size.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
        if size.longest_edge and new_long > size.longest_edge:
            new_short, new_long = int(size.longest_edge * new_short / new_long), size.longest_edge
        return (new_short, new_long) if width <= height else (new_long, new_short)
    if size.height and size.width:
        return size.width, size.height
    raise ValueError(f"size must hold 'shortest_edge' or 'height' and 'width'; got {dict(size)}.")


def center_crop_box(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int, int, int]:
    """torchvision's `CenterCrop` box: the offset is rounded half to even (Python's `round`), and a crop
    larger than the image pads it with zeros, `(crop - size) // 2` before."""
    left = round((width - crop_width) / 2.0) if crop_width <= width else -((crop_width - width) // 2)
    top = round((height - crop_height) / 2.0) if crop_height <= height else -((crop_height - height) // 2)
    return left, top, left + crop_width, top + crop_height


# Cases (width, height, new width, new height) whose two possible pass orders give different results; the
# first ones sit on either side of Pillow 13's switch to vertical-first, the last ones are upscales.
_ORDER_PROBES = [
    (200, 200, 190, 160),
    (200, 200, 190, 180),
    (200, 200, 150, 99),
    (200, 200, 150, 100),
    (200, 100, 160, 19),
    (200, 100, 160, 20),
    (100, 200, 95, 189),
    (100, 200, 95, 190),
    (60, 300, 50, 100),
    (300, 60, 100, 50),
    (152, 163, 228, 285),
    (200, 200, 250, 199),
]
_ORDER_MODELS: dict[str, Callable[[int, int, int, int], bool]] = {
    # Pillow < 13: always horizontal, then vertical.
    "horizontal first": lambda w, h, nw, nh: False,
    # Pillow 13 (python-pillow/Pillow#9549): vertical first when the height shrinks by more pixels than
    # twice the width does.
    "vertical first for tall reductions": lambda w, h, nw, nh: nh < h and h - nh > 2 * (w - nw),
}


@functools.lru_cache(maxsize=1)
def _pil_vertical_first() -> Callable[[int, int, int, int], bool] | None:
    """Which of PIL's two passes runs first when both are needed, as a function of the sizes.

    Checked once against the installed Pillow on probe sizes where the two orders give different pixels;
    None (use PIL's single call) when it matches no known rule, so a future Pillow cannot break exactness.
    """
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8))
    observed = []
    for width, height, new_width, new_height in _ORDER_PROBES:
        image = noise.crop((0, 0, width, height))
        cubic = Image.Resampling.BICUBIC
        single = np.asarray(image.resize((new_width, new_height), cubic))
        h_then_v = image.resize((new_width, height), cubic).resize((new_width, new_height), cubic)
        v_then_h = image.resize((width, new_height), cubic).resize((new_width, new_height), cubic)
        h_then_v, v_then_h = np.array_equal(single, h_then_v), np.array_equal(single, v_then_h)
        if h_then_v == v_then_h:
            return None  # neither order reproduces PIL, or the probe cannot tell them apart
        observed.append(((width, height, new_width, new_height), v_then_h))
    for rule in _ORDER_MODELS.values():
        if all(rule(*sizes) == vertical for sizes, vertical in observed):
            return rule
    return None


def _source_span(in_size: int, out_size: int, first: int, last: int, support: float) -> tuple[int, int]:
    """Input pixels a resampling pass reads along one axis for outputs [first, last), with a safety margin."""
    scale = in_size / out_size
    reach = support * max(scale, 1.0) + 2.0
    low = max(int(math.floor((first + 0.5) * scale - reach)), 0)
    high = min(int(math.ceil((last - 0.5) * scale + reach)) + 1, in_size)
    return low, high


def resize_and_crop(
    image: Image.Image, new_size: tuple[int, int], box: tuple[int, int, int, int], resample: int
) -> Image.Image:
    """`image.resize(new_size, resample).crop(box)`, identical to the last bit, computing only what the crop needs.

    PIL resizes in two separable passes, each with coefficients that depend only on the input and output
    lengths of its axis. The first pass runs only on the input rows (or columns) that the second reads for
    the crop, the second only on the cropped columns (or rows); every value computed is the one PIL's
    single call computes. PIL's pass order is followed (Pillow 13 runs the vertical pass first for tall
    reductions); with separable filters on modes PIL resamples directly, else the plain call is made.
    """
    width, height = image.size
    new_width, new_height = new_size
    left, top, right, bottom = box
    mode = image.mode
    vertical_first = _pil_vertical_first()
    if (
        vertical_first is None
        or int(resample) not in _SEPARABLE_FILTERS
        or _PREMULTIPLIED.get(mode, mode) not in _SEPARABLE_MODES
        or new_size == image.size
        or left < 0
        or top < 0
        or right > new_width
        or bottom > new_height
    ):
        resized = image.resize(new_size, resample)
        return resized if box == (0, 0, new_width, new_height) else resized.crop(box)
    if mode in _PREMULTIPLIED:
        image = image.convert(_PREMULTIPLIED[mode])  # what Image.resize does internally for these modes
    support = _FILTER_SUPPORT[int(resample)]
    both = new_width != width and new_height != height
    if both and vertical_first(width, height, new_width, new_height):
        # Transposing swaps the passes: PIL's vertical-first result is the transpose of its horizontal-first
        # result on the transposed image, pass for pass.
        flip = Image.Transpose.TRANSPOSE
        out = _horizontal_then_vertical(
            image.transpose(flip), (new_height, new_width), (top, left, bottom, right), resample, support
        ).transpose(flip)
    else:
        out = _horizontal_then_vertical(image, new_size, box, resample, support)
    return out.convert(mode) if mode in _PREMULTIPLIED else out


def _horizontal_then_vertical(
    image: Image.Image,
    new_size: tuple[int, int],
    box: tuple[int, int, int, int],
    resample: int,
    support: float,
) -> Image.Image:
    """The crop of PIL's horizontal-then-vertical resize, running each pass only where the crop needs it."""
    width, height = image.size
    new_width, new_height = new_size
    left, top, right, bottom = box
    if new_height != height:
        row0, row1 = _source_span(height, new_height, top, bottom, support)
    else:
        row0, row1 = top, bottom
    band = image if (row0, row1) == (0, height) else image.crop((0, row0, width, row1))
    if new_width != width:
        band = band.resize((new_width, row1 - row0), resample)  # horizontal pass only
    band = band.crop((left, 0, right, row1 - row0))
    if new_height != height:
        if (row0, row1) != (0, height):
            # The vertical coefficients depend on the full input height, so the rows sit at their true
            # positions in a full-height canvas; rows outside the crop's reach are never read for it.
            canvas = Image.new(band.mode, (right - left, height))
            canvas.paste(band, (0, row0))
            band = canvas
        band = band.resize((right - left, new_height), resample).crop((0, top, right - left, bottom))
    return band


@functools.lru_cache(maxsize=32)
def normalization_table(
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """float32 [3, 256]: the output value of every 8-bit level in every channel.

    Computed with the same float32 operations as torchvision's `ToTensor` (divide by 255) and `Normalize`
    (subtract the mean, divide by the std), so a table lookup reproduces them exactly while touching each
    output value once.
    """
    values = np.broadcast_to(np.arange(256, dtype=np.float32), (3, 256)).copy()
    if do_rescale:
        if math.isclose(rescale_factor, 1 / 255, rel_tol=1e-12):
            values = values / np.float32(255)
        else:
            values = values * np.float32(rescale_factor)
    if do_normalize:
        mean32 = np.broadcast_to(np.asarray(mean, dtype=np.float32), (3,))[:, None]
        std32 = np.broadcast_to(np.asarray(std, dtype=np.float32), (3,))[:, None]
        if (std32 == 0).any():
            raise ValueError(f"image_std={std} contains a zero.")
        values = (values - mean32) / std32
    values.setflags(write=False)
    return values


def _write_normalized(
    image: Image.Image, table: np.ndarray, out: np.ndarray, what: str, convert: bool
) -> None:
    """Writes the normalised CHW float32 pixels of an 8-bit image into `out` through the lookup table."""
    if image.mode != "RGB" and image.mode != "L":
        if not convert:
            raise ValueError(
                f"{what} has mode {image.mode!r} and do_convert_rgb=False; convert it to RGB first."
            )
        image = image.convert("RGB")
    if image.mode == "L" and not convert:
        raise ValueError(f"{what} is greyscale and do_convert_rgb=False; convert it to RGB first.")
    pixels = np.asarray(image)
    for channel in range(3):
        np.take(table[channel], pixels if pixels.ndim == 2 else pixels[..., channel], out=out[channel])


_POOL_LOCK = threading.Lock()
_POOL: dict[str, Any] = {"pool": None, "pid": None, "workers": 0}


def _parallel_map(fn: Callable[[int, Any], Any], items: Sequence[Any], num_threads: int | None) -> list[Any]:
    """Maps `fn(index, item)` over a batch with a shared thread pool (PIL and NumPy release the GIL).

    The default thread count is `torch.get_num_threads()`, which DataLoader workers set to 1, so worker
    processes stay single-threaded. The pool is rebuilt after a fork, whose child inherits no threads.
    """
    workers = torch.get_num_threads() if num_threads is None else num_threads
    workers = min(max(int(workers), 1), len(items))
    if workers <= 1:
        return [fn(index, item) for index, item in enumerate(items)]
    with _POOL_LOCK:
        if _POOL["pool"] is None or _POOL["pid"] != os.getpid() or _POOL["workers"] < workers:
            if _POOL["pool"] is not None and _POOL["pid"] == os.getpid():
                _POOL["pool"].shutdown(wait=False)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="hf_clip_image")
            _POOL.update(pool=pool, pid=os.getpid(), workers=workers)
        pool = _POOL["pool"]
    return list(pool.map(fn, range(len(items)), items))


def _flatten_images(images: Any) -> list[Any]:
    """A single image, a list/tuple of images, or a 4-D array/tensor batch -> a flat list of images."""
    if isinstance(images, (list, tuple)):
        flat: list[Any] = []
        for item in images:
            flat.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return flat
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def _is_float_image(image: Any) -> bool:
    """Float arrays, tensors and PIL "F" images: read as [0, 1] and brought to 8-bit levels (x 255)."""
    if isinstance(image, torch.Tensor):
        return image.is_floating_point()
    if isinstance(image, np.ndarray):
        return np.issubdtype(image.dtype, np.floating)
    return isinstance(image, Image.Image) and image.mode == "F"


def _kwargs_for(image: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`do_rescale=False` means "already rescaled" (transformers' convention): a float image in [0, 1] is,
    but its conversion to 8-bit levels multiplied it by 255, which the normalisation must then undo."""
    if kwargs["do_rescale"] or not _is_float_image(image):
        return kwargs
    return {**kwargs, "do_rescale": True, "rescale_factor": 1 / 255}


class HfClipImagesKwargs(ImagesKwargs, total=False):
    """Adds to transformers' image kwargs.

    fast_path (`bool`): use the batched torch path (uint8 antialiased resize in torch, optionally on
        `device`) instead of the bit-exact PIL path.
    num_threads (`int`): threads for per-image work; default `torch.get_num_threads()`.
    """

    fast_path: bool | None
    num_threads: int | None


class HfClipImageProcessor(BaseImageProcessor):
    r"""CLIP's image preprocessing: resize the short side (bicubic), centre crop, RGB, normalise.

    The default (exact) path equals OpenAI's released preprocessing, which open_clip's
    `image_transform(size, is_train=False)` reproduces, to the last bit in float32, for every 8-bit PIL mode
    (the image is resized in its own mode, cropped, then converted, as OpenAI does; "P" and "1" images are
    therefore resized with nearest neighbour, as PIL forces). 16-bit, 32-bit and float images are first
    brought to 8 bits (16-bit divided by 257, floats read as [0, 1]) because OpenAI's pipeline clips them at
    255. NumPy arrays and tensors are read as 8-bit images (float arrays in [0, 1] are rounded), so
    `np.asarray(img) / 255` gives the same output as `img`. File paths are decoded with `Image.open`.

    `fast_path=True` resizes uint8 tensors with torch's antialiased bicubic kernel (the one torchvision's
    `transforms.v2` uses), batched per input size; on the CPU it then normalises with the exact path's
    table, so only the resize differs, and on another `device` with one fused multiply-add.
    Measured against the exact path on the 25 scikit-image and scikit-learn sample images (both
    orientations) at 224 to 448 px: at most two 8-bit levels apart, 0.030 in normalised units
    (2 / 255 / 0.2613), on 0.34% of values. It converts to RGB before resizing, so images with transparency
    or a palette differ more; off the CPU the resize runs in float32 (up to 5 levels on those photos).

    Use `train_transform()` for the paper's training augmentation.
    """

    valid_kwargs = HfClipImagesKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    fast_path = False

    def __init__(self, **kwargs: Unpack[HfClipImagesKwargs]) -> None:
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    @classmethod
    def for_image_size(cls, image_size: int, **kwargs: Any) -> "HfClipImageProcessor":
        """The processor for a model trained at `image_size` px (224, 288, 336, 384, 448 in the paper)."""
        return cls(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            **kwargs,
        )

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Inputs pass through untouched: paths are opened later, per image, with errors that name them."""
        return image_url_or_urls

    def _validate_preprocess_kwargs(self, **kwargs: Any) -> None:
        super()._validate_preprocess_kwargs(**kwargs)
        if kwargs.get("do_pad"):
            raise ValueError("HfClipImageProcessor does not pad; leave do_pad unset.")
        size, crop_size = kwargs.get("size"), kwargs.get("crop_size")
        if kwargs.get("do_resize") and not (size.shortest_edge or (size.height and size.width)):
            raise ValueError(f"size must hold 'shortest_edge' or 'height' and 'width'; got {dict(size)}.")
        if kwargs.get("do_center_crop") and not (crop_size.height and crop_size.width):
            raise ValueError(f"crop_size must hold 'height' and 'width'; got {dict(crop_size)}.")
        if kwargs.get("fast_path") and int(kwargs["resample"]) not in _TORCH_INTERPOLATION:
            raise ValueError(
                "fast_path supports resample=BILINEAR or BICUBIC; use the exact path for others."
            )

    def _preprocess_image_like_inputs(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        items = _flatten_images(images)
        if not items:
            raise ValueError("No images were given.")
        run = self._preprocess_fast if kwargs.get("fast_path") else self._preprocess_exact
        pixel_values = run(items, **kwargs)
        data_format = kwargs.get("data_format") or ChannelDimension.FIRST
        if ChannelDimension(data_format) == ChannelDimension.LAST:
            pixel_values = (
                pixel_values.permute(0, 2, 3, 1)
                if torch.is_tensor(pixel_values)
                else pixel_values.transpose(0, 2, 3, 1)
            )
        return_tensors = kwargs.get("return_tensors")
        if return_tensors is not None and TensorType(return_tensors) == TensorType.PYTORCH:
            pixel_values = torch.as_tensor(pixel_values)
        elif torch.is_tensor(pixel_values):
            pixel_values = pixel_values.cpu().numpy()
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _output_size(
        self, image_size: tuple[int, int], kwargs: dict[str, Any], what: str
    ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """The resized (width, height) and the crop box for one image."""
        new_size = resized_size(*image_size, kwargs["size"]) if kwargs["do_resize"] else image_size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and new_size[0] * new_size[1] > limit:
            raise ValueError(
                f"{what}: resizing to {new_size[0]}x{new_size[1]} would exceed PIL's decompression-bomb limit "
                f"of {limit} pixels (the aspect ratio is too extreme); crop the image first."
            )
        if kwargs["do_center_crop"]:
            crop = kwargs["crop_size"]
            box = center_crop_box(*new_size, crop.width, crop.height)
        else:
            box = (0, 0, *new_size)
        return new_size, box

    @staticmethod
    def _table(kwargs: dict[str, Any]) -> np.ndarray:
        return normalization_table(
            bool(kwargs["do_rescale"]),
            float(kwargs["rescale_factor"]),
            bool(kwargs["do_normalize"]),
            tuple(np.broadcast_to(np.asarray(kwargs["image_mean"], dtype=np.float64), (3,)).tolist()),
            tuple(np.broadcast_to(np.asarray(kwargs["image_std"], dtype=np.float64), (3,)).tolist()),
        )

    def _preprocess_exact(self, items: list[Any], **kwargs: Any) -> np.ndarray:
        resample = int(kwargs["resample"])
        fixed = kwargs["do_center_crop"]
        out = None
        if fixed:
            out = np.empty(
                (len(items), 3, kwargs["crop_size"].height, kwargs["crop_size"].width), dtype=np.float32
            )

        def one(index: int, item: Any) -> np.ndarray:
            what = _describe(item, index)
            image = load_image_8bit(item, index, kwargs.get("input_data_format"))
            new_size, box = self._output_size(image.size, kwargs, what)
            image = resize_and_crop(image, new_size, box, resample)
            target = (
                out[index] if fixed else np.empty((3, box[3] - box[1], box[2] - box[0]), dtype=np.float32)
            )
            table = self._table(_kwargs_for(item, kwargs))
            _write_normalized(image, table, target, what, bool(kwargs["do_convert_rgb"]))
            return target

        results = _parallel_map(one, items, kwargs.get("num_threads"))
        if fixed:
            return out
        if len({r.shape for r in results}) > 1:
            raise ValueError(
                "Without do_center_crop the images have different sizes and cannot be stacked; "
                "process them one at a time or enable the centre crop."
            )
        return np.stack(results)

    def _preprocess_fast(self, items: list[Any], **kwargs: Any) -> torch.Tensor:
        device = torch.device(kwargs.get("device") or "cpu")
        mode = _TORCH_INTERPOLATION[int(kwargs["resample"])]
        convert = bool(kwargs["do_convert_rgb"])

        def decode(index: int, item: Any) -> np.ndarray:
            what = _describe(item, index)
            if isinstance(item, (np.ndarray, torch.Tensor)):
                array = _array_to_hwc_uint8(item, what, kwargs.get("input_data_format"))
            else:
                image = load_image_8bit(item, index)
                if image.mode != "RGB":
                    if not convert:
                        raise ValueError(f"{what} has mode {image.mode!r} and do_convert_rgb=False.")
                    image = image.convert("RGB")
                array = np.asarray(image)  # read-only view of PIL's bytes; copied once when batched
            if array.ndim == 2 or array.shape[-1] != 3:
                if not convert:
                    raise ValueError(f"{what} is not a 3-channel image and do_convert_rgb=False.")
                grey = array if array.ndim == 2 else array[..., 0]
                array = (
                    array[..., :3] if array.ndim == 3 and array.shape[-1] == 4 else np.stack([grey] * 3, -1)
                )
            return array  # HWC uint8

        arrays = _parallel_map(decode, items, kwargs.get("num_threads"))
        groups: dict[tuple[int, int], list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault((array.shape[1], array.shape[0]), []).append(index)
        crops: list[torch.Tensor] = [torch.empty(0)] * len(arrays)
        for (width, height), indices in groups.items():
            what = _describe(items[indices[0]], indices[0])
            (new_width, new_height), box = self._output_size((width, height), kwargs, what)
            # NHWC memory seen as NCHW: the channels-last layout torch's uint8 resampling kernels want.
            batch = torch.from_numpy(np.stack([arrays[i] for i in indices])).to(device).permute(0, 3, 1, 2)
            if (new_width, new_height) != (width, height):
                batch = _resize_uint8(batch, (new_height, new_width), mode, device.type == "cpu")
            left, top, right, bottom = box
            if left < 0 or top < 0 or right > new_width or bottom > new_height:
                pad = (max(-left, 0), max(right - new_width, 0), max(-top, 0), max(bottom - new_height, 0))
                batch = F.pad(batch, pad)
                left, top, right, bottom = left + pad[0], top + pad[2], right + pad[0], bottom + pad[2]
            for slot, index in enumerate(indices):
                crops[index] = batch[slot, :, top:bottom, left:right]
        if len({tuple(c.shape) for c in crops}) > 1:
            raise ValueError("Without do_center_crop the images have different sizes and cannot be stacked.")
        if device.type != "cpu":
            affine = [_affine_normalization(_kwargs_for(item, kwargs)) for item in items]
            scale = torch.stack([pair[0] for pair in affine]).to(device)
            bias = torch.stack([pair[1] for pair in affine]).to(device)
            stacked = torch.stack(crops).to(torch.float32)
            return torch.addcmul(bias, stacked, scale)
        # On the CPU the exact path's table normalises: one lookup per value, the same float32 results.
        out = np.empty((len(crops), *crops[0].shape), dtype=np.float32)
        for index, crop in enumerate(crops):
            table = self._table(_kwargs_for(items[index], kwargs))
            pixels = crop.numpy()
            for channel in range(3):
                np.take(table[channel], pixels[channel], out=out[index, channel])
        return torch.from_numpy(out)

    def train_transform(
        self,
        scale: tuple[float, float] = (0.9, 1.0),
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> "RandomResizedSquareCrop":
        """The paper's only training augmentation at this processor's crop size, mean and std."""
        crop = (
            SizeDict(**dict(self.crop_size)) if not isinstance(self.crop_size, SizeDict) else self.crop_size
        )
        if crop.height != crop.width:
            raise ValueError(f"train_transform needs a square crop_size; got {dict(crop)}.")
        return RandomResizedSquareCrop(
            size=crop.height,
            scale=scale,
            image_mean=self.image_mean,
            image_std=self.image_std,
            resample=int(self.resample),
            seed=seed,
            generator=generator,
        )

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Writes the config atomically (temporary file, then rename), so a crash never leaves half a file."""
        tmp_path = f"{os.fspath(json_file_path)}.tmp"
        with open(tmp_path, "w", encoding="utf-8") as writer:
            writer.write(self.to_json_string())
        os.replace(tmp_path, json_file_path)


def _resize_uint8(batch: torch.Tensor, size: tuple[int, int], mode: str, uint8_kernel: bool) -> torch.Tensor:
    """Antialiased resize of a uint8 NCHW batch.

    torch has uint8 antialiasing kernels on CPU only; elsewhere the batch goes through float32 and is
    rounded back to 8 bits, which keeps the two-level bound on CPU but differs more at sharp edges.
    """
    if uint8_kernel:
        return F.interpolate(batch, size=size, mode=mode, antialias=True)
    resized = F.interpolate(batch.float(), size=size, mode=mode, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def _affine_normalization(kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) of shape [3, 1, 1] so that `x * scale + bias` rescales and normalises in one op."""
    scale = np.ones(3, dtype=np.float64)
    bias = np.zeros(3, dtype=np.float64)
    if kwargs["do_rescale"]:
        scale *= kwargs["rescale_factor"]
    if kwargs["do_normalize"]:
        mean = np.broadcast_to(np.asarray(kwargs["image_mean"], dtype=np.float64), (3,))
        std = np.broadcast_to(np.asarray(kwargs["image_std"], dtype=np.float64), (3,))
        scale, bias = scale / std, -mean / std
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32).view(3, 1, 1)  # noqa: E731
    return as_tensor(scale), as_tensor(bias)


class RandomResizedSquareCrop:
    """The paper's only augmentation: a random square crop of the image, resized to `size`, normalised.

    The square's area is a uniform fraction in `scale` of the largest square that fits (the short side
    squared) and its position is uniform. Draws come from `generator`; else from a generator seeded with
    `seed` (offset by the DataLoader worker id, so workers differ but runs repeat); else from torch's global
    RNG, which DataLoader seeds per worker. The image is converted to RGB before resampling and resized with
    PIL `resample` (bicubic by default); normalisation is the same table as inference.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.9, 1.0),
        image_mean: float | Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: float | Sequence[float] = OPENAI_CLIP_STD,
        resample: int = int(Image.Resampling.BICUBIC),
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        low, high = scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"scale={scale} must satisfy 0 < low <= high <= 1 (fractions of the largest square)."
            )
        if size < 1:
            raise ValueError(f"size={size} must be positive.")
        self.size = int(size)
        self.scale = (float(low), float(high))
        self.resample = int(resample)
        self.seed = seed
        self._generator = generator
        self._seeded: tuple[int, torch.Generator] | None = None
        mean = tuple(np.broadcast_to(np.asarray(image_mean, dtype=np.float64), (3,)).tolist())
        std = tuple(np.broadcast_to(np.asarray(image_std, dtype=np.float64), (3,)).tolist())
        self._table = normalization_table(True, 1 / 255, True, mean, std)

    def _rng(self) -> torch.Generator | None:
        if self._generator is not None or self.seed is None:
            return self._generator
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        if self._seeded is None or self._seeded[0] != worker_id:
            self._seeded = (worker_id, torch.Generator().manual_seed(self.seed + 1_000_003 * worker_id))
        return self._seeded[1]

    def sample_box(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """A random square (left, top, right, bottom) inside a width x height image."""
        rng = generator if generator is not None else self._rng()
        low, high = self.scale
        fraction = low + (high - low) * torch.rand((), generator=rng).item()
        side = min(max(round(min(width, height) * math.sqrt(fraction)), 1), width, height)
        left = int(torch.randint(0, width - side + 1, (), generator=rng))
        top = int(torch.randint(0, height - side + 1, (), generator=rng))
        return left, top, left + side, top + side

    def __call__(
        self, images: ImageLike | Sequence[ImageLike], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One image -> [3, size, size]; a list of images -> [B, 3, size, size] (float32).

        `generator`, when given, drives this call's draws (e.g. one seeded per dataset row and epoch).
        """
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
        )
        items = _flatten_images(images)
        out = np.empty((len(items), 3, self.size, self.size), dtype=np.float32)
        for index, item in enumerate(items):
            image = load_image_8bit(item, index)
            image = image if image.mode == "RGB" else image.convert("RGB")
            box = self.sample_box(*image.size, generator=generator)
            image = image.resize((self.size, self.size), self.resample, box=box)
            _write_normalized(image, self._table, out[index], _describe(item, index), True)
        pixel_values = torch.from_numpy(out)
        return pixel_values[0] if single else pixel_values


__all__ = ["HfClipImageProcessor", "RandomResizedSquareCrop"]
