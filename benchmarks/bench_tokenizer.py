"""Batch tokenization throughput: hf_clip vs open_clip (OpenAI's tokenizer) vs transformers' CLIPTokenizer.

All three get the same captions in the same batches and produce [batch, 77] id tensors (padding and
truncation to CLIP's context). Repetitions alternate between the tokenizers so machine load hits all
three alike; medians of texts/s are printed with ratios. The corpus is generated here: captions in the
style of alt-text (Zipf-distributed vocabulary), of which a set share carry non-ASCII characters, HTML
entities or curly quotes, the inputs that need the full ftfy cleaning.

    python benchmarks/bench_tokenizer.py [--texts 20000] [--batch-size 256] [--repeats 5] [--non-ascii 0.1]

Rust-side threads follow TOKENIZERS_PARALLELISM as set when the script starts (open_clip forces it to
"false" on import; the script restores the caller's value afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

_PARALLELISM = os.environ.get("TOKENIZERS_PARALLELISM")

import open_clip  # noqa: E402  (imported before the restore below, which it would undo)
import torch  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from hf_clip.tokenization_hf_clip import HfClipTokenizer, byte_symbols  # noqa: E402

if _PARALLELISM is None:
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
else:
    os.environ["TOKENIZERS_PARALLELISM"] = _PARALLELISM

_NOUNS = (
    "dog cat man woman child girl boy bird horse car truck bus train bicycle tree house street beach "
    "mountain river lake city kitchen table chair plate pizza cake coffee phone laptop book sign flower "
    "garden field sky sunset snow rain window door wall painting statue bridge boat plane skateboard "
    "surfboard guitar player team game crowd market shop food bottle glass shirt dress hat umbrella"
).split()
_ADJECTIVES = (
    "red blue green yellow black white small large old young happy busy wooden sunny snowy empty "
    "crowded beautiful vintage modern tall little bright dark colorful famous"
).split()
_VERBS = (
    "sitting standing walking running riding holding eating playing looking lying parked flying "
    "swimming waiting smiling jumping carrying watching"
).split()
_PLACES = (
    "on the beach|in a kitchen|on a city street|next to a river|in the snow|at night|in a park|"
    "on a wooden table|in front of a building|under a blue sky|at the market|during a game"
).split("|")
_NON_ASCII = [
    "café",
    "naïve",
    "“quoted”",
    "it’s",
    "São Paulo",
    "Zürich",
    "東京",
    "😀",
    "👍🏽",
    "—",
    "…",
    "&amp;",
    "&quot;",
    "Ñandú",
    "fiancée",
    "№ 5",
    "½ price",
    "CAFÉ",
    "Ελλάδα",
    "Москва",
]


def _zipf_choice(rng: random.Random, words: list[str]) -> str:
    return words[min(int(rng.paretovariate(1.2)) - 1, len(words) - 1)]


def make_captions(count: int, non_ascii_share: float, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        words = [
            rng.choice(["A", "a", "The", "Two", "An old photo of a"]),
            _zipf_choice(rng, _ADJECTIVES),
            _zipf_choice(rng, _NOUNS),
            _zipf_choice(rng, _VERBS),
            rng.choice(_PLACES),
        ]
        if rng.random() < 0.4:
            words += ["with", "a", _zipf_choice(rng, _ADJECTIVES), _zipf_choice(rng, _NOUNS)]
        if rng.random() < 0.15:
            words += [f"in {rng.randrange(1950, 2024)}", "#" + _zipf_choice(rng, _NOUNS)]
        if rng.random() < non_ascii_share:
            words.insert(rng.randrange(1, len(words) + 1), rng.choice(_NON_ASCII))
        caption = " ".join(words) + rng.choice([".", "", "!", " ..."])
        captions.append(caption.upper() if rng.random() < 0.03 else caption)
    return captions


# byte_symbols() lists the printable bytes as themselves, then the others (in byte order) from U+0100 on.
_PLAIN = [ord(symbol) for symbol in byte_symbols() if ord(symbol) < 256]
_BYTE_OF_SYMBOL = {
    chr(code): byte
    for code, byte in [*zip(_PLAIN, _PLAIN), *enumerate(sorted(set(range(256)) - set(_PLAIN)), start=256)]
}


def _decoded_word(token: str) -> str | None:
    """A whole-word vocabulary entry as the text it stands for, or None. Entries are spelled in byte symbols
    (GPT-2's byte-to-unicode map), so a word such as "café" is stored as "cafÃ©"; taken undecoded, those
    spellings are mojibake that ftfy repairs, not words anyone writes."""
    if not token.endswith("</w>"):
        return None
    try:
        return bytes(map(_BYTE_OF_SYMBOL.__getitem__, token[:-4])).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def make_wide_captions(count: int, vocab: dict[str, int], seed: int = 0) -> list[str]:
    """Captions of 6-20 words drawn Zipf-wise from every whole alphabetic word of OpenAI's BPE vocabulary
    (about 30k): web alt-text's long tail, where a tokenizer's per-word cache misses far more often than on
    the small-vocabulary corpus above."""
    words = sorted(
        word for word in map(_decoded_word, vocab) if word is not None and word.isalpha() and len(word) > 1
    )
    rng = random.Random(seed)
    rng.shuffle(words)  # Zipf ranks over a random order, not the merge order
    captions = []
    for _ in range(count):
        # Rank r with probability about 1/r (Zipf's law with exponent 1): a log-uniform rank.
        picked = [words[int(len(words) ** rng.random()) - 1] for _ in range(rng.randint(6, 20))]
        captions.append(" ".join(picked).capitalize() + rng.choice([".", "", "!"]))
    return captions


def _batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[start : start + size] for start in range(0, len(texts), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--non-ascii", type=float, default=0.1, help="share of captions with non-ASCII/entities"
    )
    parser.add_argument(
        "--corpus",
        choices=("small-vocabulary", "wide"),
        default="small-vocabulary",
        help="the synthetic captions above (about 370 distinct words), or 'wide': words drawn from the ~30k "
        "whole words of the BPE vocabulary",
    )
    args = parser.parse_args()

    ours = HfClipTokenizer.from_openai_bpe()
    if args.corpus == "wide":
        texts = make_wide_captions(args.texts, ours.get_vocab())
    else:
        texts = make_captions(args.texts, args.non_ascii)
    batches = _batches(texts, args.batch_size)
    merges = [tuple(merge) for merge in json.loads(ours.backend_tokenizer.to_str())["model"]["merges"]]

    def new_transformers() -> CLIPTokenizer:
        return CLIPTokenizer(
            vocab=ours.get_vocab(),
            merges=merges,
            unk_token="<end_of_text>",
            bos_token="<start_of_text>",
            eos_token="<end_of_text>",
            pad_token="<end_of_text>",
        )

    # A fresh instance has every per-word cache empty (open_clip's dict, the Rust BPE cache, hf_clip's memo).
    factories: dict[str, Callable[[], Any]] = {
        "hf_clip": HfClipTokenizer.from_openai_bpe,
        "open_clip": lambda: open_clip.get_tokenizer("ViT-B-32"),
        "transformers CLIPTokenizer": new_transformers,
    }

    def encode(name: str, tokenizer: Any, batch: list[str]) -> torch.Tensor:
        if name == "open_clip":
            return tokenizer(batch)
        out = tokenizer(batch, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        if name == "hf_clip":
            return out["input_ids"]
        return out["input_ids"] * out["attention_mask"]  # it pads with <end_of_text>; OpenAI pads with 0

    order = list(factories)
    # Cold passes: each on a fresh instance, alternating, medians (a single pass is at the mercy of the
    # machine: on the 2-core VM one cold pass of the same tokenizer took anywhere from 0.4 to 1.1 s).
    cold_rates: dict[str, list[float]] = {name: [] for name in factories}
    outputs = {}
    for repeat in range(args.repeats):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            tokenizer = factories[name]()
            start = time.perf_counter()
            out = torch.cat([encode(name, tokenizer, batch) for batch in batches])
            cold_rates[name].append(len(texts) / (time.perf_counter() - start))
            outputs.setdefault(name, out)
    cold = {name: statistics.median(values) for name, values in cold_rates.items()}
    differ = {name: int((out != outputs["open_clip"]).any(dim=1).sum()) for name, out in outputs.items()}

    warm = {name: factories[name]() for name in factories}
    for name, tokenizer in warm.items():
        for batch in batches:
            encode(name, tokenizer, batch)
    runners: dict[str, Callable[[list[str]], torch.Tensor]] = {
        name: (lambda batch, name=name: encode(name, warm[name], batch)) for name in factories
    }
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            start = time.perf_counter()
            for batch in batches:
                runners[name](batch)
            rates[name].append(len(texts) / (time.perf_counter() - start))

    ascii_share = sum(text.isascii() and "&" not in text for text in texts) / len(texts)
    distinct = len({word for text in texts for word in text.lower().split()})
    print(
        f"{len(texts)} captions, {args.corpus} corpus ({distinct} distinct words, {ascii_share:.0%} plain "
        f"ASCII), batch {args.batch_size}, {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()}, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}"
    )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name in runners:
        print(
            f"  {name:28s} {medians[name]:>10,.0f} texts/s (cold pass {cold[name]:>9,.0f})   rows differing "
            f"from open_clip: {differ[name]}"
        )
    print(
        f"  cold pass: hf_clip / open_clip {cold['hf_clip'] / cold['open_clip']:.1f}x, hf_clip / transformers "
        f"{cold['hf_clip'] / cold['transformers CLIPTokenizer']:.2f}x"
    )
    print(f"  hf_clip / open_clip                  {medians['hf_clip'] / medians['open_clip']:.1f}x")
    print(
        f"  hf_clip / transformers CLIPTokenizer {medians['hf_clip'] / medians['transformers CLIPTokenizer']:.2f}x"
    )


if __name__ == "__main__":
    main()
