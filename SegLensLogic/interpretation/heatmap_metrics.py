"""Geometry- and mask-based metrics of latent heatmaps on one axial slice (Med-SegLens appendix C).

A heatmap ``h`` is a latent's activation on one axial slice at image resolution, in RAS order: array axis 0
increases to the patient's Right, axis 1 to Anterior. Every metric is a weighted sum over the slice's pixels, so
many latents are measured at once: their heatmaps ``(L, X, Y)`` are flattened to ``(L, X*Y)`` and multiplied by a
few indicator columns prepared once per slice (:class:`SliceContext`).

Per heatmap (``eps`` guards empty maps):

- ``p_<class>``: class association, ``sum h [label == c] / sum h`` for every label class (background includes
  everything outside the brain).
- ``p_outside_brain``, ``p_healthy_brain``: mass outside the brain mask; mass in brain with label 0.
- ``r_inside``, ``r_boundary``: mass inside the labelled regions ``M`` (label > 0) and within ``boundary_mm`` of
  their border (a band on both sides of the border between labelled and unlabelled pixels).
- ``entropy``: spatial entropy ``-sum h~ log(h~ + eps)`` in nats; ``entropy_norm`` divides it by the log of the
  brain's pixel count, so 1 is as spread as a map uniform over the brain and values near 0 are point-like;
  ``extent`` is ``exp(entropy)`` over the brain's pixel count: the share of the brain an equally spread map of
  the same entropy would cover (1 uniform, 0.05 a blob over 5 % of the brain).
- ``edge_ratio``: mass in the brain's edge band (brain pixels whose normalised depth is at most ``edge_depth``)
  over mass in the brain.
- ``depth``: activation-weighted mean depth over the brain, from the Euclidean distance transform normalised
  per slice: 0 at the brain surface, 1 at the deepest point.
- ``centroid_lr``, ``centroid_ap``: robust centroid of the high-activation pixels (``h >= high * max h``,
  weighted by ``h``), relative to the brain's bounding box: -1 patient left / posterior edge, +1 right /
  anterior edge. ``centroid_si``: the slice's position among the case's brain slices (-1 inferior, +1 superior).
- ``lateralisation``: (mass right of the brain centroid - mass left of it) / mass in brain, in [-1, 1].
- ``edge_coverage``: fraction of ``angle_bins`` angular sectors around the brain centroid that hold a
  high-activation pixel in the edge band: near 1 for a ring along the brain's edge, small for a localised one.
- ``area_<class>``, ``area_inside``, ``area_edge``, ``area_boundary``: what a map uniform over the brain would
  score (fraction of brain pixels in each class, in labelled regions, in the edge band, in the boundary band):
  the slice's base rates, against which the labeller measures enrichment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

EPS = 1e-8

# Metric columns that do not depend on the class list, in storage order.
GEOMETRY_METRICS = (
    "p_outside_brain", "p_healthy_brain", "r_inside", "r_boundary", "entropy", "entropy_norm", "extent", "edge_ratio", "depth",
    "centroid_lr", "centroid_ap", "centroid_si", "lateralisation", "edge_coverage",
    "area_inside", "area_edge", "area_boundary",
)  # fmt: skip


@dataclass(frozen=True)
class MetricOptions:
    """Widths and thresholds of the slice metrics.

    Attributes:
        edge_depth: the edge band is the brain pixels with normalised depth at most this (0 surface, 1 deepest).
        boundary_mm: half-width of the band around label borders, in mm.
        high: a pixel is high-activation when ``h >= high * max(h)`` on its slice (centroid, edge coverage).
        angle_bins: angular sectors around the brain centroid for edge coverage.
    """

    edge_depth: float = 0.15
    boundary_mm: float = 3.0
    high: float = 0.5
    angle_bins: int = 16


def metric_names(class_names: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the columns :func:`slice_metrics` returns, for a label scheme's class names."""
    return (
        [f"p_{name}" for name in class_names]
        + list(GEOMETRY_METRICS)
        + [f"area_{name}" for name in class_names[1:]]
    )


@dataclass
class SliceContext:
    """Everything about one axial slice that the metrics need, independent of any latent.

    Attributes:
        shape: ``(X, Y)`` of the slice.
        indicators: ``(X*Y, F)`` float32 columns: one-hot classes ``(C)``, inside, boundary, brain, edge,
            depth (inside the brain), left of the brain centroid, right of it.
        brain_pixels: number of brain pixels.
        x_rel, y_rel: ``(X*Y,)`` coordinates relative to the brain's bounding box, in [-1, 1] over the brain.
        edge_bins: ``(X*Y,)`` angular sector of each edge-band pixel, -1 elsewhere.
        si: the slice's position among the brain slices, in [-1, 1].
        areas: base rates ``(C - 1 + 3,)``: area of classes 1.., inside, edge, boundary as fractions of the brain.
    """

    shape: tuple[int, int]
    indicators: np.ndarray
    brain_pixels: int
    x_rel: np.ndarray
    y_rel: np.ndarray
    edge_bins: np.ndarray
    si: float
    areas: np.ndarray
    num_classes: int
    options: MetricOptions


def normalised_depth(brain: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Distance to the brain's surface divided by its maximum on the slice: 0 at the edge, 1 deepest, 0 outside.

    A pixel on the brain's outermost row is one pixel from the background, so the surface itself has depth
    ``1 / max``; the distance is shifted by one pixel so that the edge reads 0.
    """
    if not brain.any():
        return np.zeros(brain.shape, dtype=np.float32)
    distance = ndimage.distance_transform_edt(brain, sampling=spacing)
    distance = np.where(brain, np.maximum(distance - min(spacing), 0.0), 0.0)
    top = distance.max()
    return (distance / top if top > 0 else distance).astype(np.float32)


def label_boundary(label: np.ndarray, half_width_px: tuple[int, int]) -> np.ndarray:
    """Pixels within ``half_width_px`` of a change of label (both sides of every region's border)."""
    size = (2 * half_width_px[0] + 1, 2 * half_width_px[1] + 1)
    return ndimage.maximum_filter(label, size=size) != ndimage.minimum_filter(label, size=size)


def slice_context(
    label: np.ndarray,
    brain: np.ndarray,
    num_classes: int,
    spacing: tuple[float, float] = (1.0, 1.0),
    si: float = 0.0,
    options: MetricOptions | None = None,
) -> SliceContext:
    """Prepare the indicator columns of one axial slice.

    Args:
        label: ``(X, Y)`` integer classes in ``[0, num_classes)`` (RAS order).
        brain: ``(X, Y)`` boolean brain mask.
        spacing: in-plane voxel size in mm ``(x, y)``.
        si: the slice's position among the case's brain slices in [-1, 1] (inferior to superior).
    """
    options = options or MetricOptions()
    label = np.asarray(label, dtype=np.int64)
    brain = np.asarray(brain, dtype=bool)
    if label.shape != brain.shape:
        raise ValueError(f"label {label.shape} and brain mask {brain.shape} differ in shape")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}), got {label.min()}..{label.max()}")
    n = label.size
    depth = normalised_depth(brain, spacing)
    edge = brain & (depth <= options.edge_depth)
    half = tuple(max(1, int(round(options.boundary_mm / s))) for s in spacing)
    inside = label > 0
    # The border of the segmentation M (labelled vs unlabelled), as in the paper; not between subregions.
    boundary = label_boundary(inside.astype(np.uint8), half)
    xs, ys = np.meshgrid(np.arange(label.shape[0], dtype=np.float32), np.arange(label.shape[1], dtype=np.float32), indexing="ij")
    if brain.any():
        bx, by = np.nonzero(brain)
        x0, x1, y0, y1 = bx.min(), bx.max(), by.min(), by.max()
        cx, cy = bx.mean(), by.mean()
    else:
        x0, x1, y0, y1 = 0, label.shape[0] - 1, 0, label.shape[1] - 1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x_rel = 2 * (xs - x0) / max(x1 - x0, 1) - 1
    y_rel = 2 * (ys - y0) / max(y1 - y0, 1) - 1
    edge_bins = np.full(label.shape, -1, dtype=np.int64)
    ex, ey = np.nonzero(edge)
    angle = np.arctan2((ey - cy) * spacing[1], (ex - cx) * spacing[0])
    edge_bins[ex, ey] = np.minimum(((angle + np.pi) / (2 * np.pi) * options.angle_bins).astype(np.int64), options.angle_bins - 1)
    indicators = np.empty((n, num_classes + 7), dtype=np.float32)
    flat_label = label.reshape(-1)
    for c in range(num_classes):
        indicators[:, c] = flat_label == c
    for i, column in enumerate((inside, boundary, brain, edge, depth * brain, brain & (xs < cx), brain & (xs >= cx))):
        indicators[:, num_classes + i] = column.reshape(-1)
    brain_pixels = int(brain.sum())
    denominator = max(brain_pixels, 1)
    class_area = [(brain & (label == c)).sum() / denominator for c in range(1, num_classes)]
    areas = np.array(class_area + [(brain & inside).sum() / denominator, edge.sum() / denominator,
                                   (brain & boundary).sum() / denominator], dtype=np.float32)  # fmt: skip
    return SliceContext(
        shape=tuple(label.shape), indicators=indicators, brain_pixels=brain_pixels,
        x_rel=x_rel.reshape(n).astype(np.float32), y_rel=y_rel.reshape(n).astype(np.float32),
        edge_bins=edge_bins.reshape(n), si=float(si), areas=areas, num_classes=num_classes, options=options,
    )  # fmt: skip


def slice_metrics(heatmaps: np.ndarray, context: SliceContext) -> np.ndarray:
    """Metrics of ``L`` heatmaps on one slice, columns as :func:`metric_names`.

    Args:
        heatmaps: ``(L, X, Y)`` non-negative activations on the slice (or ``(X, Y)`` for one).

    Returns:
        ``(L, M)`` float32.
    """
    h = np.asarray(heatmaps, dtype=np.float32)
    if h.ndim == 2:
        h = h[None]
    if h.shape[1:] != context.shape:
        raise ValueError(f"heatmaps of shape {h.shape[1:]} on a slice of shape {context.shape}")
    h = np.maximum(h.reshape(len(h), -1), 0)
    c = context.num_classes
    total = h.sum(axis=1)
    mass = h @ context.indicators  # (L, C + 7)
    p_class = mass[:, :c] / (total[:, None] + EPS)
    m_inside, m_boundary, m_brain, m_edge, m_depth, m_left, m_right = (mass[:, c + i] for i in range(7))
    p_outside = 1.0 - m_brain / (total + EPS)
    p_healthy = (h @ (context.indicators[:, 0] * context.indicators[:, c + 2])) / (total + EPS)
    normalised = h / (total[:, None] + EPS)
    entropy = -(normalised * np.log(normalised + EPS)).sum(axis=1)
    entropy_norm = entropy / np.log(max(context.brain_pixels, 2))
    # Robust centroid: only the high-activation pixels, weighted by activation.
    high = h >= context.options.high * h.max(axis=1, keepdims=True)
    high &= h > 0
    weight = h * high
    weight_sum = weight.sum(axis=1) + EPS
    centroid_lr = weight @ context.x_rel / weight_sum
    centroid_ap = weight @ context.y_rel / weight_sum
    # Edge angular coverage: sectors holding a high-activation pixel of the edge band.
    on_edge = context.edge_bins >= 0
    sectors = np.zeros((len(h), context.options.angle_bins), dtype=bool)
    if on_edge.any():
        hits = high[:, on_edge].astype(np.float32) @ np.eye(context.options.angle_bins, dtype=np.float32)[context.edge_bins[on_edge]]
        sectors = hits > 0
    geometry = np.stack(
        [
            p_outside, p_healthy, m_inside / (total + EPS), m_boundary / (total + EPS), entropy, entropy_norm,
            np.exp(entropy) / max(context.brain_pixels, 1),
            m_edge / (m_brain + EPS), m_depth / (m_brain + EPS), centroid_lr, centroid_ap,
            np.full(len(h), context.si, dtype=np.float32), (m_right - m_left) / (m_brain + EPS), sectors.mean(axis=1),
            *(np.full(len(h), a, dtype=np.float32) for a in context.areas[c - 1 :]),
        ],
        axis=1,
    )  # fmt: skip
    class_areas = np.broadcast_to(context.areas[: c - 1], (len(h), c - 1))
    return np.concatenate([p_class, geometry, class_areas], axis=1).astype(np.float32)
