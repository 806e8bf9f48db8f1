"""Retrieval recall@k, as reported for Flickr30k and MSCOCO image-text retrieval in the CLIP paper.

Shipped inside hf_clip and loaded with ``evaluate.load(<local path>)`` so that evaluation never fetches
code from the Hub. A query may have several relevant candidates (an image has about five captions): it
counts as retrieved at k when ANY of them is among the first k ranked candidates.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Recall@k for retrieval: the fraction of queries for which at least one relevant candidate appears among
the first k ranked candidates.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): candidate indices per query, ranked best first; at least
        `min(k, number of candidates)` entries for every requested k.
    references (`list` of `list` of `int`): the relevant candidate indices of every query (one or more).
    k (`int` or `list` of `int`, defaults to `[1, 5, 10]`): the cut-offs to report.
Returns:
    `recall@{k}` (`float`) for every requested k, in [0, 1].
Examples:
    >>> metric = evaluate.load("src/hf_clip/evaluation/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[3, 1, 0], [2, 0, 1]], references=[[0, 1], [1]], k=[1, 2])
    {'recall@1': 0.0, 'recall@2': 0.5}
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
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5, 10)):
        ks = [k] if isinstance(k, int) else list(k)
        if not ks or any(int(c) < 1 for c in ks):
            raise ValueError(f"k must be positive integers, got {k!r}.")
        if len(references) == 0:
            raise ValueError("retrieval_recall needs at least one query.")
        if any(len(relevant) == 0 for relevant in references):
            raise ValueError("Every query needs at least one relevant candidate.")
        results = {}
        for cut in ks:
            hits = [
                not set(ranked[:cut]).isdisjoint(relevant)
                for ranked, relevant in zip(predictions, references)
            ]
            results[f"recall@{int(cut)}"] = float(np.mean(hits))
        return results
