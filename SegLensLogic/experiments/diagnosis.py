"""Instance-level failure diagnosis (paper section 6.1): rank a cohort's cases by Dice and, for the worst ones,
list their most active SAE latents and how far each latent's usage is from its typical usage on a reference
cohort (a z-score), with the latent's automatic label when a labels file is given.

Usage of latent ``j`` in a case = its mean activation over the case's encoded (brain) positions. Against the
reference cases ``r`` (the case itself left out when it belongs to them):
``z_j = (u_j - mean_r u_j) / sqrt(std_r(u_j)^2 + (0.1 mean_r u_j)^2 + 1e-12)``. The floor (10 % of the mean)
keeps a latent whose usage barely varies over a handful of reference cases from getting an infinite z-score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .runs import CaseRun

RELATIVE_STD_FLOOR = 0.1


def rank_by_dice(runs: Sequence[CaseRun], metric: str = "dice_mean") -> list[CaseRun]:
    """Cases from worst to best ``metric`` of the unedited model (ties keep cohort order)."""
    return sorted(runs, key=lambda run: run.base_scores[metric])


def usage_zscores(run: CaseRun, reference: Sequence[CaseRun]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(z, reference_mean, reference_std)`` per latent, ``(d_sae,)`` each; ``run`` is left out of the reference."""
    others = [r for r in reference if r.case_id != run.case_id]
    if not others:
        return np.zeros(run.codes.d_sae), np.zeros(run.codes.d_sae), np.zeros(run.codes.d_sae)
    usage = np.stack([r.usage() for r in others])
    mean = usage.mean(axis=0)
    std = usage.std(axis=0, ddof=1) if len(others) > 1 else np.zeros_like(mean)
    scale = np.sqrt(std**2 + (RELATIVE_STD_FLOOR * mean) ** 2 + 1e-12)
    return (run.usage() - mean) / scale, mean, std


def diagnose(
    runs: Sequence[CaseRun],
    reference: Sequence[CaseRun] | None = None,
    worst: int = 5,
    top: int = 5,
    labels=None,
    metric: str = "dice_mean",
) -> list[dict]:
    """Failure diagnosis table: for each of the ``worst`` cases, its ``top`` most active latents.

    Args:
        runs: the cohort's cases (:class:`CaseRun`).
        reference: cases defining typical usage (default: ``runs`` themselves, each case left out of its own).
        worst: number of lowest-``metric`` cases listed.
        top: latents per case, by summed activation over the volume.
        labels: a ``LatentLabels`` (``SegLensLogic.interpretation``) or None.

    Returns:
        One row per (case, latent): ``rank`` (1 = worst), ``case``, ``dice_mean`` and per-class Dice,
        ``latent``, ``usage`` (mean activation per position), ``frequency`` (fraction of positions active),
        ``reference_mean``, ``reference_std``, ``z``, ``direction`` (``amplified`` / ``suppressed`` /
        ``typical`` for |z| < 2), ``category`` and ``description`` (empty without labels).
    """
    reference = list(reference if reference is not None else runs)
    rows = []
    for rank, run in enumerate(rank_by_dice(runs, metric)[:worst], start=1):
        z, mean, std = usage_zscores(run, reference)
        usage, frequency = run.usage(), run.codes.latent_frequency()
        dice = {k: v for k, v in run.base_scores.items() if k.startswith("dice_")}
        for latent, _total in run.codes.top_latents(top):
            direction = "typical" if abs(z[latent]) < 2 else ("amplified" if z[latent] > 0 else "suppressed")
            rows.append({
                "rank": rank,
                "case": run.case_id,
                **dice,
                "latent": int(latent),
                "usage": float(usage[latent]),
                "frequency": float(frequency[latent]),
                "reference_mean": float(mean[latent]),
                "reference_std": float(std[latent]),
                "z": float(z[latent]),
                "direction": direction,
                "category": (labels.category(latent) or "") if labels is not None else "",
                "description": (labels.description(latent) or "") if labels is not None else "",
            })  # fmt: skip
    return rows


def ranking_rows(runs: Sequence[CaseRun], metric: str = "dice_mean") -> list[dict]:
    """Every case, worst first: ``rank``, ``case`` and its per-class scores."""
    return [{"rank": i, "case": r.case_id, **r.base_scores} for i, r in enumerate(rank_by_dice(runs, metric), start=1)]
