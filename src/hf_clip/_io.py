"""Atomic file writes: a crash mid-save never leaves a truncated file under the final name."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_open_modes(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the mode `open()` would (0666 less the umask). transformers'
    `save_pretrained` writes the weights through a private temporary file: model.safetensors came out 0600,
    unreadable by the group and others in a shared folder whose other files are 0644."""
    mode = 0o666 & ~umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`.

    The file gets the mode `open()` would have given it (0666 less the umask), not `mkstemp`'s private 0600:
    results written into a shared folder stay readable by the group and others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)
