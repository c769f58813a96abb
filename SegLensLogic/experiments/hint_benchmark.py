"""The hint benchmark (``seglens experiment hints``): fixing real failures by pointing at them, against
output-level fixes on the same clicks and a random-latent control.

Protocol (the simulated user of interactive segmentation, :mod:`.clicks`): on each failure case, click at the
interior of the largest error component of the current mask, fix, re-segment, up to ``max_clicks`` times. The
clicks are those the latent fix's own masks call for, and every arm sees the same clicks:

- **latent fix**: :meth:`~SegLensLogic.steering.SteeringSession.fix` (attributed candidates, fitted scales, a slab
  around the hints);
- **random latents**: the same fit on random latents active in the hinted slices (the control: the same fit and
  region, no aim);
- **logit bias**: a per-class bias on the unedited log-probabilities inside the same region, fitted to the same hint
  disks (:func:`~.baselines.logit_bias_fix`: the threshold moved), under the fix's own label rule;
- **spheres**: a ball painted at each click with its class, the radius chosen on the other patients' cases
  (two folds by patient, as every calibrated choice of SegLens);
- **unedited**: the model's own mask.

Reported at 1, 3 and 5 clicks: mean Dice change per class and region with 95 % bootstrap intervals over cases, the
paired difference of the latent fix to each other arm, the share of failures gaining at least
:data:`~.repair.RECOVERY_GAIN`, and the share of changed voxels farther than :data:`FAR_MM` from every click (a fix
that reaches beyond the clicked spots). The paper's own protocol (the 5 most active latents in the brain scaled by
the best alpha of 0.25 to 5, read from each case's truth) is a reference row.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.cases import read_case
from ..segmentation.scores import segmentation_scores
from ..steering.encoded import encode_case
from ..steering.guided import GuidedOptions, _ras_spacing, _targets
from ..steering.hints import HintVoxel, resolve_hints
from ..steering.interventions import LatentEdit, Region, apply_label_rule
from ..steering.session import SteeringSession
from .baselines import logit_bias_fix, paint_spheres
from .clicks import Click, click_hint, next_click
from .repair import RECOVERY_GAIN, ShiftedCase, bootstrap_interval, is_failure
from .tables import Report, plot_curves

CLICK_COUNTS = (1, 3, 5)
FAR_MM = 15.0
SPHERE_RADII = (3.0, 5.0, 8.0, 12.0, 16.0)
PAPER_ALPHAS = (0.25, 0.5, 1.0, 2.0, 5.0)
ARMS = ("latent fix", "random latents", "logit bias", "spheres", "unedited")
REPORTED = ("dice_NC", "dice_ED", "dice_ET", "dice_WT", "dice_TC", "dice_mean")


@dataclass
class ArmResult:
    """One arm on one case at one click count: its scores, voxels changed and how far they lie from the clicks."""

    scores: dict
    voxels_changed: int
    far_changed: int
    seconds: float = 0.0
    setting: str = ""


@dataclass
class HintCaseResult:
    """Everything measured on one failure case."""

    case: ShiftedCase
    base: dict
    failure: bool = True
    clicks: list[Click] = field(default_factory=list)
    arms: dict[tuple[str, int], ArmResult] = field(default_factory=dict)
    spheres: dict[tuple[float, int], ArmResult] = field(default_factory=dict)
    paper: dict | None = None


def far_from_clicks(changed: np.ndarray, clicks: Sequence[Click], spacing, far_mm: float = FAR_MM) -> int:
    """Voxels of ``changed`` (boolean, the clicks' array order) farther than ``far_mm`` from every click."""
    where = np.argwhere(changed)
    if not len(where):
        return 0
    near = np.zeros(len(where), dtype=bool)
    for click in clicks:
        d2 = (((where - np.asarray(click.voxel)) * np.asarray(spacing)) ** 2).sum(axis=1)
        near |= d2 <= far_mm**2
    return int((~near).sum())


@dataclass
class SimulatedStep:
    """One click of the simulated user and the fix that followed it (from every click so far)."""

    click: Click
    hints: list
    fix: object  # GuidedFix
    labels_ras: np.ndarray
    seconds: float


def simulate_clicks(session: SteeringSession, truth_ras: np.ndarray, max_clicks: int = 5, options: GuidedOptions = GuidedOptions()):
    """The simulated user on an open session: click at the interior of the largest error of the current mask, fix
    from every click so far (from the model's own mask, so the last fix is the whole correction), up to
    ``max_clicks`` times or until the mask has no error. Yields :class:`SimulatedStep` s; the session is left with
    the last fix applied."""
    prepared = session.prepared
    spacing = _ras_spacing(prepared)
    current = prepared.orientation.apply(session.base_labels)
    base = current
    clicks: list[Click] = []
    hints = []
    for _ in range(max_clicks):
        click = next_click(current, truth_ras, spacing, len(session.class_names))
        if click is None:
            return
        clicks.append(click)
        hints.append(click_hint(click, prepared))
        session.reset()
        started = time.perf_counter()
        fix = session.fix(hints, options)
        current = prepared.orientation.apply(session.apply(fix.edits)) if fix.edits else base
        yield SimulatedStep(click, list(hints), fix, current, time.perf_counter() - started)


def _arm_result(labels_ras: np.ndarray, base_ras: np.ndarray, truth_ras: np.ndarray, clicks, spacing, names, seconds=0.0, setting="") -> ArmResult:
    changed = labels_ras != base_ras
    return ArmResult(segmentation_scores(labels_ras, truth_ras, names), int(changed.sum()), far_from_clicks(changed, clicks, spacing),
                     seconds, setting)  # fmt: skip


def run_case(model, sae, shifted: ShiftedCase, max_clicks: int = 5, options: GuidedOptions = GuidedOptions(), seed: int = 0,
             log: Callable[[str], None] = print) -> HintCaseResult:  # fmt: skip
    """Encode one case once and, when it is a failure, run every arm on the latent fix's clicks (``failure``
    False: only its unedited scores)."""
    config = model.config
    names = config.class_names
    images = read_case(shifted.case, modalities=config.modalities, allow_missing=True)
    encoded = encode_case(model, sae, images, probabilities=True)
    prepared = encoded.prepared
    truth = prepared.orientation.apply(images.label)
    base = encoded.labels_ras
    base_scores = segmentation_scores(base, truth, names)
    result = HintCaseResult(shifted, base_scores, failure=is_failure(base_scores, shifted.clean_dice))
    if not result.failure:
        return result
    session = SteeringSession.of_encoded(model, sae, encoded)
    spacing = _ras_spacing(prepared)
    probabilities = prepared.orientation.apply(np.moveaxis(encoded.probabilities, 0, 3))
    brain = prepared.brain_mask
    case_seed = seed + zlib.crc32(shifted.label.encode()) % 10_000
    for n, step in enumerate(simulate_clicks(session, truth, max_clicks, options), start=1):  # stops early on a perfect mask
        result.clicks.append(step.click)
        hints, fix, labels = step.hints, step.fix, step.labels_ras
        result.arms[("latent fix", n)] = _arm_result(labels, base, truth, result.clicks, spacing, names, step.seconds,
                                                     f"{len(fix.edits)} latents")  # fmt: skip

        if n not in CLICK_COUNTS:
            continue
        session.reset()
        control = session.fix(hints, options, random_seed=case_seed + n)
        random_labels = prepared.orientation.apply(session.apply(control.edits)) if control.edits else base
        result.arms[("random latents", n)] = _arm_result(random_labels, base, truth, result.clicks, spacing, names,
                                                         setting=f"{len(control.edits)} latents")  # fmt: skip
        resolved = resolve_hints(hints, prepared, len(names))
        region = _region_mask(fix.region, prepared, brain)
        masks, kinds = _hint_disks(resolved, base, brain, spacing, options)
        biased, bias = logit_bias_fix(probabilities, base, masks, kinds, region)
        biased = apply_label_rule(fix.rule, base, biased)  # the fix's own label rule: only the edit differs
        result.arms[("logit bias", n)] = _arm_result(biased, base, truth, result.clicks, spacing, names,
                                                     setting=" ".join(f"{b:+.1f}" for b in bias))  # fmt: skip
        for radius in SPHERE_RADII:
            painted = paint_spheres(base, result.clicks, radius, spacing, brain)
            result.spheres[(radius, n)] = _arm_result(painted, base, truth, result.clicks, spacing, names, setting=f"{radius:g} mm")
        result.arms[("unedited", n)] = ArmResult(dict(base_scores), 0, 0)
    for n in CLICK_COUNTS:  # a case fixed before its n-th click keeps its last result at n
        for arm in ("latent fix", "random latents", "logit bias", "unedited"):
            if (arm, n) not in result.arms:
                last = max((m for (a, m) in result.arms if a == arm and m < n), default=None)
                result.arms[(arm, n)] = result.arms[(arm, last)] if last is not None else ArmResult(dict(base_scores), 0, 0)
        for radius in SPHERE_RADII:
            if (radius, n) not in result.spheres:
                last = max((m for (r, m) in result.spheres if r == radius and m < n), default=None)
                result.spheres[(radius, n)] = result.spheres[(radius, last)] if last is not None else ArmResult(dict(base_scores), 0, 0)
    result.paper = _paper_protocol(encoded, sae, truth, names)
    fix1 = result.arms[("latent fix", min(3, len(result.clicks) or 1))]
    log(f"  {shifted.label}: mean Dice {base_scores['dice_mean']:.3f} -> {fix1.scores['dice_mean']:.3f} after "
        f"{min(3, len(result.clicks))} click(s) (latent fix, {fix1.seconds:.1f} s); clicks "
        + ", ".join(f"{c.sign}{names[c.cls] if c.cls else ''}" for c in result.clicks))  # fmt: skip
    return result


def _region_mask(region: Region, prepared, brain: np.ndarray) -> np.ndarray:
    """A fix's region as a RAS voxel mask inside the brain (the logit bias acts where the latent fix may)."""
    if region.kind == "mask":
        return prepared.orientation.apply(region.mask) & brain
    mask = np.zeros(brain.shape, dtype=bool)
    if region.kind == "volume":
        mask[...] = True
    else:
        mask[:, :, region.start : region.stop] = True
    return mask & brain


def _hint_disks(resolved: Sequence[HintVoxel], current: np.ndarray, brain: np.ndarray, spacing, options: GuidedOptions):
    """Each hint's disk as a volume mask, with its ``(sign, class)`` (the disks the latent fit reads)."""
    slices = np.unique([h.slice for h in resolved])
    targets = _targets(resolved, slices, current, brain, spacing, options)
    masks = []
    for disk in targets.hint_masks.numpy():
        volume = np.zeros(brain.shape, dtype=bool)
        volume[:, :, slices] = disk.transpose(1, 2, 0)
        masks.append(volume)
    return masks, targets.hint_kinds


def _paper_protocol(encoded, sae, truth: np.ndarray, names) -> dict:
    """The 5 most active latents in the brain, each alpha of :data:`PAPER_ALPHAS`; the best per case (oracle)."""
    latents = tuple(j for j, _ in encoded.codes.top_latents(5))
    base = segmentation_scores(encoded.labels_ras, truth, names)
    best = (base["dice_mean"], 1.0)
    for alpha in PAPER_ALPHAS:
        if alpha == 1.0 or not latents:
            continue
        scores = segmentation_scores(encoded.steer_ras(sae, [LatentEdit(latents, "scale", alpha)]), truth, names)
        best = max(best, (scores["dice_mean"], alpha))
    return {"gain": best[0] - base["dice_mean"], "alpha": best[1]}


def _folds(results: Sequence[HintCaseResult]) -> list[tuple[list[int], list[int]]]:
    patients = sorted({r.case.patient for r in results})
    fold_of = {p: i % 2 for i, p in enumerate(patients)}
    return [([i for i, r in enumerate(results) if fold_of[r.case.patient] != f], [i for i, r in enumerate(results) if fold_of[r.case.patient] == f])
            for f in range(2)]  # fmt: skip


def calibrate_spheres(results: Sequence[HintCaseResult]) -> None:
    """Choose each case's sphere radius on the other fold's cases (best mean Dice gain at the same click count)
    and record it as the ``spheres`` arm. With one patient only, the radius is chosen on the case itself."""
    folds = _folds(results) if len({r.case.patient for r in results}) >= 2 else [(list(range(len(results))), list(range(len(results))))]
    for n in CLICK_COUNTS:
        for calibration, test in folds:
            def gain(radius: float) -> float:
                return float(np.mean([results[i].spheres[(radius, n)].scores["dice_mean"] - results[i].base["dice_mean"] for i in calibration]))

            radius = max(SPHERE_RADII, key=lambda r: (gain(r), -r))
            for i in test:
                results[i].arms[("spheres", n)] = results[i].spheres[(radius, n)]


def _change(result: HintCaseResult, arm: str, n: int, key: str) -> float:
    return result.arms[(arm, n)].scores[key] - result.base[key]


def summary_rows(results: Sequence[HintCaseResult], n: int) -> list[dict]:
    """One row per arm at ``n`` clicks (module docstring)."""
    rows = []
    for arm in ARMS:
        row: dict = {"arm": arm, "clicks": n, "cases": len(results)}
        for key in REPORTED:
            values = np.array([_change(r, arm, n, key) for r in results])
            low, high = bootstrap_interval(values)
            row[key] = f"{values.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
        row["gaining >= 0.05"] = float(np.mean([_change(r, arm, n, "dice_mean") >= RECOVERY_GAIN for r in results]))
        changed = [r.arms[(arm, n)].voxels_changed for r in results]
        row["voxels_changed"] = int(np.mean(changed))
        row["far from clicks"] = float(sum(r.arms[(arm, n)].far_changed for r in results) / max(sum(changed), 1))
        if arm == "latent fix":
            row["seconds"] = float(np.mean([r.arms[(arm, n)].seconds for r in results]))
            for other in ("random latents", "logit bias", "spheres"):
                diff = np.array([_change(r, arm, n, "dice_mean") - _change(r, other, n, "dice_mean") for r in results])
                low, high = bootstrap_interval(diff)
                row[f"vs {other}"] = f"{diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
        rows.append(row)
    return rows


def paper_row(results: Sequence[HintCaseResult]) -> dict:
    gains = np.array([r.paper["gain"] for r in results])
    low, high = bootstrap_interval(gains)
    return {"arm": "paper protocol (5 most active latents in the brain, oracle alpha)", "cases": len(results),
            "dice_mean": f"{gains.mean():+.3f} [{low:+.3f}, {high:+.3f}]", "recovered (any gain)": float(np.mean(gains > 0)),
            "recovered (>= 0.05)": float(np.mean(gains >= RECOVERY_GAIN))}  # fmt: skip


def per_case_rows(results: Sequence[HintCaseResult], names) -> list[dict]:
    rows = []
    for r in results:
        for n in CLICK_COUNTS:
            for arm in ARMS[:-1]:
                a = r.arms[(arm, n)]
                rows.append({"case": r.case.label, "population": r.case.population, "clicks": n, "arm": arm, "setting": a.setting,
                             "base_dice_mean": r.base["dice_mean"], "dice_mean": a.scores["dice_mean"],
                             **{f"change_{k[5:]}": a.scores[k] - r.base[k] for k in REPORTED},
                             "voxels_changed": a.voxels_changed, "far": a.far_changed})  # fmt: skip
    return rows


def run_hints(model, sae, cases: Sequence[ShiftedCase], max_clicks: int = 5, options: GuidedOptions = GuidedOptions(),
              seed: int = 0, log: Callable[[str], None] = print) -> tuple[Report, dict]:  # fmt: skip
    """The benchmark on the failures among ``cases`` (module docstring).

    Returns:
        ``(report, results)``; ``results``: ``summary`` (per click count, one row per arm), ``paper``,
        ``failures``, ``cases`` (per-case rows).
    """
    names = model.config.class_names
    results, failures, clean = [], [], {}
    for shifted in cases:
        if shifted.population != "clean" and shifted.patient in clean:  # the drop rule reads the patient's clean case
            shifted = dataclasses.replace(shifted, clean_dice=clean[shifted.patient])
        result = run_case(model, sae, shifted, max_clicks, options, seed, log)
        if shifted.population == "clean":
            clean[shifted.patient] = result.base["dice_mean"]
        if not result.failure:
            log(f"  {shifted.label}: mean Dice {result.base['dice_mean']:.3f}, not a failure")
        failures.append({"case": shifted.label, "population": shifted.population, "dice_mean": result.base["dice_mean"],
                         "dice_WT": result.base["dice_WT"], "failure": result.failure})  # fmt: skip
        if result.failure:
            results.append(result)
    if not results:
        raise ValueError("no failure case among the cases: nothing to fix")
    calibrate_spheres(results)
    summary = {n: summary_rows(results, n) for n in CLICK_COUNTS}
    report = Report("hints", "Fixing failures by pointing at them: latent fix vs output-level fixes, on the same clicks")
    for n in CLICK_COUNTS:
        report.table(f"arms_{n}_clicks", f"After {n} click(s): mean change with 95 % bootstrap CI over {len(results)} failures", summary[n])
    report.table("paper_protocol", "Reference: the paper's protocol (no clicks; alpha read from each case's truth)", [paper_row(results)])
    report.table("failures", "Cases (a failure has mean Dice < 0.6 or lost >= 0.10 against its clean case)", failures)
    report.table("per_case", "Per case, click count and arm", per_case_rows(results, names))
    curves = {key: {arm: (list(CLICK_COUNTS), [float(np.mean([_change(r, arm, n, key) for r in results])) for n in CLICK_COUNTS])
                    for arm in ARMS[:-1]} for key in ("dice_mean", "dice_WT")}  # fmt: skip
    report.figure("clicks", lambda path, overwrite: plot_curves(curves, path, "clicks", "mean Dice change", overwrite=overwrite))
    report.notes += [
        f"Clicks: the interior point (largest distance to the border, mm) of the largest error component of the latent fix's current "
        f"mask (missed class c -> '+c', false tumour -> '-'), up to {max_clicks}; every arm is scored on the same clicks.",
        f"Latent fix: {options.candidates} latents chosen by attribution among those active in the hinted slices, one scale each fitted in "
        f"{options.steps} Adam steps through the layers after the hook, inside the slab of slices within {options.margin_mm:g} mm of the "
        "hints. Random latents: the same fit on random latents active there. Logit bias: one bias per class on the unedited "
        "log-probabilities in the same slab, fitted to the same hint disks. Spheres: a ball of the hint's class at each click, radius "
        f"({', '.join(f'{r:g}' for r in SPHERE_RADII)} mm) chosen on the other patients' cases.",
        f"Far from clicks: share of changed voxels farther than {FAR_MM:g} mm from every click. Gaining: mean Dice (NC, ED, ET) up by "
        f">= {RECOVERY_GAIN}. Intervals: 95 % percentile bootstrap over cases; 'vs' columns are paired differences of mean Dice change.",
    ]
    per_case = per_case_rows(results, names)
    return report, {"summary": {str(n): rows for n, rows in summary.items()}, "paper": paper_row(results), "failures": failures,
                    "cases": per_case}  # fmt: skip


def aim(model, sae, cases: Sequence, clicks: int = 3, options: GuidedOptions = GuidedOptions(),
        log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """How well hint fixes at ``sae``'s hook aim: the mean Dice (NC, ED, ET) gain after ``clicks`` simulated clicks
    over labelled ``cases`` (each encoded once), and per case. What the reference build chooses its hook by."""
    config = model.config
    gains = {}
    for case in cases:
        images = read_case(case, modalities=config.modalities, allow_missing=True)
        encoded = encode_case(model, sae, images)
        session = SteeringSession.of_encoded(model, sae, encoded)
        truth = encoded.prepared.orientation.apply(images.label)
        base = segmentation_scores(encoded.labels_ras, truth, config.class_names)["dice_mean"]
        last = encoded.labels_ras
        for step in simulate_clicks(session, truth, clicks, options):
            last = step.labels_ras
        gains[images.case_id] = segmentation_scores(last, truth, config.class_names)["dice_mean"] - base
        log(f"    {sae.config.hook_point}: {images.case_id}: mean Dice {base:.3f} -> {base + gains[images.case_id]:.3f} after {clicks} simulated clicks")
    return {"aim_gain": float(np.mean(list(gains.values()))) if gains else 0.0, "per_case": gains}


def hint_failure_pool(data: str | Path, bundle, work: str | Path, log: Callable[[str], None] = print) -> list[ShiftedCase]:
    """The failure pool of a reference bundle (or its figures, a dict with ``training``): its held-back test cases
    clean, SSA-like at strengths 1 and 2, without FLAIR and without T1c; the BraTS 2013 cases; and the
    ``brats-extra`` cases it was not trained on. Degraded copies are written once into ``work``."""
    from ..data.cohort import load_cohort
    from ..data.phantoms import degrade_case
    from .repair import without_modalities

    data, work = Path(data), Path(work)
    training = ((bundle if isinstance(bundle, dict) else bundle.figures) or {}).get("training", {})
    seen = set(training.get("cases", [])) | set(training.get("validation_cases", []))
    test_ids = training.get("test_cases", [])
    cases = {c.case_id: c for sub in ("brats2018", "brats-extra") if (data / sub).is_dir() for c in load_cohort(data / sub)}
    pool = []
    for case_id in test_ids:
        if case_id not in cases:
            continue
        case = cases[case_id]
        folder = Path(next(iter(case.images.values()))).parent
        pool.append(ShiftedCase(case, "clean", case_id, None, name=case_id))
        for strength in (1.0, 2.0):
            target = work / f"ssa-x{strength:g}"
            if not (target / folder.name).exists():
                degrade_case(folder, target, preset="ssa", seed=0, strength=strength)
            pool.append(ShiftedCase(load_cohort(target / folder.name)[0], "ssa", case_id, None, name=f"{case_id} (SSA x{strength:g})"))
        for missing in ("t2f", "t1c"):
            pool.append(ShiftedCase(without_modalities(case, [missing], f"-no-{missing}"), f"missing-{missing}", case_id, None,
                                    name=f"{case_id} (no {missing})"))  # fmt: skip
    if (data / "brats2013").is_dir():
        for case in load_cohort(data / "brats2013"):
            pool.append(ShiftedCase(case, "brats2013", case.case_id, None, name=f"{case.case_id} (BraTS 2013)"))
    if (data / "brats-extra").is_dir():
        for case in load_cohort(data / "brats-extra"):
            if case.case_id not in seen and case.case_id not in test_ids:
                pool.append(ShiftedCase(case, "brats-extra", case.case_id, None, name=f"{case.case_id} (brats-extra)"))
    return pool
