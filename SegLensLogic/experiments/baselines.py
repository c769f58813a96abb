"""Output-level baselines the paper compares latent steering with (tables 3-5): connected-component filtering
(CCF) and entropy-based uncertainty filtering (UF) of a predicted label map.

Both only ever *remove* predicted structure (turn voxels into a lower class of the tumour hierarchy or into
background); neither can restore missing tumour, which is why they help little on false-negative failures.

Tumour regions are nested (BraTS 2023 classes): whole tumour WT = {1, 2, 3} ⊃ tumour core TC = {1, 3} ⊃
enhancing tumour ET = {3}. A component removed from a region falls back to the enclosing region's outer class:
WT -> background (0), TC -> edema (2), ET -> necrotic core (1), the usual BraTS post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# Region name -> (classes it covers, label a removed component takes), processed outermost first.
TUMOUR_REGION_FALLBACK: dict[str, tuple[tuple[int, ...], int]] = {
    "WT": ((1, 2, 3), 0),
    "TC": ((1, 3), 2),
    "ET": ((3,), 1),
}
# 26-connectivity: diagonal neighbours belong to the same component.
_STRUCTURE = ndimage.generate_binary_structure(3, 3)


def _component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(components, sizes)``: ``components`` labels each connected component 1..n (0 outside), ``sizes[i]`` is
    the voxel count of component ``i`` (``sizes[0] = 0``)."""
    components, n = ndimage.label(mask, structure=_STRUCTURE)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0
    return components, sizes


def connected_component_filter(
    labels: np.ndarray,
    mode: str = "largest",
    min_size: int = 50,
    regions: tuple[str, ...] = ("WT", "TC", "ET"),
    class_names: list[str] | tuple[str, ...] | None = None,
) -> np.ndarray:
    """Connected-component filtering of a label map, per tumour region.

    Args:
        labels: integer label map ``(I, J, K)`` (SegLens classes).
        mode: ``"largest"`` keeps only the largest component of each region; ``"min_size"`` drops the
            components smaller than ``min_size`` voxels.
        min_size: voxel count below which a component is dropped (``mode="min_size"``).
        regions: tumour regions to filter, among ``WT``, ``TC``, ``ET`` (outermost first is applied regardless
            of the order given).
        class_names: the model's classes; with a non-tumour scheme (not 4 classes) every foreground class is
            filtered on its own and removed components become background.

    Returns:
        A new ``uint8`` label map of the same shape; voxels of removed components take the fallback class.
    """
    if mode not in ("largest", "min_size"):
        raise ValueError(f"unknown connected-component mode '{mode}' (expected 'largest' or 'min_size')")
    out = np.array(labels, dtype=np.uint8, copy=True)
    if class_names is not None and len(class_names) != 4:
        plan = [((c,), 0) for c in range(1, len(class_names))]
    else:
        unknown = set(regions) - set(TUMOUR_REGION_FALLBACK)
        if unknown:
            raise ValueError(f"unknown tumour region(s) {sorted(unknown)} (expected WT, TC, ET)")
        plan = [TUMOUR_REGION_FALLBACK[name] for name in TUMOUR_REGION_FALLBACK if name in regions]
    for classes, fallback in plan:
        mask = np.isin(out, classes)
        if not mask.any():
            continue
        components, sizes = _component_sizes(mask)
        if mode == "largest":
            keep = np.zeros_like(sizes, dtype=bool)
            keep[int(np.argmax(sizes))] = True
        else:
            keep = sizes >= min_size
        keep[0] = True  # outside the region: untouched
        out[~keep[components]] = fallback
    return out


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy of the class distribution per voxel, divided by ``log K`` so it lies in [0, 1].

    Args:
        probabilities: softmax ``(K, I, J, K')`` (classes first, as ``predict_volume`` returns them).

    Returns:
        ``float32`` ``(I, J, K')``; 0 = certain, 1 = uniform over the ``K`` classes.
    """
    p = np.clip(probabilities.astype(np.float32), 1e-7, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0)
    return (entropy / np.log(p.shape[0])).astype(np.float32)


def uncertainty_filter(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Entropy-based uncertainty filtering: foreground voxels whose normalised entropy exceeds ``threshold``
    become background (BraTS uncertainty challenge style: uncertain predictions are withheld).

    Args:
        labels: predicted label map ``(I, J, K)``.
        probabilities: the softmax it came from, ``(C, I, J, K)``
            (``predict_volume(..., return_probabilities=True).probabilities``).
        threshold: normalised entropy in [0, 1] above which a voxel is dropped.

    Returns:
        A new ``uint8`` label map.
    """
    if probabilities.shape[1:] != labels.shape:
        raise ValueError(f"probabilities {probabilities.shape} do not match labels {labels.shape} (expected (C, *labels.shape))")
    out = np.array(labels, dtype=np.uint8, copy=True)
    out[(normalised_entropy(probabilities) > threshold) & (out > 0)] = 0
    return out


# Parameter grids the experiments sweep; each baseline's parameter is calibrated like a steering alpha, so the
# baselines are not handicapped by a fixed guess. ("none" leaves the prediction as it is.)
CCF_SETTINGS: tuple[tuple[str, int], ...] = (("none", 0), ("largest", 0), ("min_size", 20), ("min_size", 200), ("min_size", 2000))
UF_THRESHOLDS: tuple[float, ...] = (1.0, 0.99, 0.98, 0.95, 0.9, 0.8, 0.5)


def apply_ccf(labels: np.ndarray, setting: tuple[str, int], class_names=None) -> np.ndarray:
    """:func:`connected_component_filter` for one grid setting ``(mode, min_size)``; ``("none", 0)`` is a copy."""
    mode, size = setting
    if mode == "none":
        return np.array(labels, dtype=np.uint8, copy=True)
    return connected_component_filter(labels, mode=mode, min_size=size, class_names=class_names)


def baseline_sweeps(runs, ccf_settings=CCF_SETTINGS, uf_thresholds=UF_THRESHOLDS, groups: dict | None = None) -> dict:
    """Scores of every CCF setting and UF threshold on every case: ``{"CCF": [CaseSweep], "UF": [CaseSweep]}``.

    Args:
        runs: :class:`~SegLensLogic.experiments.runs.CaseRun` objects.
        groups: case id -> group (error mode) for calibration per group; default ``all``.
    """
    from .calibration import CaseSweep

    groups = groups or {}
    out = {"CCF": [], "UF": []}
    for run in runs:
        group = groups.get(run.case_id, "all")
        ccf = {s: run.score(apply_ccf(run.labels, s, run.class_names)) for s in ccf_settings}
        uf = {float(t): run.score(uncertainty_filter(run.labels, run.probabilities, t)) for t in uf_thresholds}
        out["CCF"].append(CaseSweep(run.case_id, dict(run.base_scores), ccf, group))
        out["UF"].append(CaseSweep(run.case_id, dict(run.base_scores), uf, group))
    return out


# -- output-level fixes from hints (the hint benchmark's baselines) -------------------------------------------
def paint_spheres(labels: np.ndarray, clicks, radius_mm: float, spacing, brain: np.ndarray | None = None) -> np.ndarray:
    """Paint a ball of ``radius_mm`` at each click with what it says: its class for ``+c`` (tumour class 1 for a
    ``+`` without class), background for ``-``; later clicks paint over earlier ones, the brain bounds the paint.

    Args:
        labels: ``(X, Y, Z)`` label map; clicks: objects with ``voxel`` (in ``labels``' order), ``sign``, ``cls``;
        spacing: voxel sizes (mm) along the three axes.

    Returns:
        A new ``uint8`` label map.
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    spacing = np.asarray(spacing, dtype=np.float64)
    reach = np.ceil(radius_mm / spacing).astype(int)
    for click in clicks:
        lo = [max(0, v - r) for v, r in zip(click.voxel, reach)]
        hi = [min(n, v + r + 1) for v, r, n in zip(click.voxel, reach, out.shape)]
        grids = np.meshgrid(*[(np.arange(a, b) - v) * s for a, b, v, s in zip(lo, hi, click.voxel, spacing)], indexing="ij")
        ball = sum(g**2 for g in grids) <= radius_mm**2
        if brain is not None:
            ball &= brain[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        value = 0 if click.sign == "-" else (click.cls or 1)
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][ball] = value
    return out


def logit_bias_fix(
    probabilities: np.ndarray,
    labels: np.ndarray,
    hint_masks: Sequence[np.ndarray],
    hint_kinds: Sequence[tuple[str, int | None]],
    region: np.ndarray,
    steps: int = 60,
    learning_rate: float = 0.5,
    l2: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """A per-class bias added to the model's log-probabilities inside ``region``, fitted so that each hint's disk
    says what the hint says (the output-level counterpart of a hint-guided latent edit: the threshold moved,
    nothing else).

    Args:
        probabilities: the unedited softmax ``(X, Y, Z, K)``.
        labels: the unedited labels ``(X, Y, Z)`` (kept outside ``region``).
        hint_masks: per hint, a boolean ``(X, Y, Z)`` disk; hint_kinds: per hint, ``(sign, class or None)``.
        region: boolean ``(X, Y, Z)``: where the bias applies.

    Returns:
        ``(labels, bias)``: the new ``uint8`` label map and the fitted bias ``(K,)``.
    """
    import torch

    log_p = torch.log(torch.from_numpy(np.clip(probabilities.astype(np.float32), 1e-6, 1.0)))
    samples = [(log_p[torch.from_numpy(mask)], kind) for mask, kind in zip(hint_masks, hint_kinds)]
    bias = torch.zeros(log_p.shape[-1], requires_grad=True)
    optimiser = torch.optim.Adam([bias], lr=learning_rate)
    for _ in range(steps):
        optimiser.zero_grad()
        losses = []
        for values, (sign, cls) in samples:
            lp = torch.log_softmax(values + bias, dim=1)
            if sign == "+":
                wanted = lp[:, cls] if cls is not None else torch.logsumexp(lp[:, 1:], dim=1)
            elif cls is None:
                wanted = lp[:, 0]
            else:
                wanted = torch.logsumexp(lp[:, [c for c in range(lp.shape[1]) if c != cls]], dim=1)
            losses.append(-wanted.mean())
        loss = torch.stack(losses).mean() + l2 * bias.pow(2).sum()
        loss.backward()
        optimiser.step()
    fitted = bias.detach()
    out = np.array(labels, dtype=np.uint8, copy=True)
    inside = torch.from_numpy(region)
    out[region] = torch.argmax(log_p[inside] + fitted, dim=1).numpy().astype(np.uint8)
    return out, fitted.numpy()
