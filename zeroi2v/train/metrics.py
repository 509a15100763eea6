"""Classification metrics over per-video class probabilities, and their reports (plot, tables)."""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..safe_io import atomic_path, atomic_write_text


def average_views(logits: torch.Tensor, num_views: int) -> torch.Tensor:
    """``(B*V, K)`` logits of ``V`` views per video (rows ``b*V + v``) → ``(B, K)`` mean softmax."""
    if logits.shape[0] % num_views:
        raise ValueError(f"{logits.shape[0]} rows are not a multiple of {num_views} views")
    return logits.float().softmax(-1).unflatten(0, (-1, num_views)).mean(1)


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of videos of true class ``i`` predicted as ``j``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), pred.astype(np.int64)), 1)
    return cm


def classification_metrics(probs, labels, num_classes: Optional[int] = None,
                           topk: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy (%), mean class accuracy (%) and the confusion matrix.

    ``probs`` is ``(N, K)`` (probabilities or scores), ``labels`` ``(N,)``. Mean class accuracy
    averages the per-class recall over classes that occur in ``labels``. Top-k for ``k >= K``
    is 100 % by construction and is not reported (no ``top5`` with 5 classes or fewer);
    top-1 always is.
    """
    probs = torch.as_tensor(probs).float()
    labels = torch.as_tensor(labels).long()
    if probs.dim() != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"need probs (N, K) and labels (N,), got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    n, k = probs.shape
    num_classes = int(num_classes or k)
    out: dict = {"num_samples": int(n)}
    if n == 0:
        return out
    ranked = probs.topk(min(max(topk), k), dim=1).indices
    for kk in topk:
        if kk > 1 and kk >= k:
            continue
        hit = (ranked[:, :kk] == labels[:, None]).any(1).float().mean().item()
        out[f"top{kk}"] = 100.0 * hit
    pred = ranked[:, 0].numpy()
    cm = confusion_matrix(pred, labels.numpy(), num_classes)
    support = cm.sum(1)
    present = support > 0
    recall = np.where(present, np.diag(cm) / np.maximum(support, 1), np.nan)
    out["mean_class_acc"] = float(100.0 * np.nanmean(recall)) if present.any() else float("nan")
    out["per_class_acc"] = [None if np.isnan(r) else float(100.0 * r) for r in recall]
    out["confusion_matrix"] = cm.tolist()
    return out


def class_names_or_ids(num_classes: int, class_names: Optional[Sequence[str]] = None) -> list[str]:
    """A name for each class: its name where ``class_names`` has one, else its id (data that
    names fewer classes than the model predicts)."""
    names = [str(c) for c in (class_names or [])[:num_classes]]
    return names + [str(i) for i in range(len(names), num_classes)]


def write_per_class_tables(metrics: dict, out_prefix: os.PathLike,
                           class_names: Optional[Sequence[str]] = None) -> list[Path]:
    """Write ``<prefix>_per_class.csv`` and ``.md``: class, support, correct, accuracy."""
    cm = np.asarray(metrics["confusion_matrix"])
    names = class_names_or_ids(cm.shape[0], class_names)
    rows = []
    for i, name in enumerate(names):
        sup, cor = int(cm[i].sum()), int(cm[i, i])
        acc = f"{100.0 * cor / sup:.2f}" if sup else ""
        rows.append((i, name, sup, cor, acc))
    prefix = Path(out_prefix)
    csv_path, md_path = prefix.with_name(prefix.name + "_per_class.csv"), \
        prefix.with_name(prefix.name + "_per_class.md")
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_id", "class_name", "support", "correct", "accuracy"])
        w.writerows(rows)
    atomic_write_text(md_path, "| class id | class | support | correct | accuracy (%) |\n"
                      "|---|---|---|---|---|\n" +
                      "".join("| " + " | ".join(str(x) for x in r) + " |\n" for r in rows))
    return [csv_path, md_path]


def plot_confusion_matrix(cm, path: os.PathLike, class_names: Optional[Sequence[str]] = None,
                          title: str = "Confusion matrix", normalize: bool = True) -> Path:
    """Save a confusion-matrix heat map as PNG (matplotlib, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    names = class_names_or_ids(k, class_names)
    size = min(20.0, max(4.0, 0.35 * k + 2))
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot state / GUI backend involved
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 40:
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        labels = [n.replace("$", r"\$") for n in names]  # a name is text, not mathtext
        ax.set_xticklabels(labels, rotation=90, fontsize=8)
        ax.set_yticklabels(labels, fontsize=8)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                        color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
