"""The paper's evaluations: zero-shot classification, linear probes, retrieval and distribution shift.

Each evaluation embeds a `datasets.Dataset` once (cached features), scores it with metric modules shipped
in `metrics/` and loaded through `evaluate` from their local path (no Hub access), and returns an
`EvalResult` that `save_result` writes as JSON, markdown and a PNG chart.
"""

from .classification import classification_metrics, top_k_indices
from .features import extract_image_features, extract_text_features
from .linear_probe import evaluate_linear_probe, sweep_regularization
from .loading import load_eval_dataset, parse_classnames, resolve_labels
from .metrics import load_metric
from .reporting import EvalResult, save_result, to_markdown
from .retrieval import evaluate_retrieval, retrieval_metrics
from .robustness import evaluate_robustness
from .zero_shot import evaluate_zero_shot, resolve_templates

__all__ = [
    "EvalResult",
    "classification_metrics",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_robustness",
    "evaluate_zero_shot",
    "extract_image_features",
    "extract_text_features",
    "load_eval_dataset",
    "load_metric",
    "parse_classnames",
    "resolve_labels",
    "resolve_templates",
    "retrieval_metrics",
    "save_result",
    "sweep_regularization",
    "to_markdown",
    "top_k_indices",
]
