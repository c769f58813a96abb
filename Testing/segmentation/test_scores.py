"""Segmentation metrics: the confusion matrix every Dice in SegLens is computed from."""

from __future__ import annotations

import numpy as np
import pytest

from SegLensLogic.segmentation.scores import confusion_matrix, segmentation_scores


@pytest.mark.parametrize("num_classes", [2, 4, 16, 17, 40])
def test_confusion_matrix_counts_every_pair(num_classes):
    rng = np.random.default_rng(num_classes)
    # Mostly background, as in a brain volume; a transposed, flipped view as orientation gives one.
    prediction = np.where(rng.random((30, 20, 12)) < 0.8, 0, rng.integers(0, num_classes, (30, 20, 12)))
    truth = rng.integers(0, num_classes, (12, 20, 30)).transpose(2, 1, 0)[::-1]
    expected = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(prediction.ravel(), truth.ravel()):
        expected[p, t] += 1
    for dtype in (np.uint8, np.int16, np.int64):
        got = confusion_matrix(prediction.astype(dtype), truth.astype(dtype), num_classes)
        assert got.shape == (num_classes, num_classes) and np.array_equal(got, expected)


def test_all_background_and_perfect_predictions():
    empty = np.zeros((8, 8, 4), dtype=np.uint8)
    assert confusion_matrix(empty, empty, 4)[0, 0] == empty.size and confusion_matrix(empty, empty, 4).sum() == empty.size
    truth = empty.copy()
    truth[2:5, 2:5, 1:3] = 3
    truth[3, 3, 2] = 1
    scores = segmentation_scores(truth, truth)
    assert scores["dice_WT"] == scores["dice_TC"] == scores["dice_ET"] == 1.0
    assert segmentation_scores(empty, truth)["dice_WT"] == 0.0
