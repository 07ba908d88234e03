"""Metrics of a fine-tuning task: pure functions of predictions and labels.

- classification: ``accuracy``, ``f1`` (binary: F1 of label 1; more classes: macro F1 over the
  classes that occur in the labels or the predictions, as GLUE and ``evaluate`` compute it) and,
  binary only, ``matthews_correlation``;
- regression: ``pearson``, ``spearman`` (correlations of predictions and labels) and ``mse``.

The primary metric (what a run reports first and a user compares): ``f1`` for binary tasks,
``accuracy`` for more classes, ``pearson`` for regression.

Degenerate inputs give a number, never nan: an F1 whose precision and recall are both undefined
(no positive label and no positive prediction) is 0.0 (scikit-learn's ``zero_division=0.0``);
the Matthews correlation of constant predictions or labels is 0.0 (scikit-learn's own rule); a
correlation with constant predictions or labels, or of fewer than two examples, is 0.0.

Computed with ``sklearn.metrics`` and ``scipy.stats``, imported when first used.
"""

from __future__ import annotations

import warnings

import numpy as np

CLASSIFICATION, REGRESSION = "classification", "regression"

__all__ = ["metric_names", "primary_metric", "task_metrics"]


def metric_names(task_type: str, num_labels: int) -> list[str]:
    """The metrics ``task_metrics`` returns for this kind of task, primary first."""
    _check_kind(task_type, num_labels)
    if task_type == REGRESSION:
        return ["pearson", "spearman", "mse"]
    if num_labels == 2:
        return ["f1", "accuracy", "matthews_correlation"]
    return ["accuracy", "f1"]


def primary_metric(task_type: str, num_labels: int) -> str:
    return metric_names(task_type, num_labels)[0]


def task_metrics(task_type: str, num_labels: int, predictions, labels) -> dict[str, float]:
    """Metrics of ``predictions`` against ``labels`` (lists, numpy arrays or torch tensors).

    Classification: ``predictions`` are class ids [n] or logits [n, num_labels] (the arg max is
    taken); labels are class ids [n]. Regression: predictions [n] or [n, 1], labels [n].
    Returns {name: float} in ``metric_names`` order.
    """
    _check_kind(task_type, num_labels)
    predictions, labels = _array(predictions), _array(labels)
    if task_type == CLASSIFICATION and predictions.ndim == 2:
        if predictions.shape[1] != num_labels:
            raise ValueError(f"logits have {predictions.shape[1]} columns, the task has {num_labels} labels")
        predictions = predictions.argmax(axis=1)
    if task_type == REGRESSION and predictions.ndim == 2 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"expected one prediction and one label per example, got shapes "
                         f"{predictions.shape} and {labels.shape}")
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    if task_type == REGRESSION:
        out = _regression(predictions.astype(np.float64), labels.astype(np.float64))
    else:
        out = _classification(num_labels, predictions.astype(np.int64), labels.astype(np.int64))
    return {name: out[name] for name in metric_names(task_type, num_labels)}


def _check_kind(task_type: str, num_labels: int) -> None:
    if task_type == CLASSIFICATION:
        if num_labels < 2:
            raise ValueError(f"classification needs at least 2 labels, got {num_labels}")
    elif task_type == REGRESSION:
        if num_labels != 1:
            raise ValueError(f"regression has num_labels 1, got {num_labels}")
    else:
        raise ValueError(f"task_type must be {CLASSIFICATION!r} or {REGRESSION!r}, got {task_type!r}")


def _array(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor (bf16 has no numpy dtype)
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def _classification(num_labels: int, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if num_labels == 2:
        # labels=[1]: F1 of class 1 even when a batch holds only one class (average="binary"
        # would refuse a lone class 0 when a 2 turns up, and guess the positive class otherwise)
        out["f1"] = float(f1_score(labels, predictions, labels=[1], average="macro", zero_division=0.0))
        with warnings.catch_warnings():
            # one class in labels and predictions: sklearn warns, then returns 0.0 (documented above)
            warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
            out["matthews_correlation"] = float(matthews_corrcoef(labels, predictions))
    else:
        out["f1"] = float(f1_score(labels, predictions, average="macro", zero_division=0.0))
    return out


def _regression(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error

    return {
        "pearson": _correlation(pearsonr, predictions, labels),
        "spearman": _correlation(spearmanr, predictions, labels),
        "mse": float(mean_squared_error(labels, predictions)),
    }


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    """The statistic of scipy's ``fn``; 0.0 where it is undefined (constant input, n < 2)."""
    if len(labels) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about constant input, then returns nan
        value = float(fn(predictions, labels).statistic)
    return 0.0 if np.isnan(value) else value
