"""Scoring a diffing against a planted feature with an exact footprint (a ground truth chance cannot pass).

A synthetic population that differs from the reference by one planted feature (a cyst, a band artefact:
:data:`SegLensLogic.data.phantoms.FEATURES`) has a voxel mask of it per case. A latent of that population's SAE is a
**feature latent** when most of its activation mass falls on the footprint: over its ``top_slices`` axial slices of
the cohort with the most activation mass, its heatmap at image resolution
(:meth:`~SegLensLogic.sae.codes.VolumeCodes.heatmap`, bilinear from the feature grid) puts at least
``threshold`` (0.5) of its mass inside the footprint. Then, for the latents a diffing calls *specific* to the
population (``specific_b`` of its alignment file against the reference):

- **precision**: the share of specific live latents that are feature latents;
- **recall**: the share of feature latents that came out specific;
- **chance precision**: what specific latents drawn at random among the live ones would score (the share of live
  latents that are feature latents; its 95th percentile for the same count beside it). The footprint covers a
  small part of the images, so few latents are feature latents and chance stays low by construction;
- the **converse**: the share of *shared* live latents that are feature latents (it should be near 0).

Every case is encoded once (:func:`~SegLensLogic.steering.encoded.encode_case`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import SegLensError

DEFAULT_THRESHOLD = 0.5
DEFAULT_TOP_SLICES = 10


@dataclass
class FootprintFractions:
    """Where each latent of an SAE fires relative to a footprint, over a cohort.

    Attributes:
        fraction: ``{latent: share of its activation mass on its top slices that lies on the footprint}`` for every
            latent that fired (live latents); dead latents are absent.
        mass: ``{latent: its activation mass over the cohort}`` (same keys).
        top_slices: slices per latent the fraction is measured on.
        cases: case ids scored; ``cases_with_footprint``: those with a non-empty footprint.
    """

    fraction: dict[int, float]
    mass: dict[int, float]
    top_slices: int
    cases: list[str] = field(default_factory=list)
    cases_with_footprint: list[str] = field(default_factory=list)

    @property
    def live(self) -> list[int]:
        return sorted(self.fraction)

    def feature_latents(self, threshold: float = DEFAULT_THRESHOLD) -> list[int]:
        """Live latents with at least ``threshold`` of their top-slice activation mass on the footprint."""
        return sorted(j for j, f in self.fraction.items() if f >= threshold)


def _case_id(case) -> str:
    return getattr(case, "case_id", None) or str(case)


def _footprint_of(footprints, case) -> np.ndarray | None:
    if footprints is None:
        from ..data.phantoms import read_feature_mask

        return read_feature_mask(case)
    if callable(footprints):
        return footprints(case)
    return footprints.get(_case_id(case))


def latent_footprint_fractions(
    model,
    sae,
    cohort: Iterable,
    footprints: Mapping[str, np.ndarray] | Callable | None = None,
    latents: Sequence[int] | None = None,
    top_slices: int = DEFAULT_TOP_SLICES,
    brain_only: bool = True,
    log: Callable[[str], None] | None = None,
) -> FootprintFractions:
    """The share of each latent's activation mass, on its top slices at image resolution, that lies on a footprint.

    Args:
        model, sae: the segmenter and its SAE.
        cohort: cases (folders or :class:`~SegLensLogic.data.Case`); each is encoded once.
        footprints: ``{case_id: boolean mask on the case's voxel grid (file order)}``, a function of the case, or
            None to read each phantom case's ``-feature`` file (:func:`~SegLensLogic.data.phantoms.read_feature_mask`).
            A case without a footprint counts as one where the feature is absent (all its mass is off it).
        latents: the latents to score (default all); those that never fire are left out (dead).
        top_slices: how many of a latent's slices (over the whole cohort, by activation mass) are measured.
        brain_only: measure the heatmap's mass inside the brain only (the encoded positions are brain; bilinear
            upsampling spreads their values a few pixels into the background, which holds no image content).

    Raises:
        SegLensError: no case has a footprint; a footprint is not on its case's grid; ``top_slices`` < 1.
    """
    from ..steering.encoded import encode_case

    if top_slices < 1:
        raise SegLensError(f"top_slices must be at least 1, got {top_slices}")
    wanted = None if latents is None else np.unique(np.asarray(list(latents), dtype=np.int64))
    if wanted is not None and len(wanted) and (wanted.min() < 0 or wanted.max() >= sae.d_sae):
        raise SegLensError(f"latent ids must lie in [0, {sae.d_sae}), got {int(wanted.min())}..{int(wanted.max())}")
    encoded, masks, case_ids, with_footprint = [], [], [], []
    # Per latent: (mass, case number, encoded slice number) of every slice where it fired.
    slices_of: dict[int, list[tuple[float, int, int]]] = {}
    for number, case in enumerate(cohort):
        mask = _footprint_of(footprints, case)
        item = encode_case(model, sae, case)
        codes = item.codes
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            grid = item.labels.shape
            if mask.shape != grid:
                raise SegLensError(f"the footprint of case {_case_id(case)} has shape {mask.shape}, its voxel grid {grid}")
            if mask.any():
                with_footprint.append(item.case_id)
        encoded.append(codes)  # only the codes are kept: the cached activations are let go
        masks.append(mask)
        case_ids.append(item.case_id)
        if codes.num_positions == 0 or len(codes.latents) == 0:
            continue
        per_slice = codes.grid[0] * codes.grid[1]
        slice_of_pair = codes.positions_of() // per_slice
        sums = np.zeros((codes.d_sae, len(codes.slices)), dtype=np.float64)
        np.add.at(sums, (codes.latents.astype(np.int64), slice_of_pair), codes.values.astype(np.float64))
        active = np.flatnonzero(sums.sum(axis=1) > 0)
        if wanted is not None:
            active = np.intersect1d(active, wanted)
        for j in active:
            row = sums[j]
            for s in np.flatnonzero(row > 0):
                slices_of.setdefault(int(j), []).append((float(row[s]), number, int(s)))
        if log:
            log(f"  {item.case_id}: {codes.num_positions} positions encoded")
    if not with_footprint:
        raise SegLensError("no case of the cohort has a (non-empty) footprint to score latents against")

    fraction, mass = {}, {}
    for j, entries in slices_of.items():
        entries.sort(key=lambda e: -e[0])
        chosen = entries[:top_slices]
        by_case: dict[int, list[int]] = {}
        for _m, number, s in chosen:
            by_case.setdefault(number, []).append(s)
        on, total = 0.0, 0.0
        for number, slice_numbers in by_case.items():
            codes, mask = encoded[number], masks[number]
            heat = codes.heatmap(j)
            selected = np.zeros(codes.prepared.brain_mask.shape, dtype=bool)
            selected[:, :, codes.slices[slice_numbers]] = True
            if brain_only:  # bilinear upsampling spreads brain positions' values into the background: not image content
                selected &= codes.prepared.brain_mask
            selected = codes.prepared.to_input_grid(selected)
            weights = np.clip(heat, 0, None) * selected
            total += float(weights.sum())
            if mask is not None:
                on += float(weights[mask].sum())
        mass[j] = float(sum(e[0] for e in entries))
        fraction[j] = on / total if total > 0 else 0.0
    return FootprintFractions(fraction, mass, top_slices, case_ids, with_footprint)


def chance_precision(n_live: int, n_feature: int, n_drawn: int, quantile: float = 0.95) -> tuple[float | None, float | None]:
    """Precision of ``n_drawn`` latents drawn at random without replacement from ``n_live``, ``n_feature`` of which
    are feature latents: ``(expected, the quantile)`` (None when nothing is drawn or nothing is live)."""
    if n_live <= 0 or n_drawn <= 0:
        return None, None
    from scipy.stats import hypergeom

    n_drawn = min(n_drawn, n_live)
    expected = n_feature / n_live
    upper = float(hypergeom.ppf(quantile, n_live, n_feature, n_drawn)) / n_drawn
    return float(expected), upper


def score_against_footprint(
    fractions: FootprintFractions,
    specific: Iterable[int],
    shared: Iterable[int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict:
    """Precision, recall, chance and the converse of a diffing, from latents' footprint fractions.

    Args:
        fractions: from :func:`latent_footprint_fractions` on the population's SAE and cohort.
        specific: latents the diffing calls specific to the population (``specific_b``); dead ones are ignored.
        shared: latents it calls shared (default: every live latent not in ``specific``).

    Returns:
        ``{"n_live", "n_feature", "feature_latents", "n_specific", "n_hits", "hits", "precision", "recall",
        "chance_precision", "chance_precision_95", "n_shared", "shared_on_feature", "shared_on_feature_fraction",
        "threshold", "top_slices"}`` (None where a denominator is 0).
    """
    if not 0 < threshold <= 1:
        raise SegLensError(f"the footprint threshold must lie in (0, 1], got {threshold}")
    live = set(fractions.live)
    feature = set(fractions.feature_latents(threshold))
    specific_live = {int(j) for j in specific} & live
    shared_live = (live - specific_live) if shared is None else ({int(j) for j in shared} & live)
    hits = specific_live & feature
    expected, upper = chance_precision(len(live), len(feature), len(specific_live))
    shared_hits = shared_live & feature
    return {
        "n_live": len(live),
        "n_feature": len(feature),
        "feature_latents": sorted(feature),
        "n_specific": len(specific_live),
        "n_hits": len(hits),
        "hits": sorted(hits),
        "precision": len(hits) / len(specific_live) if specific_live else None,
        "recall": len(hits) / len(feature) if feature else None,
        "chance_precision": expected,
        "chance_precision_95": upper,
        "n_shared": len(shared_live),
        "shared_on_feature": len(shared_hits),
        "shared_on_feature_fraction": len(shared_hits) / len(shared_live) if shared_live else None,
        "threshold": threshold,
        "top_slices": fractions.top_slices,
    }


def footprint_scores(
    model,
    sae,
    cohort: Iterable,
    footprints: Mapping[str, np.ndarray] | Callable | None,
    specific: Iterable[int],
    shared: Iterable[int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    top_slices: int = DEFAULT_TOP_SLICES,
) -> dict:
    """Score the latents a diffing found specific to a population against its planted feature's footprint.

    ``model`` and ``sae`` are the population's; ``cohort`` its cases; ``footprints`` as in
    :func:`latent_footprint_fractions` (None: the phantoms' ``-feature`` files); ``specific`` (and ``shared``) the
    diffing's latent ids. Returns :func:`score_against_footprint`'s dict.
    """
    fractions = latent_footprint_fractions(model, sae, cohort, footprints, top_slices=top_slices)
    return score_against_footprint(fractions, specific, shared, threshold)
