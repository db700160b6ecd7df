"""Evaluation metrics, from scikit-learn and scipy."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# metric set -> the metric that picks the best epoch (the authors' convention for GLUE).
MAIN_METRIC = {"accuracy": "accuracy", "f1": "f1", "matthews": "matthews_correlation", "correlation": "pearson"}


def compute(kind: str, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """``kind`` is one of MAIN_METRIC's keys; predictions are class ids, or scores for 'correlation'."""
    if kind == "correlation":
        predictions, references = np.asarray(predictions, float).ravel(), np.asarray(references, float).ravel()
        return {"pearson": float(pearsonr(predictions, references)[0]),
                "spearman": float(spearmanr(predictions, references)[0])}
    result = {"accuracy": float(accuracy_score(references, predictions))}
    if kind == "f1":
        result["f1"] = float(f1_score(references, predictions))
    elif kind == "matthews":
        result["matthews_correlation"] = float(matthews_corrcoef(references, predictions))
    return result


def predictions_from_logits(logits: np.ndarray, regression: bool) -> np.ndarray:
    return logits.reshape(-1) if regression else logits.argmax(-1)
