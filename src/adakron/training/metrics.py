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
        result = {"mse": float(np.mean((predictions - references) ** 2))}
        # A correlation needs two or more examples, each side varying: otherwise it is undefined (NaN).
        defined = len(references) >= 2 and np.ptp(predictions) > 0 and np.ptp(references) > 0
        result["pearson"] = float(pearsonr(predictions, references)[0]) if defined else float("nan")
        result["spearman"] = float(spearmanr(predictions, references)[0]) if defined else float("nan")
        return result
    result = {"accuracy": float(accuracy_score(references, predictions))}
    if kind == "f1":
        result["f1"] = float(f1_score(references, predictions))
    elif kind == "matthews":
        result["matthews_correlation"] = float(matthews_corrcoef(references, predictions))
    return result


def undefined_note(results: dict[str, dict[str, float]]) -> str | None:
    """Why some metrics are missing (NaN) from ``results``, for people reading them."""
    missing = sorted({k for split in results.values() for k, v in split.items() if isinstance(v, float) and v != v})
    if not missing:
        return None
    return (f"{', '.join(missing)} undefined: a correlation needs at least 2 examples and predictions and labels "
            "that are not all equal")


def predictions_from_logits(logits: np.ndarray, regression: bool) -> np.ndarray:
    return logits.reshape(-1) if regression else logits.argmax(-1)
