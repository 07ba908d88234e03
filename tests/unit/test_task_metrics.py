"""Task metrics against small cases checked by hand (confusion counts written out below)."""

import math

import numpy as np
import pytest
import torch

from dist_sparse.train.task_metrics import metric_names, primary_metric, task_metrics


def close(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(math.isclose(a[k], b[k], abs_tol=1e-12) for k in b)


def test_names_and_primary_metric():
    assert metric_names("classification", 2) == ["f1", "accuracy", "matthews_correlation"]
    assert metric_names("classification", 3) == ["accuracy", "f1"]
    assert metric_names("regression", 1) == ["pearson", "spearman", "mse"]
    assert [primary_metric(*k) for k in (("classification", 2), ("classification", 5), ("regression", 1))] == [
        "f1", "accuracy", "pearson"]


def test_binary():
    labels = [1, 1, 0, 0, 1]
    predictions = [1, 0, 0, 1, 1]  # TP 2 (rows 0, 4), FN 1 (row 1), FP 1 (row 3), TN 1 (row 2)
    # precision = recall = 2/3 -> F1 2/3; MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    expected = {"f1": 2 / 3, "accuracy": 3 / 5, "matthews_correlation": 1 / 6}
    assert close(task_metrics("classification", 2, predictions, labels), expected)
    logits = np.array([[-1.0, 2.0], [0.5, 0.1], [3.0, -3.0], [0.0, 0.2], [-0.1, 0.1]])  # arg max = predictions
    assert close(task_metrics("classification", 2, logits, np.array(labels)), expected)
    assert close(task_metrics("classification", 2, torch.tensor(logits, dtype=torch.bfloat16),
                              torch.tensor(labels)), expected)
    out = task_metrics("classification", 2, predictions, labels)
    assert all(type(v) is float for v in out.values())


def test_multiclass_macro_f1():
    labels = [0, 1, 2, 2, 1, 0]
    predictions = [0, 2, 2, 2, 1, 1]
    # class 0: TP 1 FP 0 FN 1 -> F1 2/3; class 1: TP 1 FP 1 FN 1 -> 1/2; class 2: TP 2 FP 1 FN 0 -> 4/5
    expected = {"accuracy": 4 / 6, "f1": (2 / 3 + 1 / 2 + 4 / 5) / 3}  # = 59/90
    assert close(task_metrics("classification", 3, predictions, labels), expected)
    # a class that occurs in neither labels nor predictions is not averaged in (as GLUE/evaluate do)
    assert close(task_metrics("classification", 4, predictions, labels), expected)
    logits = np.eye(4)[predictions] * 5.0
    assert close(task_metrics("classification", 4, logits, labels), expected)


def test_degenerate_classification_gives_numbers():
    # no positive label and no positive prediction: F1 undefined -> 0.0; constant -> MCC 0.0
    assert task_metrics("classification", 2, [0, 0, 0], [0, 0, 0]) == {
        "f1": 0.0, "accuracy": 1.0, "matthews_correlation": 0.0}
    assert task_metrics("classification", 2, [1, 1], [1, 1]) == {
        "f1": 1.0, "accuracy": 1.0, "matthews_correlation": 0.0}
    # constant predictions against both classes: precision undefined -> 0, recall 0
    assert task_metrics("classification", 2, [0, 0, 0, 0], [0, 1, 1, 0]) == {
        "f1": 0.0, "accuracy": 0.5, "matthews_correlation": 0.0}
    assert task_metrics("classification", 3, [2, 2], [2, 2]) == {"accuracy": 1.0, "f1": 1.0}
    assert task_metrics("classification", 3, [0], [1]) == {"accuracy": 0.0, "f1": 0.0}


def test_regression():
    # y = 2x: perfect correlations; mse = (1 + 4 + 9 + 16) / 4
    assert close(task_metrics("regression", 1, [1, 2, 3, 4], [2, 4, 6, 8]),
                 {"pearson": 1.0, "spearman": 1.0, "mse": 7.5})
    # dx = dy = (-1.5, -.5, .5, 1.5) up to one swap: r = 4/5; ranks are the values themselves
    assert close(task_metrics("regression", 1, np.array([[1.0], [2.0], [3.0], [4.0]]), [1, 3, 2, 4]),
                 {"pearson": 0.8, "spearman": 0.8, "mse": 0.5})
    out = task_metrics("regression", 1, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 4.0, 9.0, 100.0]))
    assert out["spearman"] == 1.0 and 0.7 < out["pearson"] < 0.9
    assert list(out) == ["pearson", "spearman", "mse"]


def test_degenerate_regression_gives_numbers():
    # constant predictions: correlations undefined -> 0.0; mse (4 + 1 + 0) / 3
    assert close(task_metrics("regression", 1, [3.0, 3.0, 3.0], [1.0, 2.0, 3.0]),
                 {"pearson": 0.0, "spearman": 0.0, "mse": 5 / 3})
    assert close(task_metrics("regression", 1, [1.0, 2.0], [5.0, 5.0]),
                 {"pearson": 0.0, "spearman": 0.0, "mse": 12.5})
    assert task_metrics("regression", 1, [2.0], [1.0]) == {"pearson": 0.0, "spearman": 0.0, "mse": 1.0}


def test_bad_calls():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        task_metrics("classification", 2, [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no examples"):
        task_metrics("regression", 1, [], [])
    with pytest.raises(ValueError, match="logits have 3 columns, the task has 2 labels"):
        task_metrics("classification", 2, np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="regression has num_labels 1"):
        task_metrics("regression", 2, [1.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 labels"):
        metric_names("classification", 1)
    with pytest.raises(ValueError, match="task_type must be"):
        task_metrics("ranking", 2, [0], [0])
    with pytest.raises(ValueError, match="one prediction and one label per example"):
        task_metrics("regression", 1, np.zeros((2, 2)), [0.0, 1.0])
