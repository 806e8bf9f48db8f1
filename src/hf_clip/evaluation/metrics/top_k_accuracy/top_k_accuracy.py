"""Top-k accuracy from ranked predictions, as reported for zero-shot classification in the CLIP paper.

Shipped inside hf_clip and loaded with ``evaluate.load(<local path>)`` so that evaluation never fetches
code from the Hub. Predictions are the class indices ranked best first (only the first ``max(k)`` are
needed), which keeps the inputs small for 1,000-way problems.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose reference label is among the first k ranked predictions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): class indices per example, ranked best first. Each ranking
        must hold at least `min(k, number of classes)` entries for every requested k.
    references (`list` of `int`): the true class index per example.
    k (`int` or `list` of `int`, defaults to `[1, 5]`): the cut-offs to report.
Returns:
    `top{k}_accuracy` (`float`) for every requested k, in [0, 1].
Examples:
    >>> metric = evaluate.load("src/hf_clip/evaluation/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[0, 1], k=[1, 2])
    {'top1_accuracy': 0.5, 'top2_accuracy': 1.0}
"""

_CITATION = """
@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and others},
  booktitle={ICML},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        ks = [k] if isinstance(k, int) else list(k)
        if not ks or any(int(c) < 1 for c in ks):
            raise ValueError(f"k must be positive integers, got {k!r}.")
        if len(references) == 0:
            raise ValueError("top_k_accuracy needs at least one example.")
        if any(len(ranked) == 0 for ranked in predictions):
            raise ValueError("Every ranking must hold at least one prediction.")
        refs = np.asarray(references, dtype=np.int64)
        results = {}
        for cut in ks:
            hits = [ref in ranked[:cut] for ranked, ref in zip(predictions, refs.tolist())]
            results[f"top{int(cut)}_accuracy"] = float(np.mean(hits))
        return results
