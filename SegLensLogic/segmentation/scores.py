"""Segmentation quality: per-class Dice, BraTS regions, precision and recall.

Conventions (BraTS): a structure absent from both the prediction and the ground truth scores 1; absent from
one of them, 0. Regions are unions of classes in the 2023 scheme: whole tumour (1, 2, 3), tumour core (1, 3),
enhancing tumour (3).

All scores come from one confusion matrix of the two label maps (a single pass over the volume with
``np.bincount``): MONAI's one-hot metrics cost about a second per structure on a 240x240x155 volume, this costs
milliseconds for all of them.
"""

from __future__ import annotations

import numpy as np

# Short names used as table columns, and the SegLens classes each one covers.
TUMOUR_CLASSES = {"NC": (1,), "ED": (2,), "ET": (3,)}
TUMOUR_REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def confusion_matrix(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[p, t]`` = number of voxels predicted ``p`` whose truth is ``t``; shape ``(num_classes, num_classes)``.

    Both label maps hold SegLens classes, integers in ``[0, num_classes)`` (callers pass at least their maximum + 1).
    """
    # One small-integer code per voxel; only the (few) nonzero codes are counted, background-background is the rest.
    dtype = np.uint8 if num_classes**2 <= 256 else np.int64
    code = prediction.astype(dtype, copy=False) * dtype(num_classes) + truth.astype(dtype, copy=False)
    counted = code[code != 0]
    counts = np.bincount(counted, minlength=num_classes * num_classes)
    counts[0] = code.size - counted.size
    return counts.reshape(num_classes, num_classes)


def overlap_scores(confusion: np.ndarray, classes: tuple[int, ...]) -> tuple[float, float, float]:
    """Dice, precision and recall of the structure made of ``classes``, from a confusion matrix."""
    inside = np.zeros(confusion.shape[0], dtype=bool)
    inside[list(classes)] = True
    tp = float(confusion[np.ix_(inside, inside)].sum())
    fp = float(confusion[np.ix_(inside, ~inside)].sum())
    fn = float(confusion[np.ix_(~inside, inside)].sum())
    if tp + fp == 0 or tp + fn == 0:  # empty prediction or empty truth
        both_empty = float(tp + fp + fn == 0)
        return both_empty, both_empty, both_empty
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp), tp / (tp + fn)


def segmentation_scores(prediction: np.ndarray, truth: np.ndarray, class_names: list[str] | tuple[str, ...] | None = None) -> dict[str, float]:
    """Scores of one predicted label map against its ground truth.

    Args:
        prediction: SegLens class labels, any shape.
        truth: same shape.
        class_names: the model's classes; with the tumour scheme (4 classes, the default) BraTS columns are
            produced, otherwise one Dice per named class.

    Returns:
        Tumour scheme: ``dice_NC, dice_ED, dice_ET`` (classes), ``dice_WT, dice_TC`` (regions; ET is both),
        ``precision_*`` / ``recall_*`` for WT, TC and ET, and ``dice_mean`` over the three classes.
        Other schemes: ``dice_<class name>`` per class and their mean.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in shape")
    num_classes = len(class_names) if class_names is not None else 4
    top = int(max(prediction.max(initial=0), truth.max(initial=0))) + 1
    confusion = confusion_matrix(prediction, truth, max(num_classes, top))
    if num_classes == 4:
        scores: dict[str, float] = {}
        for name in ("NC", "ED", "ET", "WT", "TC"):
            classes = TUMOUR_CLASSES.get(name) or TUMOUR_REGIONS[name]
            scores[f"dice_{name}"] = overlap_scores(confusion, classes)[0]
        for name, classes in TUMOUR_REGIONS.items():
            _, scores[f"precision_{name}"], scores[f"recall_{name}"] = overlap_scores(confusion, classes)
        scores["dice_mean"] = float(np.mean([scores["dice_NC"], scores["dice_ED"], scores["dice_ET"]]))
        return scores
    scores = {
        f"dice_{name.replace(' ', '_')}": overlap_scores(confusion, (index,))[0]
        for index, name in enumerate(class_names)
        if index > 0
    }
    scores["dice_mean"] = float(np.mean(list(scores.values())))
    return scores
