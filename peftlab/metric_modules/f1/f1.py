"""F1: scikit-learn `f1_score` as an evaluate metric, shipped so it loads offline."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall), averaged as `average` says."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    labels (`list` of `int`): classes to average over; classes absent from the data count as 0 in a macro average.
    pos_label (`int`): the positive class when average is "binary". Defaults to 1.
    average (`str` or None): "binary" (default), "micro", "macro", "weighted", or None for one score per class.
    sample_weight (`list` of `float`): per-example weights. Defaults to None.
    zero_division (`float` or "warn"): the score of a class whose denominator is 0. Defaults to "warn" (0, warned).
Returns:
    f1 (`float`, or `list` of `float` when average is None): between 0 and 1.
Example:
    >>> f1 = evaluate.load("peftlab/metric_modules/f1")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])["f1"]
    0.6666666666666666
"""
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division="warn",
    ):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        # A scalar for any averaged score; one float per class (JSON-friendly) when average is None.
        return {"f1": float(score) if np.ndim(score) == 0 else np.asarray(score).tolist()}
