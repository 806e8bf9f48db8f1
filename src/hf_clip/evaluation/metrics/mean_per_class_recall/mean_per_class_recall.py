"""Mean per-class recall (balanced accuracy), the metric the CLIP paper reports for datasets such as
FGVC Aircraft, Oxford Pets, Caltech-101 and Flowers-102.

Shipped inside hf_clip and loaded with ``evaluate.load(<local path>)`` so that evaluation never fetches
code from the Hub. Also returns the recall of every class, which the per-class bar chart plots.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean per-class recall: the recall of each class (correct predictions of the class / examples of the
class), averaged over the classes that occur in the references. Classes without references are left out
of the mean and reported as None.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): the predicted class index per example.
    references (`list` of `int`): the true class index per example.
    num_classes (`int`, *optional*): size of the label set; defaults to 1 + the largest index seen.
Returns:
    `mean_per_class_recall` (`float`): mean over classes present in the references, in [0, 1].
    `per_class_recall` (`list` of `float` or `None`): recall of every class index, None when the class has
        no reference.
Examples:
    >>> metric = evaluate.load("src/hf_clip/evaluation/metrics/mean_per_class_recall")
    >>> metric.compute(predictions=[0, 0, 1, 1], references=[0, 1, 1, 1], num_classes=3)
    {'mean_per_class_recall': 0.8333333333333333, 'per_class_recall': [1.0, 0.6666666666666666, None]}
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
class MeanPerClassRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes=None):
        preds = np.asarray(predictions, dtype=np.int64)
        refs = np.asarray(references, dtype=np.int64)
        if refs.size == 0:
            raise ValueError("mean_per_class_recall needs at least one example.")
        if min(preds.min(), refs.min()) < 0:
            raise ValueError("Class indices must be non-negative.")
        seen = int(max(preds.max(), refs.max())) + 1
        if num_classes is None:
            num_classes = seen
        elif seen > num_classes:
            raise ValueError(f"Found class index {seen - 1} but num_classes={num_classes}.")
        support = np.bincount(refs, minlength=num_classes)
        correct = np.bincount(refs[preds == refs], minlength=num_classes)
        present = support > 0
        recall = np.zeros(num_classes, dtype=np.float64)
        recall[present] = correct[present] / support[present]
        return {
            "mean_per_class_recall": float(recall[present].mean()),
            "per_class_recall": [float(r) if p else None for r, p in zip(recall, present)],
        }
