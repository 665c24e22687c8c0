"""Clinical metrics for binary chest X-ray classification, as a local `evaluate` module.

Load it offline with ``evaluate.load("cxr_train/clinical_metrics")`` (a path, so nothing is
fetched from the Hub). The math lives in ``cxr_train.metrics`` (one implementation).
"""

import datasets
import evaluate

from cxr_train.metrics import compute_clinical_metrics

_DESCRIPTION = """Accuracy, AUROC, PR-AUC, sensitivity, specificity, precision (PPV), NPV, F1,
balanced accuracy, Brier score, ECE and the confusion matrix [[TN, FP], [FN, TP]].
`predictions` are positive-class probabilities, `references` are 0/1 labels (1 = positive)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): probability of the positive class.
    references (list of int): 0 (negative, e.g. NORMAL) or 1 (positive, e.g. PNEUMONIA).
    threshold (float, default 0.5): predicted positive when probability >= threshold.
Returns: dict of metric name -> value.
Example:
    >>> m = evaluate.load("cxr_train/clinical_metrics")
    >>> m.compute(predictions=[0.1, 0.9], references=[0, 1])["roc_auc"]
    1.0
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClinicalMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("float64"),
                "references": datasets.Value("int32"),
            }),
        )

    def _compute(self, predictions, references, threshold: float = 0.5):
        return compute_clinical_metrics(references, predictions, threshold)
