"""Steering by population-specific, universally shared and random latents (paper section 5.4, figure 5).

Universally shared latents of an SAE are those shared in *every* alignment of it with another population's SAE
(``S_univ = ∩ S_m,n``); all others are population-specific. To compare sets fairly, the same number of latents
is steered from each: the ``n`` most used (mean activation) on the model's own cohort, and ``n`` random latents
that fire on it (seeded). Each set is scaled by every alpha on every cohort; the mean Dice per alpha is figure 5,
and oracle and calibrated choices of alpha per (set, cohort) are reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import SegLensError
from .calibration import CaseSweep, calibrated, oracle
from .runs import CaseRun, Experiment


def latent_sets_from_alignments(paths: Sequence, sae_sha256: str, d_sae: int) -> dict[str, list[int]]:
    """``{"universal": [...], "specific": [...]}`` of this SAE from its alignment files (one per other population).

    Raises:
        SegLensError: no alignment file, or this SAE is on neither side of one of them.
    """
    from ..alignment import load_alignment

    if not paths:
        raise SegLensError("population steering needs at least one --alignment file of this SAE with another population's SAE")
    universal = set(range(d_sae))
    for path in paths:
        alignment = load_alignment(path)
        side = alignment.side_of(sae_sha256)
        universal &= set(alignment.shared(side))
    return {"universal": sorted(universal), "specific": sorted(set(range(d_sae)) - universal)}


def choose_steered(sets: dict[str, list[int]], own: Sequence[CaseRun], n: int, seed: int = 0) -> dict[str, list[int]]:
    """The ``n`` most used latents of each set on the own cohort, plus ``random``: ``n`` random latents active on it."""
    usage = np.mean([run.usage() for run in own], axis=0)
    alive = np.flatnonzero(usage > 0)
    chosen = {}
    for name, latents in sets.items():
        pool = [j for j in latents if usage[j] > 0]
        chosen[name] = [int(j) for j in sorted(pool, key=lambda j: -usage[j])[:n]]
    rng = np.random.default_rng(seed)
    chosen["random"] = sorted(int(j) for j in rng.choice(alive, size=min(n, len(alive)), replace=False))
    return chosen


def set_sweeps(experiment: Experiment, runs: Sequence[CaseRun], latents: Sequence[int], alphas: Sequence[float]) -> list[CaseSweep]:
    """Scale ``latents`` by each alpha on each case (alpha 1 is the unedited prediction: no edit to run)."""
    sweeps = []
    for run in runs:
        scores = {}
        for alpha in alphas:
            if float(alpha) == 1.0 or not latents:
                scores[float(alpha)] = dict(run.base_scores)
            else:
                scores[float(alpha)] = run.score(experiment.steer(run, latents, "scale", alpha))
        sweeps.append(CaseSweep(run.case_id, dict(run.base_scores), scores))
    return sweeps


def population_report(
    experiment: Experiment, cohorts: dict[str, Sequence[CaseRun]], sets: dict[str, list[int]],
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 5.0), n_latents: int = 8, folds: int = 2, seed: int = 0,
):  # fmt: skip
    """Figure 5 and its table. ``cohorts``: name -> cases, the model's own cohort first."""
    from .tables import Report, plot_curves

    names = list(cohorts)
    own = names[0]
    steered = choose_steered(sets, cohorts[own], n_latents, seed)
    report = Report("population-steering", f"Steering population-specific, universal and random latents (own cohort '{own}')")
    curves: dict[str, dict] = {}
    rows, summary = [], []
    for set_name in ("specific", "universal", "random"):
        latents = steered.get(set_name, [])
        curves[f"{set_name} latents ({len(latents)})"] = {}
        for cohort in names:
            experiment.log(f"  {set_name} latents {latents} on '{cohort}'")
            sweeps = set_sweeps(experiment, cohorts[cohort], latents, alphas)
            means = []
            for alpha in sweeps[0].scores:
                score = float(np.mean([s.scores[alpha]["dice_mean"] for s in sweeps]))
                base = float(np.mean([s.base["dice_mean"] for s in sweeps]))
                means.append(score)
                rows.append({"set": set_name, "cohort": cohort, "alpha": alpha, "mean_dice": score, "delta": score - base})
            curves[f"{set_name} latents ({len(latents)})"][cohort] = (list(sweeps[0].scores), means)
            base = float(np.mean([s.base["dice_mean"] for s in sweeps]))
            row = {"set": set_name, "cohort": cohort, "latents": latents, "cases": len(sweeps), "base": base,
                   "max_abs_delta": float(max(abs(m - base) for m in means))}  # fmt: skip
            orc = oracle(sweeps, prefer=1.0)
            row["oracle (best alpha per case)"] = float(np.mean([r["score"] for r in orc]))
            if len(sweeps) >= 2:
                cal, _ = calibrated(sweeps, folds=folds, seed=seed, prefer=1.0)
                row["calibrated (alpha from other fold)"] = float(np.mean([r["score"] for r in cal]))
                row["calibrated alphas"] = " ".join(f"{r['case']}:{r['setting']:g}" for r in cal)
            summary.append(row)
    report.table("figure5_population_steering", "Figure 5 data: mean Dice per latent set, cohort and alpha", rows)
    report.table("population_summary", "Sensitivity per set and cohort (largest |change| over alphas), oracle and calibrated alphas", summary)
    report.figure("figure5_population_steering", lambda path, ow: plot_curves(
        curves, path, "alpha (scale of the steered latents)", "mean Dice", overwrite=ow,
        title=f"Steering latent sets of the '{own}' model, per cohort"))  # fmt: skip
    report.notes += [
        f"Universal latents: shared in every alignment given ({len(sets.get('universal', []))} latents); population-specific: all others "
        f"({len(sets.get('specific', []))}). The {n_latents} most used latents of each set on '{own}' are steered; random: {n_latents} "
        f"latents drawn (seed {seed}) among those active on '{own}'.",
        "Alpha 1 is the unedited model. Oracle = best alpha per case read from its ground truth; calibrated = alpha chosen on the other fold.",
    ]
    return report
