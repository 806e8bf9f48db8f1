"""Prompt templates and class names used for CLIP's zero-shot evaluations.

The lists are the published ones, stored as package data:

- `imagenet1k`: the 80 prompt templates of the paper's ImageNet ensemble and OpenAI's cleaned ImageNet-1k
  class names, from OpenAI's notebook `notebooks/Prompt_Engineering_for_ImageNet.ipynb` (the 1,000 names
  contain two published duplicates, "missile" and "sunglasses").
- every other dataset: OpenAI's `data/prompts.md`, the prompts behind the paper's zero-shot table (26 of the
  27 datasets; Kinetics-700 is left out because it is a video benchmark). For FER2013 a class is a list of
  synonyms, each expanded with every template and ensembled.

Templates use `{}` as the class-name placeholder.
"""

import json
import re
from functools import cache
from importlib import resources
from typing import Any

# Other spellings users reach for; keys are normalised with `_normalise`.
_ALIASES = {
    "imagenet": "imagenet1k",
    "imagenetv2": "imagenet1k",
    "imagenetsketch": "imagenet1k",
    "pets": "oxford_pets",
    "oxfordiiitpet": "oxford_pets",
    "cars": "stanford_cars",
    "aircraft": "fgvc_aircraft",
    "flowers": "flowers102",
    "oxfordflowers102": "flowers102",
    "food": "food101",
    "describabletextures": "dtd",
    "patchcamelyon": "pcam",
    "renderedsst2": "sst2",
    "facialemotionrecognition2013": "fer2013",
    "kitti": "kitti_distance",
    "pascalvoc2007": "voc2007",
    "clevr": "clevr_counts",
}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@cache
def _load(kind: str) -> dict[str, Any]:
    text = resources.files(__package__).joinpath(f"{kind}.json").read_text(encoding="utf-8")
    return json.loads(text)


def available_datasets() -> list[str]:
    """Canonical names of the datasets with shipped class names and templates."""
    return sorted(_load("classnames"))


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"Dataset name must be a string, got {type(name).__name__}.")
    canonical = {_normalise(key): key for key in _load("classnames")}
    key = _normalise(name)
    if key in canonical:
        return canonical[key]
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(
        f"Unknown zero-shot dataset {name!r}. Available: {', '.join(available_datasets())} "
        f"(aliases: {', '.join(sorted(_ALIASES))})."
    )


def is_known_dataset(name: str) -> bool:
    """Whether `name` (or an alias of it) has shipped templates, without raising."""
    try:
        _resolve(name)
    except (KeyError, TypeError):
        return False
    return True


def get_templates(name: str) -> list[str]:
    """The published prompt templates of dataset `name`, each with one `{}` placeholder."""
    return list(_load("templates")[_resolve(name)])


def get_classnames(name: str) -> list[str | list[str]]:
    """The published class names of dataset `name`, in label-index order.

    An entry is a list of synonyms where the paper ensembled several names for one class (FER2013).
    """
    return [list(c) if isinstance(c, list) else c for c in _load("classnames")[_resolve(name)]]
