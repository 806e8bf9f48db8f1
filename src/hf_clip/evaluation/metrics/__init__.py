"""Metric modules shipped with hf_clip and loaded through `evaluate` from their local path.

Loading from a path inside the installed package means evaluation works offline and never runs code
fetched from the Hub (``HF_HUB_OFFLINE=1`` is fine).
"""

from functools import cache
from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
SHIPPED_METRICS = ("top_k_accuracy", "mean_per_class_recall", "retrieval_recall")


def metric_path(name: str) -> Path:
    """Directory of a shipped metric module (``metrics/<name>/<name>.py``)."""
    if name not in SHIPPED_METRICS:
        raise ValueError(f"Unknown metric {name!r}; shipped metrics are {', '.join(SHIPPED_METRICS)}.")
    return METRICS_DIR / name


@cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load a shipped metric with ``evaluate.load`` from its local directory, kept in memory (no cache files)."""
    return evaluate.load(str(metric_path(name)), keep_in_memory=True)
