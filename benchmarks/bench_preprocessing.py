"""Preprocessing throughput: hf_clip's exact and fast paths against open_clip and transformers.

All methods see the same images in the same process (the scikit-image and scikit-learn sample photographs,
as decoded PIL images, or as JPEG files with --files), after a warm-up, in alternating repetitions. Prints
the median images/s of each method and its ratio to open_clip's `image_transform(size, is_train=False)`.
The exact path is also checked to equal open_clip's output before timing.

The exact path's per-core gain is bounded: PIL's resize, which it must run unchanged to stay bit-exact, is
most of open_clip's time too. Its larger gain comes from resizing the images of a batch on several threads
(PIL releases the GIL), which needs idle cores; the "1 thread" rows compare work per core. Use --threads 1
on a busy machine: open_clip's small multi-threaded torch ops slow down badly under CPU contention.

    python benchmarks/bench_preprocessing.py --size 224 --reps 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import skimage.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import CLIPImageProcessor, CLIPImageProcessorPil

from hf_clip.image_processing_hf_clip import HfClipImageProcessor


def sample_photos() -> list[Image.Image]:
    """The colour photographs shipped with scikit-image and scikit-learn (no download needed)."""
    names = [
        "astronaut",
        "chelsea",
        "coffee",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "rocket",
    ]
    arrays = [getattr(skimage.data, name)() for name in names]
    left, right, _ = skimage.data.stereo_motorcycle()
    arrays += [left, right, *load_sample_images().images]
    return [Image.fromarray(array) for array in arrays]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224, help="model resolution (224, 288, 336, 384, 448)")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per method")
    parser.add_argument("--copies", type=int, default=2, help="copies of the photo set per batch")
    parser.add_argument("--files", action="store_true", help="time from JPEG files (includes decoding)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    photos = sample_photos() * args.copies
    tmp = tempfile.TemporaryDirectory()
    if args.files:
        paths = []
        for index, photo in enumerate(photos):
            paths.append(Path(tmp.name) / f"{index}.jpg")
            photo.save(paths[-1], quality=95)
        inputs: list = paths
    else:
        inputs = photos

    open_clip_transform = open_clip.transform.image_transform(args.size, is_train=False)
    ours = HfClipImageProcessor.for_image_size(args.size)
    crop = {"height": args.size, "width": args.size}
    hf_torchvision = CLIPImageProcessor(size={"shortest_edge": args.size}, crop_size=crop)
    hf_pil = CLIPImageProcessorPil(size={"shortest_edge": args.size}, crop_size=crop)

    def open_clip_batch() -> torch.Tensor:
        images = [Image.open(p) if args.files else p for p in inputs]
        return torch.stack([open_clip_transform(image) for image in images])

    def loaded() -> list:
        return [Image.open(p) for p in inputs] if args.files else inputs

    cores = os.cpu_count() or 1
    methods: dict[str, Callable[[], object]] = {
        "open_clip transform": open_clip_batch,
        "hf_clip exact, 1 thread": lambda: ours(inputs, return_tensors="pt", num_threads=1),
        f"hf_clip exact, {cores} threads": lambda: ours(inputs, return_tensors="pt", num_threads=cores),
        "hf_clip fast (torch threads)": lambda: ours(inputs, return_tensors="pt", fast_path=True),
        "transformers CLIPImageProcessor": lambda: hf_torchvision(loaded(), return_tensors="pt"),
        "transformers CLIPImageProcessorPil": lambda: hf_pil(loaded(), return_tensors="pt"),
    }

    reference = open_clip_batch()
    exact = ours(inputs, return_tensors="pt")["pixel_values"]
    fast = ours(inputs, return_tensors="pt", fast_path=True)["pixel_values"]
    print(f"exact vs open_clip max |diff| = {float((exact - reference).abs().max()):.6g}")
    print(f"fast  vs open_clip max |diff| = {float((fast - reference).abs().max()):.6g}")
    for name, processor in (("CLIPImageProcessor", hf_torchvision), ("CLIPImageProcessorPil", hf_pil)):
        theirs = processor(loaded(), return_tensors="pt")["pixel_values"]
        print(f"transformers {name} vs open_clip max |diff| = {float((theirs - reference).abs().max()):.6g}")

    for method in methods.values():  # warm-up
        method()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for rep in range(args.reps):
        # Alternate so drifting machine load hits every method, and rotate who goes first.
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            method = methods[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            method()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)

    count = len(inputs)
    base = count / statistics.median(seconds["open_clip transform"])
    cpu_base = statistics.median(cpu_seconds["open_clip transform"])
    print(
        f"{count} images/batch at {args.size}px, {'JPEG files' if args.files else 'PIL images'}, "
        f"torch threads {torch.get_num_threads()}, {args.reps} reps, load average {os.getloadavg()[0]:.1f} "
        f"on {cores} cores"
    )
    print("CPU ms/image sums all threads, so 'x open_clip (CPU)' is work per core, robust to machine load.")
    print(
        f"{'method':34s} {'images/s':>9s} {'x open_clip':>12s} {'CPU ms/image':>13s} {'x open_clip (CPU)':>18s}"
    )
    for name, times in seconds.items():
        rate = count / statistics.median(times)
        cpu = statistics.median(cpu_seconds[name])
        print(f"{name:34s} {rate:9.1f} {rate / base:12.2f} {1000 * cpu / count:13.2f} {cpu_base / cpu:18.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
