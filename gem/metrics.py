"""Task metrics for the head path (torchmetrics), keyed by the names the task configs use."""

from __future__ import annotations

import torchmetrics
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr


def build_metrics(metric_names: list[str], kind: str, num_labels: int) -> torchmetrics.MetricCollection:
    """One torchmetrics object per name: acc, mcc, f1, pearson, spearman.

    F1 is binary (positive class 1) for two labels, as GLUE's MRPC reports it, and
    macro-averaged otherwise (CB's convention).
    """
    metrics = {}
    for name in metric_names:
        if kind == "regression":
            factory = {"pearson": tmr.PearsonCorrCoef, "spearman": tmr.SpearmanCorrCoef}.get(name)
            metric = factory() if factory else None
        elif name == "acc":
            metric = tmc.BinaryAccuracy() if num_labels == 2 else tmc.MulticlassAccuracy(num_labels, average="micro")
        elif name == "mcc":
            metric = tmc.BinaryMatthewsCorrCoef() if num_labels == 2 else tmc.MulticlassMatthewsCorrCoef(num_labels)
        elif name == "f1":
            metric = tmc.BinaryF1Score() if num_labels == 2 else tmc.MulticlassF1Score(num_labels, average="macro")
        else:
            metric = None
        if metric is None:
            raise ValueError(f"metric {name!r} is not defined for {kind} tasks; "
                             f"known: acc, mcc, f1 (classification), pearson, spearman (regression)")
        metrics[name] = metric
    return torchmetrics.MetricCollection(metrics)
