"""Segmentation quality: per-class Dice, BraTS regions, precision and recall (MONAI metrics).

Conventions (BraTS): a structure absent from both the prediction and the ground truth scores 1; absent from
one of them, 0. Regions are unions of classes in the 2023 scheme: whole tumour (1, 2, 3), tumour core (1, 3),
enhancing tumour (3).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice, get_confusion_matrix

# Short names used as table columns, and the SegLens classes each one covers.
TUMOUR_CLASSES = {"NC": (1,), "ED": (2,), "ET": (3,)}
TUMOUR_REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def _masks(labels: np.ndarray, groups: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.isin(labels, classes)).float()[None, None] for name, classes in groups.items()}


def _scores(pred: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """Dice, precision, recall of two binary masks ``(1, 1, ...)`` with the BraTS empty-mask convention."""
    n_pred, n_truth = float(pred.sum()), float(truth.sum())
    if n_pred == 0 or n_truth == 0:
        both_empty = float(n_pred == 0 and n_truth == 0)
        return both_empty, both_empty, both_empty
    dice = float(compute_dice(pred, truth, include_background=True, ignore_empty=False)[0, 0])
    tp, fp, _, fn = (float(v) for v in get_confusion_matrix(pred, truth, include_background=True)[0, 0])
    return dice, tp / (tp + fp), tp / (tp + fn)


def segmentation_scores(prediction: np.ndarray, truth: np.ndarray, class_names: list[str] | tuple[str, ...] | None = None) -> dict[str, float]:
    """Scores of one predicted label map against its ground truth.

    Args:
        prediction: SegLens class labels, any shape.
        truth: same shape.
        class_names: the model's classes; with the tumour scheme (4 classes) BraTS columns are produced,
            otherwise one Dice per named class.

    Returns:
        Tumour scheme: ``dice_NC, dice_ED, dice_ET`` (classes), ``dice_WT, dice_TC`` (regions; ET is both), and
        ``precision_*`` / ``recall_*`` for WT, TC and ET. Other schemes: ``dice_<class name>`` per class and their mean.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in shape")
    if class_names is None or len(class_names) == 4:
        pred_masks = _masks(prediction, {**TUMOUR_CLASSES, **TUMOUR_REGIONS})
        true_masks = _masks(truth, {**TUMOUR_CLASSES, **TUMOUR_REGIONS})
        scores: dict[str, float] = {}
        for name in ("NC", "ED", "ET", "WT", "TC"):
            scores[f"dice_{name}"] = _scores(pred_masks[name], true_masks[name])[0]
        for name in TUMOUR_REGIONS:
            _, precision, recall = _scores(pred_masks[name], true_masks[name])
            scores[f"precision_{name}"], scores[f"recall_{name}"] = precision, recall
        scores["dice_mean"] = float(np.mean([scores["dice_NC"], scores["dice_ED"], scores["dice_ET"]]))
        return scores
    groups = {name.replace(" ", "_"): (index,) for index, name in enumerate(class_names) if index > 0}
    pred_masks, true_masks = _masks(prediction, groups), _masks(truth, groups)
    scores = {f"dice_{name}": _scores(pred_masks[name], true_masks[name])[0] for name in groups}
    scores["dice_mean"] = float(np.mean(list(scores.values())))
    return scores
