"""Failure recovery by latent steering (paper section 6): instance-level alpha sweeps over each failure case's
most active latents (figure 6, table 3) and class-specific steering of one class's latents (edema by default)
by amplification, suppression and zeroing, per error mode (figure 7, table 4).

Every sweep yields :class:`~SegLensLogic.experiments.calibration.CaseSweep` objects, from which both the oracle
(per-case best setting, ground truth read) and the calibrated (cross-fitted) results are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import SegLensError
from .calibration import CaseSweep, calibrated, oracle
from .runs import CaseRun, Experiment, error_counts

DEFAULT_ALPHAS = (0.25, 0.5, 1.0, 2.0, 5.0)
NO_EDIT = ("none", 1.0)
ERROR_MODES = ("false positives", "false negatives", "mixed")


def select_failures(runs: Sequence[CaseRun], worst: int | None = None, max_dice: float | None = None, metric: str = "dice_mean") -> list[CaseRun]:
    """Failure cases: those with ``metric`` below ``max_dice`` (if given), then the ``worst`` lowest (if given)."""
    chosen = sorted(runs, key=lambda r: r.base_scores[metric])
    if max_dice is not None:
        chosen = [r for r in chosen if r.base_scores[metric] < max_dice]
    if worst is not None:
        chosen = chosen[:worst]
    return chosen


def top_latents(run: CaseRun, k: int = 1) -> tuple[int, ...]:
    """The ``k`` latents with the largest summed activation over the case's volume."""
    return tuple(j for j, _ in run.codes.top_latents(k))


def recovery_sweep(
    experiment: Experiment, runs: Sequence[CaseRun], alphas: Sequence[float] = DEFAULT_ALPHAS, top: int = 1
) -> tuple[list[CaseSweep], dict[str, tuple[int, ...]]]:
    """Scale each case's ``top`` most active latents by every alpha (``z_i <- alpha z_i``, paper eq. in 6.1).

    Returns:
        ``(sweeps, latents)``: one :class:`CaseSweep` per case with settings = alphas, and the latents steered
        per case. Alpha 1 is computed like any other (it must reproduce the unedited scores).
    """
    sweeps, steered = [], {}
    for run in runs:
        latents = top_latents(run, top)
        steered[run.case_id] = latents
        scores = {}
        for alpha in alphas:
            scores[float(alpha)] = run.score(experiment.steer(run, latents, "scale", alpha)) if latents else dict(run.base_scores)
        sweeps.append(CaseSweep(run.case_id, dict(run.base_scores), scores))
        experiment.log(f"  {run.case_id}: latents {list(latents)}, Dice " + ", ".join(f"a={a:g} {s['dice_mean']:.3f}" for a, s in scores.items()))
    return sweeps, steered


def per_setting_rows(sweeps: Sequence[CaseSweep], metric: str = "dice_mean", margin: float = 0.01) -> list[dict]:
    """Figure 6's data: per setting, the mean score over cases, its change and the fraction of cases improved by
    at least ``margin`` (a fixed setting for every case, so no oracle is involved)."""
    rows = []
    for setting in sweeps[0].scores:
        score = np.array([s.scores[setting][metric] for s in sweeps])
        base = np.array([s.base[metric] for s in sweeps])
        rows.append({
            "setting": setting,
            "cases": len(sweeps),
            f"mean_{metric}": float(score.mean()),
            "delta": float((score - base).mean()),
            "recovered": float(np.mean(score - base >= margin)),
        })  # fmt: skip
    return rows


# -- class-specific steering ----------------------------------------------------------------------------------
def error_mode(run: CaseRun, cls: int = 2, ratio: float = 2.0) -> str:
    """Dominant error of class ``cls`` in the unedited prediction: ``false positives`` when FP voxels are at least
    ``ratio`` times the FN voxels, ``false negatives`` in the reverse case, else ``mixed``. Reads ground truth."""
    fp, fn = error_counts(run.labels, run.truth, cls)
    if fp >= ratio * max(fn, 1):
        return "false positives"
    if fn >= ratio * max(fp, 1):
        return "false negatives"
    return "mixed"


def class_latents_from_truth(reference: Sequence[CaseRun], cls: int, n: int = 4, enrichment: float = 2.0) -> list[int]:
    """Latents of class ``cls`` found without a labels file, from the ``reference`` cases' ground truth (never
    the evaluated ones): the share of each latent's activation mass that lies on class ``cls``, compared with the
    share of *all* latents' mass there. The ``n`` latents whose share is at least ``enrichment`` times that
    baseline, ranked by share times the square root of their mass (rare one-voxel latents do not win)."""
    inside = total = 0.0
    for run in reference:
        share, mass = run.class_fraction(cls)
        inside = inside + share * mass
        total = total + mass
    total = np.asarray(total, dtype=np.float64)
    share = np.divide(inside, total, out=np.zeros_like(total), where=total > 0)
    baseline = float(np.sum(inside) / max(np.sum(total), 1e-12))
    score = np.where(share >= enrichment * baseline, share * np.sqrt(total), 0.0)
    order = [int(j) for j in np.argsort(-score) if score[j] > 0]
    if not order:
        raise SegLensError(f"no latent has {enrichment:g}x the average share of activation on class {cls} in the reference cases")
    return order[:n]


def class_latents_from_labels(labels, category: str) -> list[int]:
    """Latents the labels file puts in ``category`` (e.g. ``edema``)."""
    latents = list(labels.latents_in_category(category))
    if not latents:
        raise SegLensError(f"the latent labels file has no latent in category '{category}'")
    return latents


def intervention_settings(amplify: Sequence[float] = (2.0, 5.0), suppress: Sequence[float] = (0.5, 0.25)) -> list[tuple[str, float]]:
    """Settings of the class-specific sweep: no edit, amplifications, suppressions and zeroing."""
    return [NO_EDIT] + [("amplification", float(a)) for a in amplify] + [("suppression", float(a)) for a in suppress] + [("zeroing", 0.0)]


def class_sweep(
    experiment: Experiment, runs: Sequence[CaseRun], latents: Sequence[int], cls: int = 2,
    settings: Sequence[tuple[str, float]] | None = None,
) -> list[CaseSweep]:
    """Steer the class latents of each case with every intervention; the group of a sweep is its error mode.

    The ``none`` setting is the unedited prediction's scores (no forward pass needed: nothing is edited).
    """
    settings = list(settings or intervention_settings())
    sweeps = []
    for run in runs:
        scores = {}
        for name, alpha in settings:
            if (name, alpha) == NO_EDIT:
                scores[(name, alpha)] = dict(run.base_scores)
                continue
            mode = "zero" if name == "zeroing" else "scale"
            scores[(name, alpha)] = run.score(experiment.steer(run, latents, mode, alpha))
        mode = error_mode(run, cls)
        sweeps.append(CaseSweep(run.case_id, dict(run.base_scores), scores, group=mode))
        experiment.log(f"  {run.case_id} ({mode}): " + ", ".join(f"{n} {a:g} {s['dice_ED' if 'dice_ED' in s else 'dice_mean']:.3f}" for (n, a), s in scores.items()))
    return sweeps


def mode_effect_rows(sweeps: Sequence[CaseSweep], metric: str) -> list[dict]:
    """Figure 7's data: per error mode and setting, the mean change of ``metric`` over the mode's cases."""
    rows = []
    for mode in ERROR_MODES:
        members = [s for s in sweeps if s.group == mode]
        if not members:
            continue
        for setting in members[0].scores:
            delta = [s.scores[setting][metric] - s.base[metric] for s in members]
            rows.append({"mode": mode, "setting": setting, "cases": len(members), "delta": float(np.mean(delta))})
    return rows


# -- the whole experiment -------------------------------------------------------------------------------------
CLASS_METRICS = ("dice_mean", "dice_NC", "dice_ED", "dice_ET")


def _method_rows(sections: dict[str, list[dict]], metrics: Sequence[str], margin: float, primary: str) -> list[dict]:
    from .tables import method_row

    return [method_row(name, rows, metrics, margin, primary) for name, rows in sections.items()]


def _base_rows(sweeps: Sequence[CaseSweep], metric: str) -> list[dict]:
    return [{"case": s.case_id, "group": s.group, "setting": "", "base": s.base[metric], "score": s.base[metric],
             "delta": 0.0, "scores": dict(s.base), "base_scores": dict(s.base)} for s in sweeps]  # fmt: skip


def compare_methods(steering: Sequence[CaseSweep], baselines: dict, metric: str, folds: int, margin: float,
                    steering_name: str = "latent steering", by_group: bool = False, prefer=None,
                    metrics: Sequence[str] = CLASS_METRICS, seed: int = 0) -> tuple[list[dict], list[dict], list]:  # fmt: skip
    """Method table (base, CCF, UF, steering; each oracle and calibrated) and the per-case rows behind it.

    Returns:
        ``(method_rows, case_rows, choices)``.
    """
    sections: dict[str, list[dict]] = {"base model": _base_rows(steering, metric)}
    choices = []
    per_case: dict[str, list[dict]] = {}
    for name, sweeps, neutral in (
        ("CCF", baselines["CCF"], ("none", 0)),
        ("UF", baselines["UF"], 1.0),
        (steering_name, steering, prefer),
    ):
        cal_rows, made = calibrated(sweeps, metric, folds, seed, by_group=by_group and name == steering_name, prefer=neutral)
        sections[f"{name} (calibrated{', per mode' if by_group and name == steering_name else ''})"] = cal_rows
        choices += [(name, c) for c in made]
        if by_group and name == steering_name:
            agnostic, made = calibrated(sweeps, metric, folds, seed, by_group=False, prefer=neutral)
            sections[f"{name} (calibrated, one setting for all modes)"] = agnostic
            choices += [(name + " (all modes)", c) for c in made]
        sections[f"{name} (oracle: best per case, reads its ground truth)"] = oracle(sweeps, metric, prefer=neutral)
        per_case[name] = sections[f"{name} (oracle: best per case, reads its ground truth)"]
        per_case[name + " calibrated"] = cal_rows
    table = _method_rows(sections, [metric] + [m for m in metrics if m != metric], margin, metric)
    cases = []
    for sweep in steering:
        row = {"case": sweep.case_id, "group": sweep.group, f"base_{metric}": sweep.base[metric]}
        for name, rows in per_case.items():
            hit = next(r for r in rows if r["case"] == sweep.case_id)
            row[f"{name} setting"] = hit["setting"]
            row[f"{name} {metric}"] = hit["score"]
        cases.append(row)
    return table, cases, choices


def choice_rows(choices) -> list[dict]:
    """The calibrated choices: method, fold, group, chosen setting, calibration cases and their mean score."""
    return [{"method": name, "fold": c.means.get("fold", ""), "group": c.group, "setting": c.setting,
             "calibration_score": c.calibration_score, "fallback_to_all_modes": c.fallback,
             "calibration_cases": " ".join(c.calibration_cases)} for name, c in choices]  # fmt: skip


def _instance_notes(runs, failures, top: int, margin: float, folds: int, population: str) -> list[str]:
    """The failure-recovery report's notes on its cohort, instance-level steering and calibration."""
    return [
        f"Cohort: {len(runs)} labelled cases{f' ({population})' if population else ''}; failure cases: the {len(failures)} lowest mean Dice.",
        f"Instance-level steering scales each failure case's {top} most active latent(s) (summed activation over the volume) by alpha.",
        f"Recovered = Dice rises by at least {margin}.",
        "Oracle rows choose the setting per case by reading that case's ground truth: an upper bound, not a method.",
        f"Calibrated rows: {folds}-fold cross-fitting; each fold gets the setting with the best mean score on the other folds' cases, "
        "chosen before any of its own scores are read. Baseline parameters (CCF mode/size, UF entropy threshold) are calibrated the same way.",
    ]


def failure_recovery_report(
    experiment: Experiment,
    runs: Sequence[CaseRun],
    reference: Sequence[CaseRun] | None = None,
    worst: int = 6,
    max_dice: float | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    top: int = 1,
    margin: float = 0.01,
    folds: int = 2,
    labels=None,
    class_name: str = "edema",
    class_latents: Sequence[int] | None = None,
    class_max_dice: float = 0.5,
    n_class_latents: int = 4,
    seed: int = 0,
    population: str = "",
):
    """Run the failure-recovery experiment (figure 6-7, tables 3-4) and return a :class:`~.tables.Report`.

    Args:
        experiment: model + SAE.
        runs: the evaluated cohort's cases.
        reference: cases whose ground truth may be used to find class latents when there is no labels file
            (e.g. the training cohort); default: the cohort's cases that are not class failures.
        worst / max_dice: failure cases for the instance-level sweep.
        alphas: the scale grid; ``top``: latents scaled per case.
        margin: a case is *recovered* when its Dice rises by at least this much.
        folds: cross-fitting folds for the calibrated results.
        labels: ``LatentLabels`` or None; class latents come from its ``class_name`` category when given.
        class_latents: explicit class latents (overrides both).
        class_max_dice: class failures are cases whose class Dice is below this (or the ``worst`` lowest if none).
    """
    from .diagnosis import ranking_rows
    from .tables import Report

    report = Report("failure-recovery", f"Failure recovery by latent steering{f' ({population})' if population else ''}")
    class_names = list(experiment.class_names)
    if class_name not in class_names:
        raise SegLensError(f"the model has no class '{class_name}' (classes: {', '.join(class_names)})")
    cls = class_names.index(class_name)
    from .runs import class_short_names

    class_metric = f"dice_{class_short_names(class_names)[cls]}"
    metrics = ["dice_mean"] + [f"dice_{s}" for s in class_short_names(class_names).values()]
    report.table("ranking", "Cases ranked by mean Dice (unedited model)", ranking_rows(runs), ["rank", "case"] + metrics)

    failures = _instance_level(report, experiment, runs, worst, max_dice, alphas, top, margin, folds, metrics, seed, population)
    class_failures = [r for r in runs if r.base_scores[class_metric] < class_max_dice]
    if len(class_failures) < 2:
        class_failures = sorted(runs, key=lambda r: r.base_scores[class_metric])[: max(worst, 2)]
    failure_ids = {r.case_id for r in class_failures}
    try:
        latents, source = _class_latents(runs, reference, failure_ids, cls, class_name, class_latents, labels, n_class_latents)
    except _NoClassLatents as error:
        # The instance-level results stand on their own: keep them, say why the class level is missing.
        experiment.log(f"Class-level steering skipped: {error}")
        report.notes += _instance_notes(runs, failures, top, margin, folds, population)
        report.notes.append(f"Class-level steering (figure 7, table 4) skipped: {error} (give --labels or --class-latents).")
        return report
    _class_level(report, experiment, class_failures, latents, cls, class_name, class_metric, folds, margin, metrics, seed)
    report.notes += _instance_notes(runs, failures, top, margin, folds, population) + [
        f"{class_name} failure cases: {class_name} Dice < {class_max_dice} (else the lowest). Class latents {latents}, chosen from {source}.",
        "Error modes read the ground truth (FP vs FN voxel counts, ratio 2): the per-mode calibrated row needs the mode of a test case, "
        "which is only known with its ground truth; the 'one setting for all modes' row needs none.",
    ]
    return report


class _NoClassLatents(SegLensError):
    """No case to find class latents on from the ground truth: the class level is skipped."""


def _instance_level(report, experiment: Experiment, runs, worst, max_dice, alphas, top, margin, folds, metrics, seed, population):
    """Figure 6 and table 3: scaling each failure case's top latents over the alpha grid, against the baselines,
    oracle and calibrated. Returns the failure cases."""
    from .baselines import baseline_sweeps
    from .tables import plot_recovery

    failures = select_failures(runs, worst, max_dice)
    if len(failures) < 2:
        raise SegLensError("fewer than 2 failure cases: calibrated results need one case to calibrate on and one to test")
    experiment.log(f"Instance-level sweep on {len(failures)} failure cases, alphas {list(alphas)}, top {top} latent(s)")
    sweeps, steered = recovery_sweep(experiment, failures, alphas, top)
    per_alpha = per_setting_rows(sweeps, "dice_mean", margin)
    report.table("recovery_per_alpha", "Figure 6 data: one alpha for every failure case (mean Dice, fraction recovered)", per_alpha)
    baselines = baseline_sweeps(failures)
    table3, cases3, choices3 = compare_methods(sweeps, baselines, "dice_mean", folds, margin, "latent steering", prefer=1.0, metrics=metrics, seed=seed)
    for row in cases3:
        row["steered latents"] = list(steered[row["case"]])
    report.table("table3_failure_recovery", f"Table 3: mean Dice on the {len(failures)} failure cases (oracle and calibrated side by side)", table3)
    report.table("table3_cases", "Table 3 per case: settings chosen (oracle per case; calibrated on the other fold)", cases3)
    report.table("table3_choices", "Calibrated choices (each fold's setting, chosen on the other fold's cases only)", choice_rows(choices3))
    oracle_mean = next(r["dice_mean"] for r in table3 if r["method"].startswith("latent steering (oracle"))
    calibrated_mean = next(r["dice_mean"] for r in table3 if r["method"] == "latent steering (calibrated)")
    report.figure("figure6_recovery", lambda path, ow: plot_recovery(per_alpha, path, overwrite=ow, oracle_score=oracle_mean,
                  calibrated_score=calibrated_mean, title=f"Failure recovery ({population or 'cohort'}, {len(failures)} cases)"))  # fmt: skip
    return failures


def _class_latents(runs, reference, failure_ids: set, cls: int, class_name: str, class_latents, labels, n_class_latents: int):
    """The class latents to steer and where they came from: given, from the labels file, or from their activation
    share on the class's ground truth in reference cases that are not class failures."""
    if class_latents is not None:
        return [int(j) for j in class_latents], "given on the command line"
    if labels is not None:
        return class_latents_from_labels(labels, class_name), "the latent labels file"
    pool = list(reference) if reference is not None else [r for r in runs if r.case_id not in failure_ids]
    pool = [r for r in pool if r.case_id not in failure_ids]
    if not pool:
        raise SegLensError("no reference case to find class latents on: give --reference, --labels or --class-latents")
    try:
        latents = class_latents_from_truth(pool, cls, n_class_latents)
    except SegLensError as error:
        raise _NoClassLatents(str(error)) from error
    return latents, f"their activation share on ground-truth {class_name} in {len(pool)} reference case(s) not evaluated here"


def _class_level(report, experiment: Experiment, class_failures, latents, cls: int, class_name: str, class_metric: str, folds, margin,
                 metrics, seed) -> None:  # fmt: skip
    """Figure 7 and table 4: each intervention on the class latents per error mode, against the baselines."""
    from .baselines import baseline_sweeps
    from .tables import plot_mode_effects

    experiment.log(f"Class-level sweep on {len(class_failures)} {class_name} failure cases, latents {latents}")
    class_sweeps = class_sweep(experiment, class_failures, latents, cls)
    effects = mode_effect_rows(class_sweeps, class_metric)
    report.table("figure7_mode_effects", f"Figure 7 data: mean change of {class_metric} per error mode and intervention", effects)
    groups = {s.case_id: s.group for s in class_sweeps}
    class_baselines = baseline_sweeps(class_failures, groups=groups)
    table4, cases4, choices4 = compare_methods(class_sweeps, class_baselines, class_metric, folds, margin,
                                               f"{class_name} latent steering", by_group=True, prefer=NO_EDIT, metrics=metrics, seed=seed)  # fmt: skip
    report.table("table4_class_steering", f"Table 4: {class_name} and mean Dice on {len(class_failures)} {class_name} failure cases", table4)
    report.table("table4_cases", "Table 4 per case: error mode and settings chosen", cases4)
    report.table("table4_choices", "Calibrated choices per fold and error mode", choice_rows(choices4))
    report.figure("figure7_mode_effects", lambda path, ow: plot_mode_effects(effects, path, class_metric, overwrite=ow))
