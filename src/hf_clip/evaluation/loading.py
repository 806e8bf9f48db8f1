"""Load evaluation datasets and resolve their labels and class names.

Every evaluation accepts the same dataset spellings (a Hub name, a local imagefolder or data directory, a
csv/json/parquet file, or a ``save_to_disk`` directory) and fails early, with the fix in the message, on
the mistakes that would otherwise surface deep inside a model forward: a missing column, an empty split,
integer labels with no class names.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value, load_dataset, load_from_disk

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


def load_eval_dataset(
    name_or_path: str | os.PathLike,
    split: str | None = "test",
    config_name: str | None = None,
    image_column: str | None = None,
) -> Dataset:
    """Load one split of a dataset given as a Hub name, a local directory, a data file or a saved dataset.

    * a ``Dataset.save_to_disk`` directory is used whole (it holds a single split);
    * a ``DatasetDict.save_to_disk`` directory is indexed by ``split``;
    * a csv/tsv/json/jsonl/parquet/arrow file is loaded as ``split`` (any name maps to the file); image
      path strings in ``image_column`` (default: columns named image, img, image_path, filepath,
      file_name) that are relative are resolved against the file's folder;
    * any other directory goes to ``datasets.load_dataset`` (imagefolder, folders of csv/parquet files...);
    * anything else is a Hub dataset name (with ``config_name``).
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    split = split or "train"
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"Split {split!r} not found in the saved dataset {path}; available splits: "
                    f"{', '.join(loaded)}. Pass one of them with --split."
                )
            dataset = loaded[split]
        else:
            dataset = loaded
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read {path}: unsupported file type {path.suffix!r}. Use one of "
                f"{', '.join(sorted(_FILE_BUILDERS))}, an image folder, or a save_to_disk directory."
            )
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        dataset = load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
        dataset = _resolve_relative_image_paths(dataset, path.parent, image_column)
    elif path.is_dir():
        dataset = load_dataset(str(path), name=config_name, split=split)
    else:
        if os.sep in str(name_or_path) and str(name_or_path).startswith((".", "/", "~")):
            raise FileNotFoundError(f"Dataset path {path} does not exist.")
        try:
            dataset = load_dataset(str(name_or_path), name=config_name, split=split)
        except (FileNotFoundError, ConnectionError) as err:
            raise ValueError(
                f"Could not load dataset {str(name_or_path)!r}: it is not a local path and the Hub lookup "
                f"failed ({err}). Pass an existing directory/file, or a Hub name available in the local cache "
                "when offline."
            ) from err
    if isinstance(dataset, DatasetDict):  # load_dataset without a resolvable split
        raise ValueError(
            f"Dataset {name_or_path} has several splits ({', '.join(dataset)}); choose one with --split."
        )
    return dataset


def _resolve_relative_image_paths(dataset: Dataset, base_dir: Path, image_column: str | None) -> Dataset:
    """Make relative path strings in image-like columns absolute, so a csv can sit next to its images."""
    candidates = [image_column] if image_column else ["image", "img", "image_path", "filepath", "file_name"]
    for column in candidates:
        feature = dataset.features.get(column)
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):

            def absolutize(batch, column=column):
                return {
                    column: [p if p is None or os.path.isabs(p) else str(base_dir / p) for p in batch[column]]
                }

            dataset = dataset.map(absolutize, batched=True, desc=f"Resolving paths in {column!r}")
    return dataset


def check_dataset(dataset: Dataset, columns: Sequence[str], name: str = "dataset") -> None:
    """Raise a clear error for an empty dataset or a missing column (listing the columns that exist)."""
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty (0 rows): check --dataset, --split and any filtering.")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Column(s) {', '.join(repr(c) for c in missing)} not found in {name}; available columns: "
            f"{', '.join(dataset.column_names)}. Choose with --image_column/--label_column/--caption_column."
        )


def prepare_image_column(dataset: Dataset, image_column: str) -> Dataset:
    """Return ``dataset`` with ``image_column`` decodable to PIL images (path strings are cast to Image)."""
    feature = dataset.features[image_column]
    if isinstance(feature, Image):
        return dataset
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return dataset.cast_column(image_column, Image())
    raise ValueError(
        f"Column {image_column!r} holds {feature}, not images or image paths. Pass the image column with "
        f"--image_column (columns: {', '.join(dataset.column_names)})."
    )


def parse_classnames(spec: str | Sequence[str] | None) -> list[str] | None:
    """Class names from a comma-separated list, a text file (one per line) or a json file (a list)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if path.is_file():
            text = path.read_text(encoding="utf-8-sig")  # a BOM would glue onto the first name
            if path.suffix.lower() == ".json":
                loaded = json.loads(text)
                if isinstance(loaded, dict):  # {"0": "cat", "1": "dog"}
                    loaded = [loaded[k] for k in sorted(loaded, key=int)]
                names = [str(n).strip() for n in loaded]
            else:
                names = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            names = [n.strip() for n in spec.split(",")]
    else:
        names = [str(n).strip() for n in spec]
    if not names or any(not n for n in names):
        raise ValueError(
            f"Class names {spec!r} contain an empty name; give non-empty names (comma list or file)."
        )
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"Class names must be unique; repeated: {', '.join(dupes)}.")
    return names


def display_name(classname: str | Sequence[str]) -> str:
    """A class as shown in reports: its name, or the first of its synonyms."""
    return classname if isinstance(classname, str) else str(classname[0])


@dataclass
class LabelInfo:
    """Integer labels of a dataset and the names behind them.

    ``classnames`` are the names turned into prompts; ``label_names`` are the dataset's own names (e.g.
    ImageNet WordNet ids in a ClassLabel), used to match label sets across datasets. Both are index-aligned.
    """

    labels: np.ndarray
    classnames: list[str]
    label_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def resolve_labels(dataset: Dataset, label_column: str, classnames: Sequence[str] | None = None) -> LabelInfo:
    """Read ``label_column`` as class indices and find the class names.

    ClassLabel columns carry their names (``classnames`` may override them for the prompts, same count);
    string columns are mapped onto ``classnames`` or, without them, onto their sorted unique values; plain
    integer columns need ``classnames``.
    """
    feature = dataset.features[label_column]
    values = dataset[label_column]
    given = list(classnames) if classnames is not None else None
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        if given is not None and len(given) != len(names):
            raise ValueError(
                f"Label column {label_column!r} has {len(names)} classes but {len(given)} class names were "
                "given; pass exactly one name per class, in label order."
            )
        labels = np.asarray(values, dtype=np.int64)
        info = LabelInfo(labels, given or names, names)
    elif isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        names = given if given is not None else sorted({v for v in values if v is not None})
        shown = [display_name(n) for n in names]
        index: dict[str, int] = {}
        for i, name in enumerate(names):  # a class given as synonyms (shipped lists) matches any of them
            for synonym in [name] if isinstance(name, str) else name:
                index.setdefault(str(synonym), i)
        unknown = sorted({str(v) for v in values if v not in index})
        if unknown:
            raise ValueError(
                f"Labels {', '.join(unknown[:10])} in column {label_column!r} are not among the class names "
                f"({', '.join(shown[:10])}{', ...' if len(names) > 10 else ''})."
            )
        info = LabelInfo(np.asarray([index[v] for v in values], dtype=np.int64), list(names), shown)
    elif isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        if given is None:
            raise ValueError(
                f"Label column {label_column!r} holds integers without class names (it is not a ClassLabel "
                "feature). Pass the names in label order with --classnames a,b,c or --classnames FILE "
                "(one name per line)."
            )
        info = LabelInfo(np.asarray(values, dtype=np.int64), given, given)
    else:
        raise ValueError(
            f"Label column {label_column!r} holds {feature}; expected a ClassLabel, integer or string column. "
            f"Columns: {', '.join(dataset.column_names)}."
        )
    bad = (info.labels < 0) | (info.labels >= info.num_classes)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} labels in column {label_column!r} fall outside 0..{info.num_classes - 1} "
            f"(e.g. {int(info.labels[bad][0])}); unlabelled splits (label -1) cannot be evaluated."
        )
    return info


def _name_key(name: str | Sequence[str]) -> str | tuple[str, ...]:
    """A hashable key for a class name or a synonym list (shipped sets such as fer2013 have lists)."""
    return name if isinstance(name, str) else tuple(str(n) for n in name)


def name_index(keys: Sequence[Any]) -> tuple[dict[Any, int], set[Any]]:
    """Each name's first position in ``keys``, and the names that occur more than once there (which cannot be
    matched by name: ImageNet's two "missile" classes)."""
    index: dict[Any, int] = {}
    repeated: set[Any] = set()
    for i, key in enumerate(keys):
        if key in index:
            repeated.add(key)
        index.setdefault(key, i)
    return index, repeated


def align_labels(info: LabelInfo, reference: LabelInfo) -> np.ndarray:
    """Map a dataset's labels into the index space of ``reference`` by name (label names, then class names).

    Lets distribution-shift datasets whose label set is a reordering or a subset of the reference one
    (ImageNet-R and -A cover 200 of the 1,000 ImageNet classes) be scored with the same classifier. A dataset
    with the reference's own label list keeps its indices, so repeated names (ImageNet's two "missile" and
    two "sunglasses" classes) stay apart; matching a repeated name by name is ambiguous and is refused.
    """
    names = [_name_key(n) for n in info.label_names]
    for ref_names in (reference.label_names, reference.classnames):
        keys = [_name_key(n) for n in ref_names]
        if names == keys:
            return np.asarray(info.labels, dtype=np.int64)
        index, repeated = name_index(keys)
        if all(n in index for n in names):
            ambiguous = sorted(str(n) for n in set(names) & repeated)
            if ambiguous:
                raise ValueError(
                    f"Class names {', '.join(ambiguous)} occur more than once in the reference label set, so "
                    "labels cannot be matched to them by name; give the datasets the same label list, or "
                    "unique class names."
                )
            mapping = np.asarray([index[n] for n in names], dtype=np.int64)
            return mapping[info.labels]
    known = {_name_key(n) for n in [*reference.label_names, *reference.classnames]}
    missing = [display_name(n) for n in info.label_names if _name_key(n) not in known]
    raise ValueError(
        f"Class names {', '.join(missing[:10])} of a shifted dataset are not in the reference label set; "
        "distribution-shift datasets must share (a subset of) the reference classes."
    )
