"""How plausible a predicted tumour looks next to a reference cohort's, without the case's labels.

Suggested corrections (:mod:`.suggestions`) and the label-free arm of the repair experiment choose a steering
strength by this criterion: the predicted tumour's class proportions and relative size against those of the
reference cohort's ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class ReferenceStatistics:
    """What the reference cohort's ground truth says a tumour looks like (for the label-free criterion).

    Attributes:
        proportions: mean share of necrotic core, edema, enhancing tumour in the whole tumour.
        log_size: mean and standard deviation of log(whole-tumour voxels / brain voxels).
    """

    proportions: np.ndarray
    log_size: tuple[float, float]

    @classmethod
    def from_labels(cls, labels: Sequence[tuple[np.ndarray, np.ndarray]]) -> "ReferenceStatistics":
        """From ``[(label map, brain mask)]`` of the reference cohort (its own ground truth, never a test case's)."""
        shares, sizes = [], []
        for label, brain in labels:
            tumour = max(int((label > 0).sum()), 1)
            shares.append([(label == c).sum() / tumour for c in (1, 2, 3)])
            sizes.append(math.log(tumour / max(int(brain.sum()), 1)))
        return cls(np.mean(shares, axis=0), (float(np.mean(sizes)), float(np.std(sizes) + 0.25)))

    def to_dict(self) -> dict:
        return {"proportions": [float(v) for v in self.proportions], "log_size": list(self.log_size)}


def plausibility(labels: np.ndarray, brain: np.ndarray, reference: ReferenceStatistics) -> float:
    """Label-free distance of a predicted tumour from the reference cohort's (lower is more plausible): the L1
    distance of its class proportions plus the z-score of its log relative size. An empty prediction is maximal."""
    tumour = int((labels > 0).sum())
    if tumour == 0:
        return float("inf")
    shares = np.array([(labels == c).sum() / tumour for c in (1, 2, 3)])
    size = math.log(tumour / max(int(brain.sum()), 1))
    return float(np.abs(shares - reference.proportions).sum() + abs(size - reference.log_size[0]) / reference.log_size[1])
