"""CLIP's byte-level BPE tokenizer on the `tokenizers` backend, token-for-token identical to OpenAI's.

OpenAI's tokenizer (kept verbatim by open_clip) cleans text with `ftfy.fix_text`, unescapes HTML twice,
collapses whitespace, lower-cases, splits words with a case-insensitive `regex`-module pattern, then runs
byte-level BPE with an end-of-word marker `</w>`. The Rust `tokenizers` library cannot run ftfy or
`html.unescape`, and its regex engine (Oniguruma) classifies letters with an older Unicode table than the
`regex` module, so a pure-Rust pipeline disagrees with OpenAI on some inputs. Here the division of labour is:

* Python: cleaning and word splitting, using the same libraries, pattern and flags as OpenAI. ftfy is the
  expensive part, so it is skipped where it provably changes nothing: printable ASCII without `&` (where
  the word pattern also runs on the faster `re`), and other text that none of ftfy's fixers would touch,
  judged with ftfy's own tables (see `_ftfy_fixed_point_test`).
* Rust: byte-level BPE of the words (joined by single spaces, which no word contains), special tokens,
  truncation and padding, batched.

`tokenizers` spends about a microsecond of bookkeeping per word, more than OpenAI's own cached Python BPE,
so the common call (`return_tensors` with truncation, nothing else requested) memoises each word's ids,
sends only unseen words to the Rust BPE (one batch call) and assembles padded tensors with numpy.

This module is self-contained (stdlib, ftfy, regex, numpy, tokenizers, transformers) so that it can be copied next
to a checkpoint for `trust_remote_code` loading.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

import ftfy
import numpy as np
import regex
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers.tokenization_utils_base import BatchEncoding, PaddingStrategy, TruncationStrategy
from transformers.tokenization_utils_tokenizers import TokenizersBackend

CONTEXT_LENGTH = 77
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
# OpenAI pads with zeros; id 0 is the byte symbol "!" (never emitted for a whole word, which ends in </w>).
PAD_TOKEN = "!"
NUM_OPENAI_MERGES = 48_894
OPENAI_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# Word -> ids memo of the tensor fast path; `datasets` blanks an attribute named `cache` when fingerprinting.
_CACHE_LIMIT = 200_000

# OpenAI's word pattern (after its special-token alternatives); compiled with IGNORECASE as OpenAI does.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The same pattern restricted to lower-case printable ASCII, where it matches exactly what _WORD_PATTERN does.
_ASCII_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"""
_TAB_NEWLINE_CR_TO_SPACE = str.maketrans("\t\n\r", "   ")


def _is_plain_ascii(text: str) -> bool:
    """True when ftfy.fix_text and html.unescape provably leave `text` unchanged (up to whitespace).

    For ASCII input ftfy's only active fixes are: HTML entities (need `&`), terminal escapes (need ESC),
    control-character removal (bytes 0-8, 11, 14-31, 127) and CR/CRLF to LF (whitespace to whitespace, which
    the whitespace collapse erases). So printable ASCII plus tab/LF/CR, without `&`, is a fixed point.
    """
    if not text.isascii() or "&" in text:
        return False
    return text.isprintable() or text.translate(_TAB_NEWLINE_CR_TO_SPACE).isprintable()


def _ftfy_fixed_point_test() -> Callable[[str], bool]:
    """A cheap exact test that `ftfy.fix_text` returns a (non-ASCII) text unchanged, or an always-False one.

    With its default configuration ftfy changes a single-line text only if the text contains a character one
    of its fixers acts on (HTML `&`, C1 and other control characters, ESC, ligatures, half/full-width forms,
    curly quotes, line separators, surrogates), is not in NFC, or looks like mojibake (`badness.is_bad`, the
    gate of its encoding repair). The test is built from ftfy's own tables and used only with the ftfy
    release line and defaults it was checked against (6.x, the fields and fixers below).
    """
    from ftfy import FIXERS, TextFixerConfig, badness, chardata

    expected_fields = (
        "unescape_html", "remove_terminal_escapes", "fix_encoding", "restore_byte_a0", "replace_lossy_sequences",
        "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures", "fix_character_width",
        "uncurl_quotes", "fix_line_breaks", "fix_surrogates", "remove_control_chars", "normalization",
        "max_decode_length", "explain",
    )  # fmt: skip
    defaults = TextFixerConfig()
    if (
        not ftfy.__version__.startswith("6.")
        or TextFixerConfig._fields != expected_fields
        or set(FIXERS) - {"fix_encoding", "unescape_html"} - set(expected_fields)
        or defaults.unescape_html != "auto"
        or defaults.normalization != "NFC"
        or not all(getattr(defaults, field) for field in expected_fields[1:13])
    ):
        return lambda text: False
    triggers = {*chardata.LIGATURES, *chardata.WIDTH_MAP, *chardata.CONTROL_CHARS, *range(0x80, 0xA0)}
    triggers |= {ord(char) for char in "&\n\r\x1b\u02bc\u2028\u2029"} | set(range(0x2018, 0x2020))
    escaped = "".join(f"\\U{code:08x}" for code in sorted(triggers))
    trigger_re = re.compile(f"[{escaped}\\ud800-\\udfff]")
    max_length = defaults.max_decode_length

    def leaves_unchanged(text: str) -> bool:
        return (
            len(text) <= max_length  # one segment: no newline (a trigger) and no length split
            and trigger_re.search(text) is None
            and unicodedata.is_normalized("NFC", text)
            and not badness.is_bad(text)
        )

    return leaves_unchanged


_ftfy_leaves_unchanged = _ftfy_fixed_point_test()


def _needs_ftfy(text: str) -> bool:
    return not _is_plain_ascii(text) and not _ftfy_leaves_unchanged(text)


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning: ftfy, HTML unescape twice, collapse whitespace, lower-case."""
    if _needs_ftfy(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in OpenAI's vocabulary order (the GPT-2 byte-to-unicode map).

    Bytes that are already printable Latin-1 characters stand for themselves; the other 68 bytes are
    shifted to code points 256 and up, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    printable_set = set(printable)
    shifted = [byte for byte in range(256) if byte not in printable_set]
    return [chr(byte) for byte in printable] + [chr(256 + rank) for rank in range(len(shifted))]


def clip_vocab(merges: Iterable[tuple[str, str]], special_tokens: Iterable[str]) -> dict[str, int]:
    """OpenAI's vocabulary layout: bytes, bytes + `</w>`, one entry per merge (in merge order), specials."""
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(symbol + END_OF_WORD for symbol in symbols)]:
        vocab[token] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in special_tokens:
        if token in vocab:
            raise ValueError(f"Special token {token!r} collides with a BPE symbol; choose another string.")
        vocab[token] = len(vocab)
    return vocab


def _find_openai_bpe() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin is not None:
        candidate = os.path.join(os.path.dirname(spec.origin), OPENAI_BPE_FILENAME)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"No path given and {OPENAI_BPE_FILENAME} was not found in an installed open_clip package. "
        "Install open_clip_torch (pip install open_clip_torch), which ships it, or pass the path to OpenAI's "
        "merges file (hf-clip convert --bpe-vocab PATH, or bpe_vocab=PATH)."
    )


def _read_bpe_json(tokenizer_json: dict[str, Any]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"Expected a BPE tokenizer.json, found model type {model.get('type')!r}.")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return dict(model["vocab"]), merges


def _read_special_token_flags(
    post_processor: dict[str, Any] | None, bos_token: str, eos_token: str
) -> dict[str, bool]:
    """add_bos_token / add_eos_token as recorded by a saved TemplateProcessing post-processor (else nothing).

    The post-processor itself is always rebuilt from these two flags (see `update_post_processor`)."""
    if not post_processor or post_processor.get("type") != "TemplateProcessing":
        return {}
    single = [
        piece["SpecialToken"]["id"] for piece in post_processor.get("single", []) if "SpecialToken" in piece
    ]
    return {"add_bos_token": bos_token in single, "add_eos_token": eos_token in single}


def _backend_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Words arrive already split by Python and joined with single spaces; map their bytes to symbols.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD, fuse_unk=False, dropout=None)
    )
    backend.pre_tokenizer = _backend_pre_tokenizer()
    # The last word's marker is dropped rather than replaced and stripped: tokenizers' Strip decoder panics
    # (a PanicException, which `except Exception` does not catch) on an empty string, which is what
    # `decode([])` or `decode([bos, eos], skip_special_tokens=True)` (an empty caption) produce. `\z`, not
    # `$`: Oniguruma's `$` also matches before a newline.
    backend.decoder = decoders.Sequence(
        [
            decoders.ByteLevel(),
            decoders.Replace(Regex(re.escape(END_OF_WORD) + r"\z"), ""),
            decoders.Replace(END_OF_WORD, " "),
        ]
    )
    return backend


class HfClipTokenizer(TokenizersBackend):
    """CLIP tokenizer: OpenAI's cleaning and word splitting in Python, byte-level BPE in Rust.

    Encodes exactly as OpenAI/open_clip when called as
    `tokenizer(texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")`:
    `<start_of_text>` + up to 75 BPE tokens + `<end_of_text>`, padded with id 0 and an attention mask.
    Unlike most transformers tokenizers, texts are truncated to `model_max_length` unless
    `truncation=False` is passed, as OpenAI's tokenizer does (the model cannot read further).
    Calls with `return_tensors` return only `input_ids` and `attention_mask` (no per-token `Encoding`s);
    call without `return_tensors` for word ids or offsets (relative to the cleaned, split text).

    Build the released vocabulary with [`~HfClipTokenizer.from_openai_bpe`], or learn a new one from captions
    with [`~HfClipTokenizer.train_new_from_iterator`] on `HfClipTokenizer()` (a byte-level vocabulary of 514).

    Args:
        vocab (`dict[str, int]`, *optional*): BPE vocabulary; defaults to the 512 byte symbols plus specials.
        merges (`list[tuple[str, str]]`, *optional*): BPE merges in priority order.
        bos_token (`str`, defaults to `"<start_of_text>"`): prepended to every text.
        eos_token (`str`, defaults to `"<end_of_text>"`): appended to every text; the text tower reads it.
        pad_token (`str`, defaults to `"!"`): the vocabulary entry with id 0, OpenAI's padding id.
        model_max_length (`int`, defaults to 77): CLIP's context length.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    model = BPE
    padding_side = "right"
    truncation_side = "right"

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        bos_token: str = START_OF_TEXT,
        eos_token: str = END_OF_TEXT,
        pad_token: str = PAD_TOKEN,
        model_max_length: int = CONTEXT_LENGTH,
        **kwargs: Any,
    ) -> None:
        # Serialized backends (remote-code loading, `tokenizer_object`) only contribute vocab and merges:
        # the pipeline around them is always rebuilt here so it cannot drift from the Python side.
        tokenizer_file = kwargs.pop("tokenizer_file", None)
        tokenizer_object = kwargs.pop("tokenizer_object", None)
        # transformers keeps add_bos_token/add_eos_token out of tokenizer_config.json: the saved post-processor
        # (passed as `post_processor` by from_pretrained, or inside a tokenizer.json) is their only record.
        post_processor = kwargs.pop("post_processor", None)
        saved_post_processor = (
            json.loads(post_processor.__getstate__()) if post_processor is not None else None
        )
        if vocab is None and tokenizer_object is not None:
            saved = json.loads(tokenizer_object.to_str())
            vocab, merges = _read_bpe_json(saved)
            saved_post_processor = saved_post_processor or saved.get("post_processor")
        elif vocab is None and tokenizer_file is not None and os.path.isfile(tokenizer_file):
            with open(tokenizer_file, encoding="utf-8") as handle:
                saved = json.load(handle)
            vocab, merges = _read_bpe_json(saved)
            saved_post_processor = saved_post_processor or saved.get("post_processor")
        for key, present in _read_special_token_flags(
            saved_post_processor, str(bos_token), str(eos_token)
        ).items():
            kwargs.setdefault(key, present)
        if vocab is None:
            vocab, merges = clip_vocab([], [str(bos_token), str(eos_token)]), []
        self._tokenizer = _build_backend(dict(vocab), [tuple(merge) for merge in merges or []])
        self._compile_word_patterns(str(bos_token), str(eos_token))
        kwargs.setdefault("add_bos_token", True)
        kwargs.setdefault("add_eos_token", True)
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            model_max_length=model_max_length,
            **kwargs,
        )
        # Set here rather than on first use: `datasets` fingerprints a tokenizer by its attributes (emptying
        # `cache`), so attributes that a first call added gave the same `.map` a new fingerprint (a cache miss).
        self.cache: dict[str, list[int]] = {}
        self._added_token_split = self._compile_added_token_split()

    def _compile_word_patterns(self, bos_token: str, eos_token: str) -> None:
        # OpenAI tries its special tokens first, so a literal "<end_of_text>" in a caption becomes the token.
        specials = "|".join(regex.escape(token) for token in (bos_token, eos_token))
        self._word_pattern = regex.compile(f"{specials}|{_WORD_PATTERN}", regex.IGNORECASE)
        ascii_specials = "|".join(re.escape(token) for token in (bos_token, eos_token))
        ascii_ok = (bos_token + eos_token).isascii() and (bos_token + eos_token).islower()
        self._ascii_word_pattern = re.compile(f"{ascii_specials}|{_ASCII_WORD_PATTERN}") if ascii_ok else None

    def update_post_processor(self) -> None:
        """`<start_of_text> $A <end_of_text>`; a truncated text keeps `<end_of_text>` last, as OpenAI does."""
        single = " ".join(
            part
            for part, on in (
                (f"{self.bos_token}:0", self.add_bos_token),
                ("$A:0", True),
                (f"{self.eos_token}:0", self.add_eos_token),
            )
            if on
        )
        special_tokens = [
            (token, token_id)
            for token, token_id, on in (
                (self.bos_token, self.bos_token_id, self.add_bos_token),
                (self.eos_token, self.eos_token_id, self.add_eos_token),
            )
            if on
        ]
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=special_tokens
        )

    def _add_tokens(self, new_tokens: list[str | AddedToken], special_tokens: bool = False) -> int:
        # The pad token "!" is an ordinary vocabulary entry; as an added token the backend would cut every
        # "!" out of the text before BPE, so it is resolved through the BPE vocabulary instead.
        # Only an ordinary BPE symbol is kept out: <start_of_text>/<end_of_text> are in the BPE vocabulary too,
        # and as pad token (transformers' CLIP pads with <end_of_text>) they must stay added special tokens.
        pad_token = self._special_tokens_map.get("pad_token")
        specials = {str(self._special_tokens_map.get(key)) for key in ("bos_token", "eos_token")}
        if (
            pad_token is not None
            and str(pad_token) not in specials
            and self._tokenizer.model.token_to_id(str(pad_token)) is not None
        ):
            new_tokens = [token for token in new_tokens if str(token) != str(pad_token)]
        count = super()._add_tokens(new_tokens, special_tokens=special_tokens)
        if "_added_token_split" in self.__dict__:  # built by __init__, which adds the special tokens first
            self._added_token_split = self._compile_added_token_split()
        return count

    # ---- text preparation -------------------------------------------------------------------------------

    def words(self, text: str) -> list[str]:
        """Clean `text` and split it into OpenAI's words (pieces that BPE encodes independently).

        Tokens added with `add_tokens` / `add_special_tokens` are kept whole, as transformers does: those with
        `normalized=False` (special tokens) are found in the raw text, the others in the cleaned text; each
        becomes one word spelled as added, which the backend then matches.
        """
        split = self.__dict__.get("_added_token_split", False)
        if split is False:
            split = self.__dict__["_added_token_split"] = self._compile_added_token_split()
        if split is None:
            return self._plain_words(text)
        raw_pattern, cleaned_pattern, spelling = split
        words: list[str] = []
        for index, piece in enumerate(raw_pattern.split(text) if raw_pattern is not None else [text]):
            if index % 2:
                words.append(piece)
            elif cleaned_pattern is None:
                words.extend(self._plain_words(piece))
            else:
                for position, part in enumerate(cleaned_pattern.split(clean_text(piece))):
                    if position % 2:
                        words.append(spelling[part])
                    elif part:
                        words.extend(self._word_pattern.findall(part))
        return words

    def _plain_words(self, text: str) -> list[str]:
        if self._ascii_word_pattern is not None and _is_plain_ascii(text):
            # Collapsing whitespace cannot change which pieces the pattern finds, so it is skipped here.
            return self._ascii_word_pattern.findall(text.lower())
        return self._word_pattern.findall(clean_text(text))

    def _compile_added_token_split(self) -> tuple[Any, Any, dict[str, str]] | None:
        """Patterns finding user-added tokens (raw text, cleaned text), longest first; None without any."""
        own = {str(self.bos_token), str(self.eos_token)}
        added = [
            t
            for t in self._tokenizer.get_added_tokens_decoder().values()
            if t.content not in own and t.content
        ]
        if not added:
            return None

        def pattern(entries: list[tuple[str, bool]]) -> Any:
            if not entries:
                return None
            entries = sorted(set(entries), key=lambda entry: -len(entry[0]))
            alternatives = [
                rf"(?<!\w){regex.escape(text)}(?!\w)" if single_word else regex.escape(text)
                for text, single_word in entries
            ]
            return regex.compile("(" + "|".join(alternatives) + ")")

        spelling: dict[str, str] = {}
        cleaned_entries = []
        for token in added:
            if token.normalized:
                cleaned = clean_text(token.content)
                if cleaned:
                    spelling.setdefault(cleaned, token.content)
                    cleaned_entries.append((cleaned, token.single_word))
        raw_entries = [(t.content, t.single_word) for t in added if not t.normalized]
        return pattern(raw_entries), pattern(cleaned_entries), spelling

    def prepare_text(self, text: str) -> str:
        """The backend's input for `text`: its words joined by single spaces (no word contains one)."""
        return " ".join(self.words(text))

    def _prepare_batch(self, texts: Any, is_split_into_words: bool) -> Any:
        if isinstance(texts, str):
            return [self.prepare_text(texts)] if is_split_into_words else self.prepare_text(texts)
        if (
            is_split_into_words
            and isinstance(texts, (list, tuple))
            and texts
            and not isinstance(texts[0], str)
        ):
            return [self._prepare_batch(words, is_split_into_words=True) for words in texts]
        self._check_texts(texts)
        return [self.prepare_text(item) for item in texts]

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any):
        if text is None and not args and kwargs.get("text_target") is None:
            raise TypeError(
                "HfClipTokenizer got text=None; pass a str or a list of str ('' for an empty caption)."
            )
        return super().__call__(text, *args, **kwargs)

    def _get_padding_truncation_strategies(
        self, padding: Any = False, truncation: Any = None, max_length: int | None = None, **kwargs: Any
    ) -> tuple[PaddingStrategy, TruncationStrategy, int | None, dict[str, Any]]:
        # The text tower cannot read past its context and OpenAI's tokenizer always truncates, so an
        # unspecified `truncation` truncates to `model_max_length` (77); pass `truncation=False` to keep all.
        if truncation is None:
            truncation = True
        return super()._get_padding_truncation_strategies(padding, truncation, max_length, **kwargs)

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        is_split_into_words: bool = False,
        return_tensors: Any = None,
        return_attention_mask: bool | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        if text_pair is not None:
            raise ValueError("CLIP encodes single texts; text_pair is not supported by HfClipTokenizer.")
        call = {
            "add_special_tokens": add_special_tokens,
            "padding_strategy": padding_strategy,
            "truncation_strategy": truncation_strategy,
            "max_length": max_length,
            "return_tensors": return_tensors,
            "return_attention_mask": return_attention_mask,
        }
        if not is_split_into_words and self._can_take_fast_path(call, kwargs):
            texts = [text] if isinstance(text, str) else text
            self._check_texts(texts)
            return self._encode_to_tensors(texts, **call)
        prepared = self._prepare_batch(text, is_split_into_words)
        return super()._encode_plus(prepared, is_split_into_words=is_split_into_words, **call, **kwargs)

    def _can_take_fast_path(self, call: dict[str, Any], extra: dict[str, Any]) -> bool:
        """The fast path covers CLIP's call: tensors, truncation, right padding, no per-token extras."""
        if str(getattr(call["return_tensors"], "value", call["return_tensors"])) not in ("pt", "np"):
            return False
        if call["truncation_strategy"] not in (
            TruncationStrategy.LONGEST_FIRST,
            TruncationStrategy.ONLY_FIRST,
        ):
            return False
        if call["max_length"] is None or call["max_length"] < 2 or self.truncation_side != "right":
            return False
        if (extra.get("padding_side") or self.padding_side) != "right" or extra.get("pad_to_multiple_of"):
            return False
        if (
            extra.get("split_special_tokens")
            or self.split_special_tokens
            or extra.get("return_token_type_ids")
        ):
            return False
        harmless = {
            "stride",
            "verbose",
            "padding_side",
            "pad_to_multiple_of",
            "split_special_tokens",
            "return_token_type_ids",
            "return_overflowing_tokens",
            "return_special_tokens_mask",
            "return_offsets_mapping",
            "return_length",
        }
        if any(key not in harmless or (value and key.startswith("return_")) for key, value in extra.items()):
            return False
        # Tokens added by users may span words; only CLIP's own special tokens are handled word by word.
        specials = {str(self.bos_token), str(self.eos_token)}
        return all(token.content in specials for token in self._tokenizer.get_added_tokens_decoder().values())

    def _check_texts(self, texts: Any) -> None:
        if not isinstance(texts, (list, tuple)):
            raise TypeError(
                f"HfClipTokenizer encodes a str or a list of str, got {type(texts).__name__}. "
                "Pass captions as strings (use '' for a missing caption)."
            )
        for position, item in enumerate(texts):
            if not isinstance(item, str):
                raise TypeError(
                    f"HfClipTokenizer: text[{position}] is {type(item).__name__}, expected str. "
                    "Replace missing captions with '' (encodes to <start_of_text><end_of_text>) or drop them."
                )

    def _word_ids(self, words_per_text: list[list[str]]) -> list[list[int]]:
        """Ids of each text's words, from the memo; unseen words go to the Rust BPE in one batch."""
        cache = self.__dict__.setdefault("cache", {})
        lookup = cache.__getitem__
        try:  # Once the memo is warm every word is in it: skip collecting the unseen ones.
            return [list(chain.from_iterable(map(lookup, words))) for words in words_per_text]
        except KeyError:
            pass
        unseen = list({word for words in words_per_text for word in words if word not in cache})
        if unseen:
            if len(cache) + len(unseen) > _CACHE_LIMIT:
                cache.clear()
            if self._tokenizer.padding is not None:
                self._tokenizer.no_padding()
            if self._tokenizer.truncation is not None:
                self._tokenizer.no_truncation()
            self._tokenizer.encode_special_tokens = False
            encodings = self._tokenizer.encode_batch_fast(unseen, add_special_tokens=False)
            cache.update(zip(unseen, (encoding.ids for encoding in encodings)))
        return [list(chain.from_iterable(map(lookup, words))) for words in words_per_text]

    def _encode_to_tensors(
        self,
        texts: list[str],
        add_special_tokens: bool,
        padding_strategy: PaddingStrategy,
        truncation_strategy: TruncationStrategy,
        max_length: int,
        return_tensors: Any,
        return_attention_mask: bool | None,
    ) -> BatchEncoding:
        """`[bos] + words[:max_length - 2] + [eos]`, right-padded with the pad id: what Rust truncation gives."""
        prefix = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        suffix = [self.eos_token_id] if add_special_tokens and self.add_eos_token else []
        budget = max_length - len(prefix) - len(suffix)
        rows = [
            prefix + ids[:budget] + suffix for ids in self._word_ids([self.words(text) for text in texts])
        ]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        if (
            padding_strategy == PaddingStrategy.DO_NOT_PAD
            and len(rows) > 1
            and lengths.min() != lengths.max()
        ):
            # As transformers (and this tokenizer's general path) do: unequal rows make no tensor unpadded.
            raise ValueError(
                f"Texts of {lengths.min()} to {lengths.max()} tokens cannot be stacked into one tensor without "
                "padding: pass padding=True (to the batch's longest) or padding='max_length' (77, as OpenAI's "
                "tokenizer does)."
            )
        width = max_length if padding_strategy == PaddingStrategy.MAX_LENGTH else int(lengths.max(initial=0))
        mask = np.arange(width) < lengths[:, None]
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        input_ids[mask] = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        data = {"input_ids": input_ids}
        if return_attention_mask is None or return_attention_mask:
            data["attention_mask"] = mask.astype(np.int64)
        if str(getattr(return_tensors, "value", return_tensors)) == "pt":
            import torch

            data = {key: torch.from_numpy(value) for key, value in data.items()}
        return BatchEncoding(data, n_sequences=1)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        # OpenAI's pad id 0 is the byte symbol "!", an ordinary vocabulary entry the backend never skips, so
        # padding is removed here: trailing id 0 (a word's last token always carries </w>, and id 0 does
        # not) and, for left padding, a run of id 0 right before <start_of_text> (which no word precedes).
        # A pad token that is an added token (e.g. `pad_token = eos_token`) is the backend's to skip.
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        token_ids = [int(token_id) for token_id in token_ids]
        pad_id = self.pad_token_id
        if pad_id is not None and pad_id not in self._tokenizer.get_added_tokens_decoder():
            end = len(token_ids)
            while end and token_ids[end - 1] == pad_id:
                end -= 1
            start = 0
            while start < end and token_ids[start] == pad_id:
                start += 1
            if start < end and token_ids[start] != self.bos_token_id:
                start = 0
            token_ids = token_ids[start:end]
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_openai_bpe(cls, path: str | os.PathLike | None = None, **kwargs: Any) -> HfClipTokenizer:
        """Build OpenAI's 49,408-token vocabulary from `bpe_simple_vocab_16e6.txt.gz`.

        Vocabulary = 256 byte symbols, the same with `</w>`, one token per merge (lines 1..48,894 after the
        header line), then `<start_of_text>` (49406) and `<end_of_text>` (49407). Without `path`, the copy
        inside an installed open_clip package is used.
        """
        path = os.fspath(path) if path is not None else _find_openai_bpe()
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        merge_lines = lines[1 : 1 + NUM_OPENAI_MERGES]
        merges = [tuple(line.split()) for line in merge_lines]
        bad = [number for number, merge in enumerate(merges, start=2) if len(merge) != 2]
        if len(merges) != NUM_OPENAI_MERGES or bad:
            raise ValueError(
                f"{path} is not OpenAI's CLIP merges file: expected {NUM_OPENAI_MERGES} 'left right' lines after "
                f"the header, found {len(merges)} lines"
                + (f", malformed at line {bad[0]}" if bad else "")
                + "."
            )
        bos, eos = kwargs.get("bos_token", START_OF_TEXT), kwargs.get("eos_token", END_OF_TEXT)
        vocab = clip_vocab(merges, [str(bos), str(eos)])
        return cls(vocab=vocab, merges=merges, **kwargs)

    def train_new_from_iterator(
        self,
        text_iterator: Iterable[str] | Iterable[list[str]],
        vocab_size: int,
        length: int | None = None,
        new_special_tokens: list[str] | None = None,
        special_tokens_map: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> HfClipTokenizer:
        """Learn a CLIP-layout BPE vocabulary of at most `vocab_size` tokens from captions.

        Training sees exactly what encoding sees (same cleaning and word splitting), and the result keeps
        OpenAI's layout: 512 byte symbols, merges, then `<start_of_text>` and `<end_of_text>` as the last two
        ids. `text_iterator` yields strings or lists of strings. The vocabulary is smaller than `vocab_size`
        only when the corpus has fewer distinct pairs to merge. Extra keyword arguments (`min_frequency`,
        `show_progress`, ...) go to `tokenizers.trainers.BpeTrainer`.
        """
        if new_special_tokens or special_tokens_map:
            raise ValueError(
                "CLIP's special tokens are fixed (<start_of_text>, <end_of_text>); they cannot be changed here."
            )
        num_base = 2 * len(byte_symbols())
        special_tokens = [str(self.bos_token), str(self.eos_token)]
        if vocab_size < num_base + len(special_tokens):
            raise ValueError(
                f"vocab_size={vocab_size} is too small: CLIP's byte-level BPE needs {num_base} byte symbols plus "
                f"{len(special_tokens)} special tokens; use at least {num_base + len(special_tokens)}."
            )
        num_merges = vocab_size - num_base - len(special_tokens)
        trainee = Tokenizer(BPE(end_of_word_suffix=END_OF_WORD))
        trainee.pre_tokenizer = _backend_pre_tokenizer()
        # The trainer's alphabet (256 bytes + the end-of-word variants it sees) is at most num_base, so this
        # target yields at least num_merges merges; keeping the first num_merges is what a smaller run learns.
        trainer = BpeTrainer(
            vocab_size=num_base + num_merges,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix=END_OF_WORD,
            **kwargs,
        )
        trainee.train_from_iterator(self._training_texts(text_iterator), trainer=trainer, length=length)
        _, merges = _read_bpe_json(json.loads(trainee.to_str()))
        merges = merges[:num_merges]
        return type(self)(
            vocab=clip_vocab(merges, special_tokens),
            merges=merges,
            bos_token=special_tokens[0],
            eos_token=special_tokens[1],
            pad_token=str(self.pad_token),
            model_max_length=self.model_max_length,
        )

    def _training_texts(self, text_iterator: Iterable[str] | Iterable[list[str]]) -> Iterator[str]:
        for position, item in enumerate(text_iterator):
            if isinstance(item, str):
                yield self.prepare_text(item)
            elif isinstance(item, (list, tuple)):
                yield from self._prepare_batch(item, is_split_into_words=False)
            else:
                raise TypeError(
                    f"train_new_from_iterator: item {position} is {type(item).__name__}; "
                    "yield captions (str) or batches of captions (list of str)."
                )


__all__ = ["HfClipTokenizer", "clean_text", "clip_vocab", "byte_symbols", "CONTEXT_LENGTH"]
