"""The simulated user of interactive segmentation: where a user who sees the truth would click next.

The standard protocol (as in DeepIGeoS, RITM and MONAI Label's DeepEdit simulation): compare the current mask with
the ground truth, take the largest connected error component, and click at its interior point, the voxel farthest
from the component's border (Euclidean distance transform in mm; among tied voxels, the one nearest their
centroid). A component of missed tumour of class ``c``
(truth ``c``, prediction not ``c``) gives a ``+c`` hint; a component of false tumour (prediction tumour, truth
background) gives a ``-`` hint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..steering.hints import Hint, ras_voxel_to_point


@dataclass(frozen=True)
class Click:
    """A simulated click: its voxel (in the arrays' order), the hint it makes, and the error component's size."""

    voxel: tuple[int, int, int]
    sign: str
    cls: int | None
    component_voxels: int


def error_components(labels: np.ndarray, truth: np.ndarray, num_classes: int = 4) -> list[tuple[str, int | None, np.ndarray]]:
    """The error masks a click may target: ``("+", c, missed c)`` per foreground class and ``("-", None, false
    tumour)``; each boolean, the arrays' shape."""
    out: list[tuple[str, int | None, np.ndarray]] = []
    for c in range(1, num_classes):
        out.append(("+", c, (truth == c) & (labels != c)))
    out.append(("-", None, (labels > 0) & (truth == 0)))
    return out


def next_click(labels: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0), num_classes: int = 4) -> Click | None:
    """The next click on ``labels`` against ``truth`` (same shape): at the interior point of the largest error
    component (6-connected); None when the mask is already right.

    Args:
        spacing: voxel sizes (mm) along the arrays' axes (the distance transform's units).
    """
    best: tuple[int, str, int | None, np.ndarray, tuple[slice, ...]] | None = None
    for sign, cls, error in error_components(labels, truth, num_classes):
        if not error.any():
            continue
        components, n = ndimage.label(error)
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        sizes[0] = 0
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            box = ndimage.find_objects((components == largest).astype(np.int8))[0]
            best = (int(sizes[largest]), sign, cls, components[box] == largest, box)
    if best is None:
        return None
    size, sign, cls, component, box = best
    # Pad so that the volume's edge counts as the component's border.
    distance = ndimage.distance_transform_edt(np.pad(component, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    # Ties (a slab's whole mid-plane is farthest from its border): the tied voxel nearest their centroid.
    tied = np.argwhere(distance >= distance.max() - 1e-6)
    local = tied[int(np.argmin(((tied - tied.mean(axis=0)) ** 2).sum(axis=1)))]
    voxel = tuple(int(s.start + v) for s, v in zip(box, local))
    return Click(voxel, sign, cls, size)  # type: ignore[arg-type]


def click_hint(click: Click, prepared) -> Hint:
    """The hint of a click made on a prepared case's RAS arrays: its voxel's world point (mm)."""
    return Hint(ras_voxel_to_point(click.voxel, prepared), click.sign, click.cls)
