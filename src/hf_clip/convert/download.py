"""Hub repositories as conversion sources.

`hf-clip convert openai/clip-vit-base-patch32 out/b32` downloads the files one conversion reads, never every
format a repository holds (LAION's repositories carry transformers and open_clip copies of the same weights),
then converts the local snapshot like any folder.
"""

from __future__ import annotations

import fnmatch
import re
from os import PathLike
from pathlib import Path

from .open_clip_config import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHT_FILES
from .rules import ConversionError

__all__ = ["files_to_fetch", "resolve_source"]

_REPO_ID = re.compile(r"(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)")
_PROCESSOR_FILES = ["preprocessor_config.json", "processor_config.json"]
_FILE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json", ".tar", ".gz", ".zip"}


def files_to_fetch(files: list[str]) -> list[str]:
    """The `allow_patterns` of one convertible copy in a repository listing, safetensors first: transformers'
    (config.json + model*.safetensors, shards included), then open_clip's, then pickled ones (read with
    weights_only=True)."""

    def has(pattern: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for name in files)

    transformers = "config.json" in files
    open_clip = OPEN_CLIP_CONFIG in files
    choices = [
        (
            transformers and has("model*.safetensors"),
            ["config.json", "model*.safetensors*", *_PROCESSOR_FILES],
        ),
        *[(open_clip and name in files, [OPEN_CLIP_CONFIG, name]) for name in OPEN_CLIP_WEIGHT_FILES],
        (
            transformers and has("pytorch_model*.bin"),
            ["config.json", "pytorch_model*.bin*", *_PROCESSOR_FILES],
        ),
    ]
    for available, patterns in choices:
        if available:
            return patterns
    raise ConversionError(
        "the repository holds no checkpoint hf_clip converts: expected config.json with model.safetensors or "
        f"pytorch_model.bin (transformers), or {OPEN_CLIP_CONFIG} with one of {', '.join(OPEN_CLIP_WEIGHT_FILES)} "
        f"(open_clip); it has {', '.join(sorted(files)[:12]) or 'no files'}."
    )


def resolve_source(src: str | PathLike, revision: str | None = None) -> Path:
    """A local file or folder as it is; a Hub repo id ("org/name", or open_clip's "hf-hub:org/name")
    downloaded into the Hub cache (`HF_HUB_OFFLINE=1`: taken from the cache)."""
    path = Path(src).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"--revision applies to Hub repositories; {src} is a local path.")
        return path
    match = _REPO_ID.fullmatch(str(src))
    if match is None or path.suffix in _FILE_SUFFIXES:  # a missing local file, not a repository
        raise FileNotFoundError(
            f"{src}: no such file or folder, nor a Hub repository id such as openai/clip-vit-base-patch32."
        )
    repo_id = match.group(1)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        patterns = files_to_fetch(HfApi().list_repo_files(repo_id, revision=revision))
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as error:
        try:  # offline, or the Hub unreachable: a snapshot already in the cache still converts
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            raise FileNotFoundError(
                f"{src} is not a local path, and the Hub repository could not be listed: "
                f"{str(error).splitlines()[0]}"
            ) from error
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
