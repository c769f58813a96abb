"""Choosing latents to steer: by id, the most active in a region, by auto-interp category, by population status.

Plain functions over a case's :class:`~SegLensLogic.sae.codes.VolumeCodes`, a latent labels file
(``seglens interpret``) and alignment files (``seglens align``), so the Slicer module, the command line and the
experiments select latents the same way. Population status of a latent, given alignments of this SAE against
other cohorts' SAEs: ``universal`` when it is shared in every alignment (and there are at least two),
``shared`` when shared in some, ``specific`` when shared in none (section 5.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SegLensError
from ..sae.codes import VolumeCodes

if TYPE_CHECKING:
    from .encoded import EncodedCase

STATUSES = ("universal", "shared", "specific")


def as_latent_labels(labels):
    """Loaded latent labels from a path, or the object itself (None stays None)."""
    if labels is None or not isinstance(labels, str | Path):
        return labels
    from ..interpretation import load_latent_labels

    return load_latent_labels(labels)


def as_alignment(alignment):
    """A loaded alignment from a path, or the object itself."""
    if not isinstance(alignment, str | Path):
        return alignment
    from ..alignment import load_alignment

    return load_alignment(alignment)


def describe(labels, latent: int) -> str | None:
    return None if labels is None else labels.description(latent)


def category_of(labels, latent: int) -> str | None:
    return None if labels is None else labels.category(latent)


def replicates(labels, latent: int) -> bool | int | None:
    """Whether an SAE trained from another seed finds the latent again, when compared (a bundle's labels); with
    several such replicas, how many of them find it (see :func:`replicas_compared`)."""
    if labels is None:
        return None
    return labels.found_by(latent) if len(labels.replicas()) > 1 else labels.replicates(latent)


def replicas_compared(labels) -> int | None:
    """How many replicas the labels were compared with (None when none)."""
    return (len(labels.replicas()) or None) if labels is not None else None


def held_out_share(labels, latent: int) -> float | None:
    """Share of the latent's heatmap inside its labelled class on held-out cases, when measured (a bundle's labels)."""
    held_out = None if labels is None else labels.held_out(latent)
    return None if held_out is None else float(held_out["in_class"])


def _cohort_name(alignment, side: str) -> str:
    other = alignment.sae_b if side == "a" else alignment.sae_a
    return str(other.get("name") or other.get("sha256", "?")[:8])


def population_status(alignments: Sequence, sae_sha256: str | None, latent: int) -> tuple[str | None, list[str]]:
    """``(status, shared_with)`` of a latent from alignment files of this SAE (by its weights hash).

    Only alignments between populations count (:attr:`Alignment.compares_populations`): an alignment with
    another architecture trained on the same cohort would make every latent "specific" to nothing.
    """
    alignments = [alignment for alignment in alignments if alignment.compares_populations]
    if not alignments:
        return None, []
    shared_with = []
    for alignment in alignments:
        side = alignment.side_of(sae_sha256)
        if alignment.status(latent, side) == "shared":
            shared_with.append(_cohort_name(alignment, side))
    if not shared_with:
        return "specific", []
    if len(shared_with) == len(alignments) and len(alignments) >= 2:
        return "universal", shared_with
    return "shared", shared_with


def latents_with_status(alignments: Sequence, sae_sha256: str | None, d_sae: int, status: str) -> list[int]:
    """Every latent of the SAE whose population status is ``status`` (see :func:`population_status`)."""
    if status not in STATUSES:
        raise SegLensError(f"unknown population status '{status}'; use one of {', '.join(STATUSES)}")
    if not any(alignment.compares_populations for alignment in alignments):
        raise SegLensError("selecting latents by population status needs alignment files between populations (seglens align); "
                           + ("the loaded ones compare models of one cohort" if alignments else "none is loaded"))
    return [j for j in range(d_sae) if population_status(alignments, sae_sha256, j)[0] == status]


def latents_in_category(labels, category: str) -> list[int]:
    """Latents whose auto-interp category is ``category`` (a labels file from ``seglens interpret``)."""
    if labels is None:
        raise SegLensError("selecting latents by category needs a latent labels file (seglens interpret)")
    found = labels.latents_in_category(category)
    if not found:
        known = ", ".join(sorted(labels.categories())) or "none"
        raise SegLensError(f"no latent has category '{category}' (categories in the labels file: {known})")
    return list(found)


def top_latents(codes: VolumeCodes, k: int, region: np.ndarray | None = None, slice_range: tuple[int, int] | None = None, among: Sequence[int] | None = None) -> list[int]:
    """The ``k`` most active latents in a region (summed activation), optionally only ``among`` some latents."""
    totals = np.bincount(codes.latents, weights=codes.values * codes.region_weights(region, slice_range)[codes.positions_of()], minlength=codes.d_sae)
    if among is not None:
        keep = np.zeros(codes.d_sae, dtype=bool)
        keep[list(among)] = True
        totals = np.where(keep, totals, 0.0)
    order = np.argsort(-totals, kind="stable")[:k]
    return [int(j) for j in order if totals[j] > 0]


def select_latents(
    codes: VolumeCodes,
    labels=None,
    alignments: Sequence = (),
    sae_sha256: str | None = None,
    category: str | None = None,
    status: str | None = None,
    top: int | None = None,
    region: np.ndarray | None = None,
    slice_range: tuple[int, int] | None = None,
) -> list[int]:
    """Latents meeting every given criterion: ``category``, population ``status``, then the ``top`` most active
    in the region among them (all of them, most active first, when ``top`` is None)."""
    candidates: set[int] | None = None
    if category is not None:
        candidates = set(latents_in_category(labels, category))
    if status is not None:
        chosen = set(latents_with_status(alignments, sae_sha256, codes.d_sae, status))
        candidates = chosen if candidates is None else candidates & chosen
    ranked = top_latents(codes, codes.d_sae if top is None else top, region, slice_range, among=None if candidates is None else sorted(candidates))
    return ranked


def latent_sets(encoded: "EncodedCase", n: int, specific: Sequence[int] | None, seed: int) -> dict[str, tuple[int, ...]]:
    """The ``top``, ``specific`` and ``random`` sets of one case (the repair experiment's latent sets: :mod:`SegLensLogic.experiments.repair`); no label is read."""
    predicted = encoded.labels > 0
    region = predicted if predicted.any() else None
    top = tuple(j for j, _ in encoded.codes.top_latents(n, region=region))
    if specific:
        ranked = encoded.codes.top_latents(encoded.codes.d_sae, region=region)
        allowed = set(int(j) for j in specific)
        chosen = tuple(j for j, _ in ranked if j in allowed)[:n]
    else:
        chosen = top
    firing = np.flatnonzero(np.bincount(encoded.codes.latents, minlength=encoded.codes.d_sae) > 0)
    rng = np.random.default_rng(seed)
    random = tuple(int(j) for j in rng.choice(firing, size=min(n, len(firing)), replace=False)) if len(firing) else ()
    return {"top": top, "specific": chosen or top, "random": random}
