"""HfClipTokenizer: exact parity with OpenAI/open_clip tokenization, transformers API, training, saving."""

from __future__ import annotations

import html
import inspect
import json
import random
import re
import string
import unicodedata

import ftfy
import pytest
import regex
import torch
from transformers import AutoTokenizer, PretrainedConfig

from hf_clip.tokenization_hf_clip import (
    _WORD_PATTERN,
    CONTEXT_LENGTH,
    HfClipTokenizer,
    _ftfy_leaves_unchanged,
    _is_plain_ascii,
    clean_text,
)

open_clip = pytest.importorskip("open_clip", reason="open_clip is the reference tokenizer")
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer()  # OpenAI's tokenizer as shipped by open_clip, vocab from its bundled file


@pytest.fixture(scope="module")
def tokenizer() -> HfClipTokenizer:
    return HfClipTokenizer.from_openai_bpe()  # the same bundled file, found inside the open_clip package


def encode(tokenizer: HfClipTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")[
        "input_ids"
    ]


# ---- the parity corpus: deterministic, varied, hostile ------------------------------------------------------

_CAPTION_SUBJECTS = ["dog", "cat", "woman", "old man", "child", "bird", "red car", "bicycle", "horse", "chef"]
_CAPTION_PLACES = ["on a beach", "in the snow", "at night", "next to a lake", "in a kitchen", "on the street"]
_MOJIBAKE_SOURCES = [
    "café crème brûlée",
    "naïve résumé",
    "“smart quotes” and ‘apostrophes’",
    "Ünïcödé façade — dash…",
    "Björk’s Straße",
    "¿Qué pasa? ¡Olé!",
    "東京タワーの夜景",
    "Ελληνικά κείμενα",
    "Привет, мир",
    "emoji 😀👍🏽",
]
_WHITESPACE = [
    "\t",
    "\n",
    "\r\n",
    "\r",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1f",
    "\x85",
    "\xa0",
    "\u2000",
    "\u2009",
    "\u200a",
    "\u2028",
    "\u2029",
    "\u202f",
    "\u205f",
    "\u3000",
    "\u200b",
    "\ufeff",
    "  ",
    " \t \n ",
]
_ENTITIES = [
    "&amp;",
    "&lt;",
    "&gt;",
    "&quot;",
    "&#39;",
    "&#x27;",
    "&nbsp;",
    "&amp;amp;",
    "&amp;lt;b&amp;gt;",
    "&amp;#39;",
    "&copy;",
    "&eacute;",
    "&EACUTE;",
    "&hellip;",
    "&mdash;",
    "&#8217;",
    "&#x1F600;",
    "&notanentity;",
    "&",
    "&&",
    "&#;",
    "&#99999999;",
    "&lt;end_of_text&gt;",
    "&amp",
    "&ampx",
]
_APOSTROPHES = [
    "'s",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
    "'S",
    "'T",
    "'RE",
    "'VE",
    "'M",
    "'LL",
    "'D",
    "'ſ",
    "’s",
    "‘t",
    "'",
    "''",
    "'x",
    "'sun",
    "'tree",
    "'reed",
    "'ddd",
]
_SPECIALS = [
    "<start_of_text>",
    "<end_of_text>",
    "<START_OF_TEXT>",
    "!<end_of_text>",
    "<<start_of_text>>",
    "x<end_of_text>y",
    "<end_of_text><end_of_text>",
    "'<end_of_text>",
    "<start_of_text",
    "<|endoftext|>",
]
# Blocks with letters, digits, marks and symbols of many kinds, including code points assigned after the
# Unicode version of the `tokenizers` regex engine (why word splitting stays in Python).
_BLOCKS = [
    (0x00A0, 0x0800),
    (0x0900, 0x0E80),
    (0x1000, 0x1100),
    (0x1E00, 0x2C00),
    (0x3000, 0x3100),
    (0x4E00, 0x4F00),
    (0xAC00, 0xAD00),
    (0xFB00, 0xFB50),
    (0xFF00, 0xFFF0),
    (0x10400, 0x10500),
    (0x107B0, 0x107C0),
    (0x10940, 0x10960),
    (0x11DE0, 0x11DF0),
    (0x1D400, 0x1D800),
    (0x1F300, 0x1FB00),
]


def _prose() -> list[str]:
    """Real English prose: sentences from the docstrings of a fixed set of standard-library objects."""
    import argparse
    import collections
    import email.message
    import json as json_module
    import pathlib
    import textwrap
    import unittest

    sentences: list[str] = []
    for module in (
        argparse,
        collections,
        email.message,
        json_module,
        pathlib,
        textwrap,
        unittest,
        string,
        re,
    ):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            for sentence in re.split(r"(?<=[.!?])\s+", doc or ""):
                if 3 <= len(sentence.split()) <= 60:
                    sentences.append(sentence)
    return sorted(set(sentences))


def _random_unicode(rng: random.Random, length: int) -> str:
    chars = []
    for _ in range(length):
        kind = rng.random()
        if kind < 0.6:
            low, high = rng.choice(_BLOCKS)
            chars.append(chr(rng.randrange(low, high)))
        elif kind < 0.75:
            chars.append(rng.choice(string.ascii_letters + string.digits + string.punctuation))
        elif kind < 0.85:
            chars.append(rng.choice(_WHITESPACE + [" "]))
        else:
            cp = rng.randrange(0x110000)
            chars.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
    return "".join(chars)


def _mojibake(rng: random.Random, text: str) -> str:
    broken = text.encode("utf-8").decode(rng.choice(["latin-1", "cp1252"]), errors="replace")
    if rng.random() < 0.3:
        broken = broken.encode("utf-8").decode("latin-1")  # double-encoded
    return broken


def parity_corpus(size: int = 10_000, seed: int = 0) -> list[str]:
    """`size` strings of many kinds (the category of each is recoverable by its index modulo 12)."""
    rng = random.Random(seed)
    prose = _prose()
    names = [unicodedata.name(chr(cp), "") for cp in range(0x20, 0x30000)]
    names = [name for name in names if name]
    emoji = [chr(cp) for cp in range(0x1F300, 0x1FAFF)] + ["👍🏽", "👩‍👩‍👧", "🇫🇷", "❤️", "☺︎", "1️⃣"]
    corpus: list[str] = []
    while len(corpus) < size:
        kind = len(corpus) % 12
        sentence = rng.choice(prose)
        if kind == 0:  # real prose
            text = sentence
        elif kind == 1:  # captions, digits and apostrophes
            text = (
                f"{rng.choice(['A', 'a', 'The'])} {rng.choice(_CAPTION_SUBJECTS)} {rng.choice(_CAPTION_PLACES)}"
                f"{rng.choice(_APOSTROPHES)} {rng.randrange(10 ** rng.randrange(1, 12))}"
                f"{rng.choice(['', '.', '!!', '?!', ' :)', ' #tbt', ' 1,000.50 ', ' 3rd', ' 1990s'])}"
            )
        elif kind == 2:  # unicode names and the characters themselves
            picks = rng.sample(names, 3)
            text = " ".join(picks) + " " + "".join(unicodedata.lookup(name) for name in picks)
        elif kind == 3:  # emoji, with and without spaces
            text = rng.choice(["", sentence[:30] + " "]) + rng.choice(["", " "]).join(
                rng.sample(emoji, rng.randrange(1, 6))
            )
        elif kind == 4:  # HTML entities, nested
            words = sentence.split()
            for _ in range(rng.randrange(1, 4)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(_ENTITIES))
            text = rng.choice([" ", ""]).join(words)
        elif kind == 5:  # SHOUTING
            text = sentence.upper() + rng.choice(["", "!!!", " İSTANBUL ß ǅ"])
        elif kind == 6:  # odd whitespace
            words = sentence.split()
            text = rng.choice(_WHITESPACE) + "".join(word + rng.choice(_WHITESPACE) for word in words)
        elif kind == 7:  # mojibake that ftfy repairs (and some it cannot)
            text = _mojibake(rng, rng.choice(_MOJIBAKE_SOURCES) + " " + sentence[:40])
        elif kind == 8:  # far over 77 tokens
            text = " ".join(rng.sample(prose, 6))
        elif kind == 9:  # apostrophes, digits, punctuation runs
            parts = [
                rng.choice(_APOSTROPHES + ["0", "42", "3.14", "٣٤", "²", "½", "Ⅻ", "--", "...", "?!", "$5"])
                for _ in range(rng.randrange(1, 12))
            ]
            text = rng.choice(["", "x", "it"]) + "".join(parts)
        elif kind == 10:  # random code points from many blocks, controls, whitespace
            text = _random_unicode(rng, rng.randrange(0, 24))
        else:  # literal special tokens, terminal escapes, control characters, empty input
            text = rng.choice(
                [
                    rng.choice(_SPECIALS) + " " + sentence[:30],
                    sentence[:20] + rng.choice(_SPECIALS),
                    "\x1b[31mred\x1b[0m " + sentence[:20],
                    "".join(rng.choice(["\x00", "\x07", "\x7f", "\x9c", "\x80", "a"]) for _ in range(8)),
                    "",
                    " ",
                    "\n\t",
                ]
            )
        corpus.append(text)
    return corpus


def _disagreement_probes() -> list[str]:
    """Code points where Oniguruma (tokenizers) and the `regex` module disagree, e.g. ſ, U+0345, Unicode 16."""
    probes = []
    for cp in [0x17F, 0x345, 0x558, 0x58B, 0x107BB, 0x10940, 0x11DE0, 0x1246F, 0x212A, 0x130, 0xDF]:
        c = chr(cp)
        probes += [f"it'{c} {c}{c}", f"x'{c}", f"'r{c}e", f"a{c}1{c}!{c}"]
    return probes


def test_vocabulary_matches_openai(tokenizer, reference):
    assert tokenizer.get_vocab() == reference.encoder
    assert len(tokenizer) == tokenizer.vocab_size == 49_408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (SOT, EOT, 0)
    assert tokenizer.model_max_length == CONTEXT_LENGTH


def _first_mismatches(corpus: list[str], got: torch.Tensor, expected: torch.Tensor) -> list[str]:
    rows = (got != expected).any(dim=1).nonzero().flatten().tolist()
    return [
        f"{corpus[i]!r}: {got[i][got[i] > 0].tolist()} != {expected[i][expected[i] > 0].tolist()}"
        for i in rows
    ]


def test_token_ids_identical_to_open_clip_on_10k_strings(tokenizer, reference):
    corpus = parity_corpus(10_000) + _disagreement_probes()
    expected = reference(corpus, context_length=77)
    # The tensor fast path (memoised words, numpy padding) ...
    mismatches = _first_mismatches(corpus, encode(tokenizer, corpus), expected)
    assert not mismatches, f"{len(mismatches)} differ; first: " + "; ".join(mismatches[:5])
    # ... and the general path (whole texts through the Rust pipeline, Rust truncation and padding).
    rows = tokenizer(corpus, padding="max_length", truncation=True, max_length=77)["input_ids"]
    mismatches = _first_mismatches(corpus, torch.tensor(rows), expected)
    assert not mismatches, f"{len(mismatches)} differ; first: " + "; ".join(mismatches[:5])
    # The corpus really exercises truncation and the slow (ftfy, `regex`) path.
    truncated = int((expected[:, -1] == EOT).sum())
    assert truncated >= 500, truncated
    assert sum(not _is_plain_ascii(text) for text in corpus) >= 4_000


def test_fast_path_is_identical_to_full_cleaning(tokenizer):
    rng = random.Random(1)
    alphabet = string.printable + "\x00\x01\x0b\x1b\x1c\x7f&"
    texts = ["".join(pair) for pair in zip(string.printable, reversed(string.printable))]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(5_000)]
    texts += [
        "\x1b[1mBold\x1b[0m",
        "a\x0bb",
        "a\rb",
        "A&B",
        "tab\there",
        "it'S THEY'RE",
        "'''s",
        "x <END_OF_TEXT>",
    ]
    full_word_pattern = regex.compile(f"<start_of_text>|<end_of_text>|{_WORD_PATTERN}", regex.IGNORECASE)
    fast = 0
    for text in texts:
        slow = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert clean_text(text) == slow, repr(text)
        assert tokenizer.words(text) == full_word_pattern.findall(slow), repr(text)
        fast += _is_plain_ascii(text)
    assert fast > 1_000


def test_ftfy_fixed_point_test_is_exact():
    # Each of these is changed by ftfy, so none may skip it.
    needs_ftfy = ["“curly”", "it’s", "e\u0301", "ﬁne", "ＬＯＵＤ", "a\u3000b", "a\u2028b", "a\x85b", "cafÃ©",
                  "a\x9cb", "\x1b[1mbold", "a\ufeffb", "x &eacute;", "ǅ ĳ", "line\nbreak é"]  # fmt: skip
    for text in needs_ftfy:
        assert ftfy.fix_text(text) != text or "\n" in text, repr(text)
        assert not _ftfy_leaves_unchanged(text), repr(text)
    corpus = [text for text in parity_corpus(4_000, seed=11) if not text.isascii()]
    skipped = [text for text in corpus if _ftfy_leaves_unchanged(text)]
    assert len(skipped) > 500, len(skipped)
    assert [text for text in skipped if ftfy.fix_text(text) != text] == []


def test_tensor_fast_path_matches_general_path(tokenizer):
    texts = parity_corpus(600, seed=5)
    for options in (
        {"padding": "longest", "truncation": True, "max_length": 77},
        {"padding": "max_length", "truncation": True, "max_length": 20},
        {"padding": "max_length", "truncation": True, "max_length": 77, "add_special_tokens": False},
        {"padding": "longest", "truncation": True},  # max_length from model_max_length
    ):
        fast = tokenizer(texts, return_tensors="np", **options)
        general = tokenizer(texts, **options)
        width = fast["input_ids"].shape[1]
        padded = [row + [0] * (width - len(row)) for row in general["input_ids"]]
        masks = [row + [0] * (width - len(row)) for row in general["attention_mask"]]
        assert fast["input_ids"].tolist() == padded, options
        assert fast["attention_mask"].tolist() == masks, options
    assert len(tokenizer.cache) > 100  # the memo was used
    # A batch mixing memoised words with unseen ones (the warm lookup fails part-way and falls back).
    mixed = [texts[0] + " zqxjv", "qwzx " + texts[1], texts[2]]
    fast = tokenizer(mixed, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    general = tokenizer(mixed, padding="max_length", truncation=True, max_length=77)
    assert fast["input_ids"].tolist() == general["input_ids"]
    assert "zqxjv" in tokenizer.cache
    # A user-added token may span words, so such tokenizers always take the Rust path.
    extended = HfClipTokenizer.from_openai_bpe()
    extended.add_tokens(["photo of"])
    ids = extended(["a photo of"], padding="max_length", truncation=True, max_length=8, return_tensors="pt")
    assert ids["input_ids"][0].tolist() == [SOT, 320, 49408, EOT, 0, 0, 0, 0]


def test_padding_truncation_and_attention_mask(tokenizer):
    long_text = "a photo of a cat " * 40
    batch = tokenizer(
        ["a photo of a cat", long_text, ""],
        padding="max_length",
        truncation=True,
        max_length=77,
        return_tensors="pt",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (3, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT] and ids[0, 7:].eq(0).all()
    assert mask[0].tolist() == [1] * 7 + [0] * 70
    assert ids[1, 0] == SOT and ids[1, -1] == EOT and mask[1].all()
    assert ids[2, :2].tolist() == [SOT, EOT] and ids[2, 2:].eq(0).all() and mask[2].sum() == 2
    # No padding unless asked; truncation to model_max_length (77) unless refused, as OpenAI always truncates.
    assert tokenizer("a photo")["input_ids"] == [SOT, 320, 1125, EOT]
    assert tokenizer(long_text)["input_ids"] == ids[1].tolist()
    assert len(tokenizer(long_text, truncation=False)["input_ids"]) == 2 + 5 * 40
    assert tokenizer([long_text, "a"], padding=True, return_tensors="pt")["input_ids"].shape == (2, 77)
    assert tokenizer(["a", "a photo"], padding=True)["attention_mask"] == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_literal_special_tokens_follow_openai(tokenizer, reference):
    texts = ["<end_of_text>", "!<end_of_text>", "x<START_OF_TEXT>y", "&lt;end_of_text&gt;", "!!", "hi!"]
    assert torch.equal(encode(tokenizer, texts), reference(texts))
    assert tokenizer.tokenize("hi !! !") == ["hi</w>", "!!</w>", "!</w>"]  # "!" is not an added token


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "text=None"),
        (["ok", None], r"text\[1\] is NoneType"),
        ([3], r"text\[0\] is int"),
        (b"x", "bytes"),
    ],
)
def test_bad_input_raises_type_error(tokenizer, bad, message):
    with pytest.raises(TypeError, match=message):
        tokenizer(bad, padding="max_length", truncation=True, max_length=77)


def test_encode_and_single_text_agree_with_batch(tokenizer):
    with pytest.raises(TypeError, match="text=None|NoneType"):
        tokenizer.encode(None)
    text = "Two dogs' bowls &amp; a CAT’s toy"
    batch = tokenizer([text, "x"])["input_ids"][0]
    assert tokenizer(text)["input_ids"] == tokenizer.encode(text) == batch
    assert tokenizer.decode(batch, skip_special_tokens=True) == "two dogs ' bowls & a cat 's toy"
    padded = encode(tokenizer, [text])[0]
    assert tokenizer.decode(padded) == "<start_of_text>two dogs ' bowls & a cat 's toy <end_of_text>"


def test_split_into_words_cleans_each_word(tokenizer):
    words = tokenizer(["A", "PHOTO&amp;", "cat's"], is_split_into_words=True)["input_ids"]
    assert words == tokenizer("a photo& cat's")["input_ids"]


class _DummyHfClipConfig(PretrainedConfig):
    model_type = "hf_clip"


def _config_class() -> type[PretrainedConfig]:
    try:
        from hf_clip.configuration_hf_clip import HfClipConfig
    except ImportError:
        return _DummyHfClipConfig
    return HfClipConfig


def test_save_and_load_round_trip(tokenizer, tmp_path):
    AutoTokenizer.register(_config_class(), tokenizer_class=HfClipTokenizer, exist_ok=True)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["tokenizer_class"] == "HfClipTokenizer"
    assert "vocab" not in config  # the 49k vocabulary lives in tokenizer.json only
    texts = parity_corpus(300, seed=7)
    expected = encode(tokenizer, texts)
    for loaded in (
        HfClipTokenizer.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
        HfClipTokenizer(tokenizer_file=str(tmp_path / "tokenizer.json")),  # the trust_remote_code route
    ):
        assert type(loaded) is HfClipTokenizer
        assert torch.equal(encode(loaded, texts), expected)
        assert loaded.model_max_length == 77 and loaded.pad_token_id == 0


def test_from_openai_bpe_rejects_other_files(tmp_path):
    import gzip

    path = tmp_path / "not_clip.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\na b\nc\n")
    with pytest.raises(ValueError, match="not OpenAI's CLIP merges file"):
        HfClipTokenizer.from_openai_bpe(path)


def _captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond"]
    return [
        f"A {rng.choice(colors)} {rng.choice(shapes)} {rng.choice(['on', 'above', 'beside'])} a "
        f"{rng.choice(colors)} {rng.choice(shapes)}{rng.choice(['.', '!', ' &amp; more', ' — café'])}"
        for _ in range(count)
    ]


def test_train_new_from_iterator_keeps_clip_conventions(tmp_path):
    base = HfClipTokenizer()
    assert len(base) == 514 and base.bos_token_id == 512
    prose = parity_corpus(3_000, seed=3)
    trained = base.train_new_from_iterator(iter(prose), vocab_size=1_000, show_progress=False)
    assert type(trained) is HfClipTokenizer and len(trained) == trained.vocab_size == 1_000
    assert (trained.bos_token_id, trained.eos_token_id, trained.pad_token_id) == (998, 999, 0)
    assert trained.model_max_length == 77
    assert trained.convert_ids_to_tokens(list(range(3))) == ["!", '"', "#"]  # OpenAI's byte order
    # Any text stays encodable (byte fallback) and decodes back to its cleaned form.
    strange = "Ünïcödé 東京 😀 ſ ٣ <end_of_text>"
    ids = trained(strange)["input_ids"]
    assert ids.count(999) == 2  # the literal special token is recognised, as OpenAI does
    assert trained.decode(ids, skip_special_tokens=True) == "ünïcödé 東京 😀 ſ ٣"
    trained.save_pretrained(tmp_path)
    assert HfClipTokenizer.from_pretrained(tmp_path)(strange)["input_ids"] == ids


def test_training_sees_the_same_cleaning_as_encoding():
    captions = _captions(2_000)
    base = HfClipTokenizer()
    trained = base.train_new_from_iterator(captions, vocab_size=2_000, show_progress=False)
    # A corpus with few distinct words runs out of pairs: the vocabulary stops once every word is one token.
    assert 514 < len(trained) < 2_000
    same = trained(["A  RED\tcircle &amp;amp; more", "a red circle & more"])["input_ids"]
    assert same[0] == same[1] and len(same[0]) == 2 + 5  # every training word became a single token
    # Batches of captions are accepted too, and training is deterministic.
    again = base.train_new_from_iterator(
        [captions[:1000], captions[1000:]], vocab_size=2_000, show_progress=False
    )
    assert again.get_vocab() == trained.get_vocab()


def test_train_new_from_iterator_rejects_bad_arguments():
    base = HfClipTokenizer()
    with pytest.raises(ValueError, match="at least 514"):
        base.train_new_from_iterator(["a"], vocab_size=100)
    with pytest.raises(TypeError, match="item 1 is NoneType"):
        base.train_new_from_iterator(["a", None], vocab_size=600, show_progress=False)


def test_decode_of_empty_output_returns_empty_string(tokenizer):
    # An empty caption encodes to [SOT, EOT]; with the specials skipped nothing is left to decode.
    padded = encode(tokenizer, ["", "a dog"])
    assert tokenizer.batch_decode(padded, skip_special_tokens=True) == ["", "a dog"]
    assert tokenizer.decode([SOT, EOT], skip_special_tokens=True) == ""
    assert tokenizer.decode([]) == ""
    assert tokenizer.convert_tokens_to_string([]) == ""
    assert tokenizer.backend_tokenizer.decode([]) == ""
    # Unchanged elsewhere: one space per word end, none after the last word (also before a newline byte).
    assert (
        tokenizer.decode(tokenizer("a Dog, barking!!")["input_ids"])
        == "<start_of_text>a dog , barking !! <end_of_text>"
    )
    newline_word = tokenizer.convert_tokens_to_ids("\u010a</w>")  # byte 0x0a as a whole word
    assert tokenizer.decode([320, newline_word]) == "a \n"
    assert tokenizer.decode([320, newline_word, 321]) == "a \n b"


def test_decode_removes_left_padding(tokenizer):
    texts = ["a dog", "a photo of a big cat"]
    left = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")["input_ids"]
    assert left[0, 0] == 0  # OpenAI's pad id
    assert tokenizer.batch_decode(left, skip_special_tokens=True) == ["a dog", "a photo of a big cat"]
    assert tokenizer.decode(left[0]) == "<start_of_text>a dog <end_of_text>"
    # Id 0 inside a word ("!" before "~") is text, not padding.
    assert tokenizer.decode(tokenizer("hey!~")["input_ids"], skip_special_tokens=True) == "hey !~"


@pytest.mark.parametrize("how", ["init", "setter"])
def test_end_of_text_as_pad_token_stays_special(tokenizer, reference, how, tmp_path):
    if how == "init":
        eos_padded = HfClipTokenizer.from_openai_bpe(pad_token="<end_of_text>")
    else:
        eos_padded = HfClipTokenizer.from_openai_bpe()
        eos_padded.pad_token = eos_padded.eos_token
        eos_padded.save_pretrained(tmp_path)
        eos_padded = AutoTokenizer.from_pretrained(tmp_path)
    assert eos_padded.pad_token_id == EOT
    texts = ["a photo <end_of_text> of", "a dog"]
    expected = [[t for t in row if t] for row in reference(texts).tolist()]
    assert eos_padded(texts)["input_ids"] == expected
    assert eos_padded(texts, padding=True, return_tensors="pt")["input_ids"][0].tolist() == expected[0]
    assert EOT in eos_padded.all_special_ids
    assert eos_padded.decode(expected[0], skip_special_tokens=True) == "a photo of"


def test_added_tokens_with_punctuation_or_capitals_are_used(tokenizer, tmp_path):
    # transformers' CLIPTokenizer matches added tokens before splitting words; so must HfClipTokenizer.
    extended = HfClipTokenizer.from_openai_bpe()
    extended.add_tokens(["<cls_a>", "NewTok", "hot dog"])
    extended.add_special_tokens({"additional_special_tokens": ["<Special>"]})
    cls_a, new_tok, hot_dog, special = (
        extended.convert_tokens_to_ids(t) for t in ("<cls_a>", "NewTok", "hot dog", "<Special>")
    )
    cases = {
        "a <cls_a> photo": [SOT, 320, cls_a, 1125, EOT],
        "x<cls_a>y": [SOT, 343, cls_a, 344, EOT],
        "a NEWTOK": [SOT, 320, new_tok, EOT],  # normalized (non-special) tokens match the cleaned text
        "Hot  Dog": [SOT, hot_dog, EOT],
        "a <Special> b": [SOT, 320, special, 321, EOT],  # special tokens match the raw text, case-sensitive
        "a <special> b": [SOT, 320, 283, 1689, 285, 321, EOT],
    }
    for text, expected in cases.items():
        assert extended(text)["input_ids"] == expected, text
        assert extended([text], return_tensors="pt")["input_ids"][0].tolist() == expected, text
    assert extended.decode(cases["a <Special> b"], skip_special_tokens=True) == "a b"
    extended.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert [reloaded(text)["input_ids"] for text in cases] == list(cases.values())
    # Texts without added tokens still encode exactly as OpenAI's tokenizer.
    texts = parity_corpus(300, seed=11)
    assert torch.equal(encode(extended, texts), encode(tokenizer, texts))


@pytest.mark.parametrize("flag", ["add_bos_token", "add_eos_token"])
def test_save_and_load_keeps_special_token_flags(flag, tmp_path):
    AutoTokenizer.register(_config_class(), tokenizer_class=HfClipTokenizer, exist_ok=True)
    without = HfClipTokenizer.from_openai_bpe(**{flag: False})
    expected = without(["a dog"])["input_ids"]
    assert len(expected[0]) == 3
    without.save_pretrained(tmp_path)
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path),
        HfClipTokenizer(tokenizer_file=str(tmp_path / "tokenizer.json")),
    ):
        assert getattr(loaded, flag) is False
        assert loaded(["a dog"])["input_ids"] == expected
        assert loaded(["a dog"], return_tensors="pt")["input_ids"].tolist() == expected
    # An explicit argument still wins over the saved file.
    assert AutoTokenizer.from_pretrained(tmp_path, **{flag: True})(["a dog"])["input_ids"] == [
        [SOT, 320, 1929, EOT]
    ]


def test_unpadded_tensors_of_unequal_texts_are_refused_on_every_path(tokenizer):
    # The fast path padded silently where the general one (e.g. with return_length=True) and transformers raise.
    texts = ["a dog", "a photo of a big cat"]
    for extra in ({}, {"return_length": True}):
        with pytest.raises(ValueError):
            tokenizer(texts, return_tensors="pt", **extra)
    with pytest.raises(ValueError, match="pass padding=True"):
        tokenizer(texts, return_tensors="pt")
    assert tokenizer(["a dog", "a cat"], return_tensors="pt")["input_ids"].shape == (2, 4)  # equal: fine
    assert tokenizer(texts, padding=True, return_tensors="pt")["input_ids"].shape == (2, 8)
