"""Oracle and calibrated choices of a steering setting, kept apart so that every table can show both.

A *setting* is anything a sweep varies: an alpha, or ``(intervention, alpha)``. For every case a sweep holds the
scores of every setting (:class:`CaseSweep`).

- **Oracle**: each case gets the setting that is best *for that case*, chosen by reading its own ground truth.
  This is an upper bound, not a method: it is labelled ``oracle`` everywhere.
- **Calibrated**: one setting (per group, e.g. per error mode) is chosen on a calibration split and applied
  unchanged to a separate test split. With ``folds`` > 1 the cases are cross-fitted: every fold is a test split
  once, its setting chosen on the other folds only. :func:`choose_setting` is given calibration sweeps and
  nothing else, and :func:`calibrated` reads a test case's scores at its chosen setting only, after the choice
  (``Testing/experiments/test_experiments.py`` checks both with sentinels).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import SegLensError


@dataclass
class CaseSweep:
    """Scores of one case under every setting of a sweep.

    Attributes:
        case_id: the case.
        base: scores of the unedited model (``dice_mean``, ``dice_ED``, ...).
        scores: setting -> scores with that edit.
        group: stratum the calibrated choice is made within (e.g. the error mode ``false positives``), or ``all``.
    """

    case_id: str
    base: Mapping[str, float]
    scores: Mapping[Hashable, Mapping[str, float]]
    group: str = "all"


@dataclass
class Choice:
    """A calibrated choice: the setting, what it was chosen on, and its mean score there."""

    setting: Hashable
    group: str
    calibration_cases: tuple[str, ...]
    calibration_score: float
    fallback: bool = False  # True when the group had no calibration case and the all-groups choice was used
    means: dict = field(default_factory=dict)  # setting -> mean calibration score


def split_folds(case_ids: Sequence[str], folds: int = 2, seed: int = 0) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Deterministic cross-fitting splits ``[(calibration_ids, test_ids), ...]``, one per fold.

    Each case is in exactly one test split; a fold's calibration split is every other case. ``folds`` is capped
    at the number of cases, and must leave at least one calibration case.
    """
    ids = list(case_ids)
    if len(ids) < 2:
        raise SegLensError(f"calibrated results need at least 2 cases (one to calibrate on, one to test on); got {len(ids)}")
    folds = max(2, min(folds, len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    assignment = {ids[i]: rank % folds for rank, i in enumerate(order)}
    splits = []
    for fold in range(folds):
        test = tuple(c for c in ids if assignment[c] == fold)
        calibration = tuple(c for c in ids if assignment[c] != fold)
        splits.append((calibration, test))
    return splits


def choose_setting(
    calibration: Sequence[CaseSweep], metric: str = "dice_mean", settings: Sequence[Hashable] | None = None,
    prefer: Hashable | None = None, group: str = "all",
) -> Choice:
    """The setting with the best mean ``metric`` over the calibration sweeps (ties: ``prefer``, then grid order).

    Only the calibration sweeps are passed in, so the choice cannot depend on any test case.
    """
    if not calibration:
        raise SegLensError("no calibration case to choose a setting on")
    settings = list(settings if settings is not None else calibration[0].scores)
    means = {s: float(np.mean([sweep.scores[s][metric] for sweep in calibration])) for s in settings}
    best = max(means.values())
    tied = [s for s in settings if means[s] >= best - 1e-12]
    setting = prefer if prefer in tied else tied[0]
    return Choice(setting, group, tuple(s.case_id for s in calibration), means[setting], means=means)


def oracle(sweeps: Sequence[CaseSweep], metric: str = "dice_mean", prefer: Hashable | None = None) -> list[dict]:
    """Per case, the setting that maximises its own ``metric`` (reads the case's ground truth: an oracle).

    Returns:
        One row per case: ``case``, ``group``, ``setting``, ``base``, ``score``, ``delta`` (of ``metric``) and
        ``scores`` (all metrics at the chosen setting).
    """
    rows = []
    for sweep in sweeps:
        values = {s: sc[metric] for s, sc in sweep.scores.items()}
        best = max(values.values())
        tied = [s for s in values if values[s] >= best - 1e-12]
        setting = prefer if prefer in tied else tied[0]
        rows.append(_row(sweep, setting, metric, method="oracle"))
    return rows


def calibrated(
    sweeps: Sequence[CaseSweep], metric: str = "dice_mean", folds: int = 2, seed: int = 0, by_group: bool = False,
    prefer: Hashable | None = None,
) -> tuple[list[dict], list[Choice]]:
    """Calibrated results by cross-fitting: each fold's cases get the setting chosen on the other folds.

    Args:
        sweeps: every case's sweep.
        metric: the score to maximise and report.
        folds: number of folds (2: calibrate on one half, test on the other, and the reverse).
        by_group: choose one setting per ``group`` (e.g. per error mode); a group without calibration cases
            falls back to the choice made on all calibration cases.
        prefer: the no-edit setting, preferred on ties.

    Returns:
        ``(rows, choices)``: one row per case as in :func:`oracle` plus ``fold``; the choices made per fold/group.
    """
    by_id = {s.case_id: s for s in sweeps}
    settings = list(sweeps[0].scores) if sweeps else []
    rows, choices = [], []
    for fold, (calibration_ids, test_ids) in enumerate(split_folds(list(by_id), folds, seed)):
        calibration = [by_id[c] for c in calibration_ids]
        overall = choose_setting(calibration, metric, settings, prefer)
        made = {"all": overall}
        if by_group:
            for group in sorted({by_id[c].group for c in test_ids}):
                members = [s for s in calibration if s.group == group]
                if members:
                    made[group] = choose_setting(members, metric, settings, prefer, group=group)
                else:
                    made[group] = Choice(overall.setting, group, overall.calibration_cases, overall.calibration_score, True, overall.means)
        for choice in made.values():
            choices.append(choice)
            choice.means["fold"] = fold
        for case_id in test_ids:
            sweep = by_id[case_id]
            choice = made[sweep.group] if by_group else overall
            row = _row(sweep, choice.setting, metric, method="calibrated")
            row["fold"] = fold
            rows.append(row)
    order = {s.case_id: i for i, s in enumerate(sweeps)}
    rows.sort(key=lambda r: order[r["case"]])
    return rows, choices


def _row(sweep: CaseSweep, setting: Hashable, metric: str, method: str) -> dict:
    scores = dict(sweep.scores[setting])
    return {
        "case": sweep.case_id,
        "group": sweep.group,
        "method": method,
        "setting": setting,
        "base": float(sweep.base[metric]),
        "score": float(scores[metric]),
        "delta": float(scores[metric] - sweep.base[metric]),
        "scores": scores,
        "base_scores": dict(sweep.base),
    }


def summarise(rows: Sequence[dict], margin: float = 0.01) -> dict[str, float]:
    """Mean base and steered score, mean delta, and the fraction of cases whose score rose by ``margin`` or more."""
    if not rows:
        return {"cases": 0, "base": float("nan"), "score": float("nan"), "delta": float("nan"), "recovered": float("nan")}
    base = np.array([r["base"] for r in rows])
    score = np.array([r["score"] for r in rows])
    return {
        "cases": len(rows),
        "base": float(base.mean()),
        "score": float(score.mean()),
        "delta": float((score - base).mean()),
        "recovered": float(np.mean(score - base >= margin)),
    }
