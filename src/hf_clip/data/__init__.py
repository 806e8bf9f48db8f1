from .synthetic import (
    ALL_COMBINATIONS,
    CAPTION_TEMPLATES,
    HELD_OUT_COMBINATION_NAMES,
    HELD_OUT_COMBINATIONS,
    SYNTHETIC_ATTRIBUTES,
    TRAIN_COMBINATION_NAMES,
    combination_name,
    load_synthetic_clip_dataset,
    split_combinations,
    synthetic_zero_shot_templates,
)

__all__ = [
    "ALL_COMBINATIONS",
    "CAPTION_TEMPLATES",
    "HELD_OUT_COMBINATIONS",
    "HELD_OUT_COMBINATION_NAMES",
    "SYNTHETIC_ATTRIBUTES",
    "TRAIN_COMBINATION_NAMES",
    "combination_name",
    "load_synthetic_clip_dataset",
    "split_combinations",
    "synthetic_zero_shot_templates",
]
