"""Top-K activating slices of every latent over a cohort, with their metrics, in one pass over the cases.

Each case is encoded once (:func:`~SegLensLogic.sae.codes.encode_volume`, sparse codes). Every (slice, latent)
pair is scored by the latent's peak (or summed) activation on the slice (feature grid), and a running top-K per latent is
kept across the cohort (:class:`TopK`). Metrics need heatmaps at image resolution and the case's label and brain
mask, so they are computed while the case is in memory, only for the pairs that enter some running top-K; the
top-K then carries each entry's metric vector (and its small feature-grid map, for galleries). No dense codes of
the cohort and no image-resolution heatmaps are ever held beyond one slice.

The same pass fills the split-half top-Ks used for stability (:mod:`.stability`): each case also goes to one
half of every random split of the cohort.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.cohort import Cohort
from ..errors import InputFileError, SegLensError
from ..segmentation.inference import prepare_for_model
from ..networks.segmenter import Segmenter
from ..sae.activations import brain_fraction_on_grid
from ..sae.codes import VolumeCodes, encode_volume, upsample_to_slices
from ..sae.model import BatchTopKSAE
from .labeller import LabellingRules, LatentLabel, label_latent
from .heatmap_metrics import MetricOptions, metric_names, slice_context, slice_metrics
from .stability import split_halves

Log = Callable[[str], None]


def _gather(old: np.ndarray, new: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows of ``concat([old, new], axis=1)`` picked by ``order (d_sae, K)`` along axis 1, trailing axes kept."""
    both = np.concatenate([old, new], axis=1)
    return np.take_along_axis(both, order.reshape(order.shape + (1,) * (both.ndim - 2)), axis=1)


@dataclass
class TopK:
    """The K highest-scoring (case, slice) examples of every latent seen so far.

    Attributes:
        scores: ``(d_sae, K)`` float64 score of the slice (peak or summed activation), descending; ``-inf`` empty.
        case: ``(d_sae, K)`` int32 index of the case in the cohort (-1 empty).
        slice: ``(d_sae, K)`` int32 axial slice index in RAS order.
        metrics: ``(d_sae, K, M)`` float32 slice metrics of each example (:func:`metric_names` columns).
        maps: ``(d_sae, K, h, w)`` float16 feature-grid activation of each example, or None.
    """

    scores: np.ndarray
    case: np.ndarray
    slice: np.ndarray
    metrics: np.ndarray
    maps: np.ndarray | None = None

    @classmethod
    def empty(cls, d_sae: int, k: int, num_metrics: int, grid: tuple[int, int] | None = None) -> "TopK":
        return cls(
            scores=np.full((d_sae, k), -np.inf),
            case=np.full((d_sae, k), -1, dtype=np.int32),
            slice=np.full((d_sae, k), -1, dtype=np.int32),
            metrics=np.zeros((d_sae, k, num_metrics), dtype=np.float32),
            maps=None if grid is None else np.zeros((d_sae, k, *grid), dtype=np.float16),
        )

    @property
    def k(self) -> int:
        return self.scores.shape[1]

    def threshold(self) -> np.ndarray:
        """``(d_sae,)`` the score a new example must beat to enter (``-inf`` while slots are free)."""
        return self.scores[:, -1]

    def merge(self, scores: np.ndarray, case: int, slices: np.ndarray, metrics: np.ndarray, maps: np.ndarray | None) -> None:
        """Merge one case's candidates ``(d_sae, K)`` (``-inf`` scores are ignored) and keep the top K."""
        all_scores = np.concatenate([self.scores, scores], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_scores, order, axis=1)
        self.case = _gather(self.case, np.where(np.isfinite(scores), case, -1).astype(np.int32), order)
        self.slice = _gather(self.slice, slices.astype(np.int32), order)
        self.metrics = _gather(self.metrics, metrics, order)
        if self.maps is not None and maps is not None:
            self.maps = _gather(self.maps, maps.astype(np.float16), order)

    def count(self, latent: int) -> int:
        return int(np.isfinite(self.scores[latent]).sum())

    def label(self, class_names, rules: LabellingRules | None = None, base_rates: dict[str, float] | None = None) -> list[LatentLabel]:
        """Label every latent from its examples (:func:`~.labeller.label_latent`)."""
        out = []
        for j in range(len(self.scores)):
            n = self.count(j)
            out.append(label_latent(self.metrics[j, :n], self.scores[j, :n], class_names, rules, base_rates))
        return out


@dataclass
class CohortInterpretation:
    """What one pass over a cohort gathered.

    Attributes:
        class_names: the label classes of the cohort (index 0 background).
        case_ids, case_folders: the cohort's cases, indexed by ``TopK.case``.
        full: top-K over the whole cohort (with feature-grid maps).
        halves: one ``(half A, half B)`` pair of top-Ks per random split.
        split_cases: per split, the case indices of half A and of half B.
        frequency: ``(d_sae,)`` fraction of eligible brain positions where the latent is active.
        mean_activation: ``(d_sae,)`` mean activation where active (0 if never).
        base_rates: class name -> fraction of the cohort's brain voxels (encoded slices) with that label.
        positions: eligible brain positions encoded.
        grid: feature grid ``(h, w)``.
    """

    class_names: tuple[str, ...]
    case_ids: list[str]
    case_folders: list[str]
    full: TopK
    halves: list[tuple[TopK, TopK]]
    split_cases: list[tuple[list[int], list[int]]]
    frequency: np.ndarray
    mean_activation: np.ndarray
    base_rates: dict[str, float]
    positions: int
    grid: tuple[int, int]
    options: MetricOptions = field(default_factory=MetricOptions)

    @property
    def d_sae(self) -> int:
        return len(self.frequency)

    @property
    def metric_names(self) -> list[str]:
        return metric_names(self.class_names)


def ras_spacing(prepared) -> np.ndarray:
    """Voxel size in mm along the RAS array axes of a prepared case."""
    zooms = np.sqrt((prepared.source.affine[:3, :3] ** 2).sum(axis=0))
    spacing = np.ones(3)
    for file_axis, (ras_axis, _) in enumerate(prepared.orientation.to_ras):
        spacing[int(ras_axis)] = zooms[file_axis]
    return spacing


def slice_heatmaps(codes: VolumeCodes, slice_number: int, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature-grid maps ``(L, h, w)`` and image-resolution heatmaps ``(L, X, Y)`` (RAS) of ``latents`` on the
    encoded slice ``slice_number``, upsampled as :meth:`VolumeCodes.heatmap` does."""
    dense = codes.dense(slice_number)[:, latents]  # (h*w, L)
    grid = dense.T.reshape(len(latents), *codes.grid)
    return grid, upsample(grid, codes.prepared.geometry)


def upsample(grid_maps: np.ndarray, geometry) -> np.ndarray:
    """Feature-grid maps ``(L, h, w)`` -> heatmaps ``(L, X, Y)`` on the slice: bilinear to the model size, then
    the slice geometry's inverse (resize, un-pad)."""
    return upsample_to_slices(torch.from_numpy(np.ascontiguousarray(grid_maps, dtype=np.float32)), geometry).numpy()


SCORES = ("sum", "max")


def _case_scores(codes: VolumeCodes, score: str = "sum") -> np.ndarray:
    """``(S, d_sae)`` score of every latent on every encoded slice: its summed (``sum``) or peak (``max``)
    activation over the slice's feature grid."""
    per_slice = codes.grid[0] * codes.grid[1]
    index = (codes.positions_of() // per_slice) * codes.d_sae + codes.latents
    size = len(codes.slices) * codes.d_sae
    if score == "sum":
        flat = np.bincount(index, weights=codes.values, minlength=size)
    elif score == "max":
        flat = np.zeros(size)
        np.maximum.at(flat, index, codes.values)
    else:
        raise ValueError(f"unknown slice score '{score}' (expected one of {', '.join(SCORES)})")
    return flat.reshape(len(codes.slices), codes.d_sae)


def interpret_cohort(
    model: Segmenter,
    sae: BatchTopKSAE,
    cohort: Cohort,
    top_k: int = 16,
    splits: int = 3,
    seed: int = 0,
    batch_size: int | None = None,
    options: MetricOptions | None = None,
    score: str = "max",
    log: Log | None = None,
) -> CohortInterpretation:
    """One pass over ``cohort``: top-K slices per latent with metrics, frequencies, base rates, split halves.

    Args:
        model, sae: the segmenter and the SAE trained on its hook point.
        cohort: labelled cases (tumour labels, or ``aseg`` structures for healthy cohorts).
        top_k: examples kept per latent.
        splits: random split-halves of the cohort for stability (0 for none; needs at least 2 cases).
        seed: for the splits.
        score: how a slice ranks for a latent: its peak activation on the slice (``max``, default: the slices
            where the latent is strongest, which surfaces localised features) or the ``sum`` over the slice
            (favours slices where it is broadly active).

    Raises:
        InputFileError: a case has no label map, or the cases' label schemes have different classes.
    """
    log = log or (lambda message: None)
    options = options or MetricOptions()
    if top_k < 1:
        raise SegLensError(f"top-K must be at least 1, got {top_k}")
    d_sae = sae.d_sae
    hook, grid = _check_interpretable(model, sae, cohort)
    split_cases = split_halves(len(cohort), splits, seed) if len(cohort) >= 2 else []
    class_names: tuple[str, ...] | None = None
    full = halves = None
    active_counts = np.zeros(d_sae)
    active_sums = np.zeros(d_sae)
    positions = 0
    class_voxels = None
    for index, case in enumerate(cohort):
        start = time.monotonic()
        prepared = prepare_for_model(model, case)
        scheme = prepared.source.label_scheme
        if prepared.label is None or scheme is None:
            raise InputFileError(str(case.folder or case.case_id), f"case '{case.case_id}' has no label map; interpretation needs labelled cases")
        if class_names is None:
            class_names = tuple(scheme.class_names)
            num_metrics = len(metric_names(class_names))
            full = TopK.empty(d_sae, top_k, num_metrics, grid)
            halves = [(TopK.empty(d_sae, top_k, num_metrics), TopK.empty(d_sae, top_k, num_metrics)) for _ in split_cases]
            class_voxels = np.zeros(len(class_names))
        elif tuple(scheme.class_names) != class_names:
            raise InputFileError(
                str(case.folder or case.case_id),
                f"case '{case.case_id}' has {scheme.name} labels ({', '.join(scheme.class_names)}) but the cohort's first "
                f"case has ({', '.join(class_names)}); interpret one kind of cohort at a time",
            )
        codes = encode_volume(model, sae, prepared, hook=hook, batch_size=batch_size)
        if len(codes.slices) == 0:
            log(f"  {index + 1}/{len(cohort)} {case.case_id}: no brain slices, skipped")
            continue
        eligible = brain_fraction_on_grid(prepared, codes.slices, codes.grid) >= sae.config.min_brain_fraction
        positions += int(eligible.sum())
        active_counts += np.bincount(codes.latents, minlength=d_sae)
        active_sums += np.bincount(codes.latents, weights=codes.values, minlength=d_sae)
        brain = prepared.brain_mask[:, :, codes.slices]
        class_voxels += np.bincount(prepared.label[:, :, codes.slices][brain].astype(np.int64), minlength=len(class_names))[: len(class_names)]

        cand, best = _top_candidates(codes, score, top_k)
        members = [full] + [pair[0] if index in a else pair[1] for pair, (a, _) in zip(halves, split_cases)]
        enter = [cand > acc.threshold()[:, None] for acc in members]
        needed = np.logical_or.reduce(enter)
        metrics, maps = _candidate_metrics(codes, best, needed, class_names, prepared, options, full.metrics.shape[2])
        for acc, mask in zip(members, enter):
            acc.merge(np.where(mask, cand, -np.inf), index, codes.slices[best], metrics, maps if acc is full else None)
        log(
            f"  {index + 1}/{len(cohort)} {case.case_id}: {len(codes.slices)} slices, {int(needed.sum())} new top examples "
            f"({time.monotonic() - start:.1f} s)"
        )
    assert class_names is not None and full is not None and halves is not None
    brain_total = max(class_voxels.sum(), 1)
    base_rates = {name: float(class_voxels[c] / brain_total) for c, name in enumerate(class_names)}
    return CohortInterpretation(
        class_names=class_names,
        case_ids=[case.case_id for case in cohort],
        case_folders=[str(case.folder or case.case_id) for case in cohort],
        full=full,
        halves=halves,
        split_cases=split_cases,
        frequency=active_counts / max(positions, 1),
        mean_activation=np.divide(active_sums, active_counts, out=np.zeros(d_sae), where=active_counts > 0),
        base_rates=base_rates,
        positions=positions,
        grid=grid,
        options=options,
    )


def _check_interpretable(model: Segmenter, sae: BatchTopKSAE, cohort: Cohort) -> tuple[str, tuple[int, ...]]:
    """The SAE's hook point on this model and its grid; refuses, before any work, an SAE of a hook the model
    lacks and an unlabelled case (which would stop the pass half-way)."""
    hook = sae.config.hook_point or model.config.hook_point
    hooks = model.hook_points()
    if hook not in hooks:
        raise SegLensError(f"the SAE was trained on hook '{hook}', which this model does not have ({', '.join(hooks)})")
    for case in cohort:
        if case.label is None:
            raise InputFileError(str(case.folder or case.case_id), f"case '{case.case_id}' has no label map; interpretation needs labelled cases")
    return hook, tuple(hooks[hook][1:])


def _top_candidates(codes, score: str, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """A case's best ``top_k`` slices per latent: ``(scores, slices)``, both ``(d_sae, top_k)`` (encoded-slice
    numbers; -inf scores where the latent is silent or the case has fewer slices)."""
    scores = _case_scores(codes, score)  # (S, d_sae)
    k = min(top_k, len(codes.slices))
    best = np.argsort(-scores, axis=0, kind="stable")[:k].T
    cand = np.take_along_axis(scores.T, best, axis=1)
    cand = np.where(cand > 0, cand, -np.inf)
    if k < top_k:
        pad = top_k - k
        cand = np.pad(cand, ((0, 0), (0, pad)), constant_values=-np.inf)
        best = np.pad(best, ((0, 0), (0, pad)))
    return cand, best


def _candidate_metrics(codes, best, needed, class_names, prepared, options, num_metrics):
    """Metrics ``(d_sae, K, M)`` and feature-grid maps ``(d_sae, K, h, w)`` of the needed candidates, slice by slice."""
    d_sae, k = best.shape
    metrics = np.zeros((d_sae, k, num_metrics), dtype=np.float32)
    maps = np.zeros((d_sae, k, *codes.grid), dtype=np.float32)
    latent_ids, slots = np.nonzero(needed)
    if len(latent_ids) == 0:
        return metrics, maps
    slice_numbers = best[latent_ids, slots]
    spacing = ras_spacing(prepared)
    brain_slices = prepared.brain_slices()
    low, high = brain_slices.min(), brain_slices.max()
    for s in np.unique(slice_numbers):
        pick = np.flatnonzero(slice_numbers == s)
        z = int(codes.slices[s])
        label, brain = prepared.label[:, :, z], prepared.brain_mask[:, :, z]
        si = float(2 * (z - low) / max(high - low, 1) - 1)
        for chunk in range(0, len(pick), 256):  # bounded memory at image resolution
            part = pick[chunk : chunk + 256]
            grid_maps, heatmaps = slice_heatmaps(codes, int(s), latent_ids[part])
            # Measure on the box holding the brain and every pixel these heatmaps reach: outside it both the
            # maps and the masks are zero, so the metrics are exact and the slice work shrinks to the head.
            box = _bounding_box(brain | (heatmaps > 0).any(axis=0))
            context = slice_context(label[box], brain[box], len(class_names), spacing=(spacing[0], spacing[1]), si=si, options=options)
            metrics[latent_ids[part], slots[part]] = slice_metrics(heatmaps[(slice(None), *box)], context)
            maps[latent_ids[part], slots[part]] = grid_maps
    return metrics, maps


def _bounding_box(mask: np.ndarray, pad: int = 1) -> tuple[slice, slice]:
    """Index box of the mask's true pixels, grown by ``pad`` (the whole array when the mask is empty)."""
    if not mask.any():
        return slice(None), slice(None)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(rows[0] - pad, 0), min(rows[-1] + pad + 1, mask.shape[0])),
        slice(max(cols[0] - pad, 0), min(cols[-1] + pad + 1, mask.shape[1])),
    )
