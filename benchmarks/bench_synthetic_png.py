"""PNG encoding of the synthetic dataset's noisy 64x64 images: hf_clip's encoder vs PIL's, same inputs.

Run: PYTHONPATH=src python benchmarks/bench_synthetic_png.py
Prints the median time per image of each encoder (alternating repetitions after a warm-up), their ratio,
the mean encoded size, and checks that both decode to the same pixels.
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
from PIL import Image

from hf_clip.data.synthetic import _backgrounds, _encode_png


def pil_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def time_per_image(encode, images: np.ndarray) -> float:
    start = time.perf_counter()
    for pixels in images:
        encode(pixels)
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    images = _backgrounds(np.random.default_rng(0), 256, 64)
    for pixels in images[:8]:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(_encode_png(pixels)))), pixels)
    encoders = {"hf_clip _encode_png": _encode_png, "PIL save(PNG, compress_level=1)": pil_png}
    for encode in encoders.values():  # warm-up
        time_per_image(encode, images[:32])
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(7):  # alternate, so load changes hit both alike
        for name, encode in encoders.items():
            times[name].append(time_per_image(encode, images))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, encode in encoders.items():
        size = np.mean([len(encode(p)) for p in images[:64]])
        print(f"{name:34s} {medians[name] * 1e3:7.3f} ms/image  {size:8.0f} bytes/image")
    ours, pil = medians.values()
    print(f"speed-up: {pil / ours:.2f}x")


if __name__ == "__main__":
    main()
