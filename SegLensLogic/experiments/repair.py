"""Repairing real failures by steering, with every arm on the same cases (paper sections 6-7, made honest).

Failure cases. The reference model meets shifted real data: another site and protocol (BraTS 2013), SSA-like
acquisition at increasing strength (``seglens degrade``), and missing sequences. **Rule**: a case is a failure when
its mean Dice (necrotic core, edema, enhancing tumour) is below :data:`FAILURE_DICE`, or at least
:data:`FAILURE_DROP` below the same patient's clean case. A failure is **recovered** when an arm raises its mean Dice
by :data:`RECOVERY_GAIN` or more.

Latent sets per case, every one chosen without the case's labels (so that any arm may use them):

- ``top``: the ``n`` latents with the largest activation inside the *predicted* tumour;
- ``specific``: the same among the latents that the alignment file of the case's population marks specific to
  the reference (not shared with the population); ``top`` when the population has no alignment file;
- ``random``: ``n`` random latents that fire in the case (seeded by case): the control.

Each set is scaled by every alpha of the grid (alpha 1: no edit). The arms then pick the alpha:

- **oracle**: per case, from its own ground truth (an upper bound; labelled as such);
- **calibrated**: the alpha with the best mean Dice on the other fold's failure cases (folds by patient, so a
  case and its degraded copy are never on both sides), applied unchanged;
- **ground-truth-free**: ``specific`` latents, alpha minimising :func:`plausibility` (how far the predicted tumour's
  class proportions and size are from the reference cohort's: needs no label of the case);
- **random control**: ``random`` latents under each of the three choices above;
- **fitted**: one alpha per latent for the ``n_fit`` latents most active in the calibration fold's predicted
  tumours, fitted by gradient descent on Dice + cross-entropy through the layers after the hook
  (:func:`fit_correction`), applied to the other fold;
- **CCF** and **UF**: connected-component and uncertainty filtering, their setting calibrated the same way.

Reported per arm: the share of failures recovered, the mean Dice change per class with bootstrap 95 % confidence
intervals over cases, voxels changed, and the paired bootstrap interval of the difference to the random control.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.cases import Case, read_case
from ..segmentation.scores import segmentation_scores
from ..networks.segmenter import Segmenter
from ..sae.activations import feature_map_to_vectors
from ..sae.model import BatchTopKSAE
from ..steering.encoded import EncodedCase, encode_case
from ..steering.interventions import LatentEdit
from ..steering.plausibility import ReferenceStatistics, plausibility
from ..steering.selection import latent_sets
from .baselines import CCF_SETTINGS, UF_THRESHOLDS, apply_ccf, uncertainty_filter
from .calibration import CaseSweep, choose_setting
from .tables import Report

FAILURE_DICE = 0.6
FAILURE_DROP = 0.10
RECOVERY_GAIN = 0.05
DEFAULT_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
SETS = ("top", "specific", "random")
CLASSES = ("dice_NC", "dice_ED", "dice_ET", "dice_WT", "dice_TC", "dice_mean")


@dataclass
class ShiftedCase:
    """A labelled case of a shifted population.

    Attributes:
        case: where its files are (possibly with sequences removed: a missing-modality case).
        population: its population (``brats2013``, ``ssa``, ``missing-t2f``, ...); names the alignment file used.
        patient: the patient it comes from (folds never split a patient).
        clean_dice: the mean Dice of the patient's clean case, when there is one (the drop rule).
    """

    case: Case
    population: str
    patient: str
    clean_dice: float | None = None
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.case.case_id


def without_modalities(case: Case, removed: Sequence[str], suffix: str) -> Case:
    """The same case with some sequences left out (a missing-modality failure)."""
    import dataclasses

    images = {m: p for m, p in case.images.items() if m not in removed}
    return dataclasses.replace(case, case_id=f"{case.case_id}{suffix}", images=images)


@dataclass
class CaseSweeps:
    """Every setting's scores on one failure case: per latent set, alpha -> scores (+ plausibility, voxels)."""

    case: ShiftedCase
    base: dict
    sets: dict[str, tuple[int, ...]]
    scores: dict[str, dict[float, dict]] = field(default_factory=dict)
    baselines: dict[str, dict] = field(default_factory=dict)


def sweep_case(
    model: Segmenter,
    sae: BatchTopKSAE,
    shifted: ShiftedCase,
    reference: ReferenceStatistics,
    specific: Sequence[int] | None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_latents: int = 5,
    seed: int = 0,
) -> tuple[CaseSweeps, EncodedCase, np.ndarray]:
    """Encode a failure case once, then score every (latent set, alpha) and every baseline setting.

    Returns:
        ``(sweeps, encoded case, ground truth)``.
    """
    config = model.config
    images = read_case(shifted.case, modalities=config.modalities, allow_missing=True)
    encoded = encode_case(model, sae, images, probabilities=True)
    truth, names = images.label, config.class_names
    brain = encoded.prepared.to_input_grid(encoded.prepared.brain_mask)
    base = segmentation_scores(encoded.labels, truth, names)
    sets = latent_sets(encoded, n_latents, specific, seed=seed + zlib.crc32(shifted.label.encode()) % 10_000)
    result = CaseSweeps(shifted, base, sets)
    for name, latents in sets.items():
        per_alpha = {}
        for alpha in alphas:
            labels = encoded.labels if alpha == 1.0 or not latents else encoded.steer(sae, [LatentEdit(latents, "scale", float(alpha))])
            per_alpha[float(alpha)] = {**segmentation_scores(labels, truth, names),
                                       "plausibility": plausibility(labels, brain, reference),
                                       "voxels_changed": int((labels != encoded.labels).sum())}  # fmt: skip
        result.scores[name] = per_alpha
    result.baselines["CCF"] = {s: {**segmentation_scores(filtered := apply_ccf(encoded.labels, s, names), truth, names),
                                   "voxels_changed": int((filtered != encoded.labels).sum())} for s in CCF_SETTINGS}  # fmt: skip
    result.baselines["UF"] = {t: {**segmentation_scores(filtered := uncertainty_filter(encoded.labels, encoded.probabilities, t), truth, names),
                                  "voxels_changed": int((filtered != encoded.labels).sum())} for t in UF_THRESHOLDS}  # fmt: skip
    return result, encoded, truth


def patient_folds(cases: Sequence[CaseSweeps], folds: int = 2) -> list[tuple[list[int], list[int]]]:
    """``[(calibration indices, test indices)]``: patients (sorted) dealt to folds in turn, so that no patient is on
    both sides of a fold."""
    patients = sorted({c.case.patient for c in cases})
    folds = max(2, min(folds, len(patients)))
    fold_of = {p: i % folds for i, p in enumerate(patients)}
    out = []
    for fold in range(folds):
        test = [i for i, c in enumerate(cases) if fold_of[c.case.patient] == fold]
        out.append(([i for i in range(len(cases)) if i not in test], test))
    return out


def _sweep(c: CaseSweeps, grid: dict) -> CaseSweep:
    return CaseSweep(c.case.label, c.base, grid)


def arm_rows(cases: Sequence[CaseSweeps], folds: Sequence[tuple[list[int], list[int]]], metric: str = "dice_mean") -> dict[str, list[dict]]:
    """Per arm, one row per case: the chosen setting, its scores, the change of every class and voxels changed."""
    arms: dict[str, list[dict]] = {}

    def add(arm: str, case: CaseSweeps, setting, scores: dict) -> None:
        row = {"case": case.case.label, "population": case.case.population, "setting": setting,
               "voxels_changed": scores.get("voxels_changed", 0)}  # fmt: skip
        for key in CLASSES:
            row[key] = scores[key] - case.base[key]
        row["base_dice_mean"], row["dice_mean_after"] = case.base["dice_mean"], scores["dice_mean"]
        arms.setdefault(arm, []).append(row)

    for case in cases:
        for name in ("top", "random"):
            grid = case.scores[name]
            best = max(grid, key=lambda a: (grid[a][metric], a == 1.0))
            add(f"oracle ({name} latents)", case, best, grid[best])
        for name in ("specific", "random"):
            grid = case.scores[name]
            chosen = min(grid, key=lambda a: (grid[a]["plausibility"], a != 1.0))
            add(f"ground-truth-free ({name} latents)", case, chosen, grid[chosen])
    for calibration, test in folds:
        for name in ("top", "random"):
            choice = choose_setting([_sweep(cases[i], cases[i].scores[name]) for i in calibration], metric, prefer=1.0)
            for i in test:
                add(f"calibrated ({name} latents)", cases[i], choice.setting, cases[i].scores[name][choice.setting])
        for baseline, none in (("CCF", CCF_SETTINGS[0]), ("UF", UF_THRESHOLDS[0])):
            choice = choose_setting([_sweep(cases[i], cases[i].baselines[baseline]) for i in calibration], metric, prefer=none)
            for i in test:
                add(f"{baseline} (calibrated)", cases[i], str(choice.setting), cases[i].baselines[baseline][choice.setting])
    return arms


def bootstrap_interval(values: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``values`` (cases resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (reps, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summary_rows(arms: dict[str, list[dict]], control_of: dict[str, str]) -> list[dict]:
    """One row per arm: recovered share, mean change per class with 95 % CI, voxels changed, and the paired
    difference of mean Dice change to its random control (95 % CI)."""
    rows = []
    for arm, rows_of_arm in arms.items():
        by_case = {r["case"]: r for r in rows_of_arm}
        row = {"arm": arm, "cases": len(rows_of_arm),
               "recovered": float(np.mean([r["dice_mean"] >= RECOVERY_GAIN for r in rows_of_arm]))}  # fmt: skip
        for key in CLASSES:
            values = np.array([r[key] for r in rows_of_arm])
            low, high = bootstrap_interval(values)
            row[key] = f"{values.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
        row["voxels_changed"] = int(np.mean([r["voxels_changed"] for r in rows_of_arm]))
        control = control_of.get(arm)
        if control and control in arms:
            paired = {r["case"]: r for r in arms[control]}
            diff = np.array([by_case[c]["dice_mean"] - paired[c]["dice_mean"] for c in by_case if c in paired])
            low, high = bootstrap_interval(diff)
            row["vs random control"] = f"{diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
        rows.append(row)
    return rows


CONTROLS = {
    "oracle (top latents)": "oracle (random latents)",
    "calibrated (top latents)": "calibrated (random latents)",
    "ground-truth-free (specific latents)": "ground-truth-free (random latents)",
    "fitted (per-latent alphas)": "calibrated (random latents)",
    "CCF (calibrated)": "calibrated (random latents)",
    "UF (calibrated)": "calibrated (random latents)",
}


# -- the fitted correction ----------------------------------------------------------------------------------------
@dataclass
class FitData:
    """What fitting needs of one calibration case: a sample of its tumour-bearing slices at the hook."""

    activations: torch.Tensor
    cache: list[torch.Tensor]
    codes: torch.Tensor  # (N*h*w, L) values of the fitted latents
    target: torch.Tensor  # (N, S, S) ground-truth classes at the model's resolution


@torch.no_grad()
def fit_data(encoded: EncodedCase, sae: BatchTopKSAE, truth: np.ndarray, latents: Sequence[int], max_slices: int = 24, seed: int = 0) -> FitData:
    """Up to ``max_slices`` slices of a case that hold predicted or true tumour, with the fitted latents' codes."""
    forward = encoded.forward
    prepared = forward.prepared
    truth_ras = prepared.orientation.apply(truth)
    tumour_slices = np.flatnonzero((truth_ras > 0).any(axis=(0, 1)) | (encoded.labels_ras > 0).any(axis=(0, 1)))
    positions = np.flatnonzero(np.isin(forward.slices, tumour_slices))
    if len(positions) > max_slices:
        positions = np.sort(np.random.default_rng(seed).choice(positions, max_slices, replace=False))
    index = torch.as_tensor(positions, dtype=torch.long, device=forward.device)
    with torch.no_grad():
        h, cache = forward.decoder_inputs(index)
    weights = forward.encoded(sae, index).reshape(-1, 1)
    codes = sae.latent_codes(feature_map_to_vectors(h), latents) * weights
    label = torch.from_numpy(np.ascontiguousarray(truth_ras[:, :, forward.slices[positions]].transpose(2, 0, 1)))[:, None].float()
    target = prepared.geometry.to_model(label, mode="nearest")[:, 0].long()
    return FitData(h, cache, codes, target.to(forward.device))


def fit_correction(
    model: Segmenter, sae: BatchTopKSAE, data: Sequence[FitData], latents: Sequence[int], steps: int = 40, learning_rate: float = 0.1,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Fit one alpha per latent (``alpha = exp(theta)``, starting at 1) by Adam on Dice + cross-entropy of the
    calibration slices, through the layers after the hook (the edit ``h + (alpha - 1) z W_dec`` is differentiable).

    Returns:
        ``(alphas, loss per step)``.
    """
    from monai.losses import DiceCELoss

    hook = sae.config.hook_point or model.config.hook_point
    device = data[0].activations.device
    with torch.no_grad():  # each latent's decoder direction in input units: the change one unit of its code makes
        rows = sae.decode_change(torch.eye(len(latents), device=device), latents)
    theta = torch.zeros(len(latents), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([theta], lr=learning_rate)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:  # only theta learns; no gradient is kept for the model's weights
        parameter.requires_grad_(False)
    try:
        losses = _fit_loop(model, hook, data, rows, theta, optimiser, loss_fn, steps, log)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return torch.exp(theta).detach().cpu().numpy(), losses


def _fit_loop(model, hook, data, rows, theta, optimiser, loss_fn, steps, log) -> list[float]:
    losses = []
    for step in range(steps):
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for item in data:
            n, d, *spatial = item.activations.shape
            change = ((torch.exp(theta) - 1) * item.codes) @ rows
            h = item.activations + change.reshape(n, -1, d).transpose(1, 2).reshape(n, d, *spatial)
            logits = model.decode(h, item.cache, hook)
            loss = loss_fn(logits, item.target[:, None]) / len(data)
            loss.backward()
            total += float(loss.detach())
        optimiser.step()
        losses.append(total)
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"    fit step {step:3d}: loss {total:.4f}")
    return losses


def fitted_latents(encoded_cases: Sequence[EncodedCase], n: int) -> tuple[int, ...]:
    """The ``n`` latents with the most activation inside the predicted tumours of several cases (no labels)."""
    totals = None
    for encoded in encoded_cases:
        region = encoded.labels > 0
        weights = encoded.codes.region_weights(region=region if region.any() else None)
        mass = np.bincount(encoded.codes.latents, weights=encoded.codes.values * weights[encoded.codes.positions_of()], minlength=encoded.codes.d_sae)
        totals = mass if totals is None else totals + mass
    order = np.argsort(-totals)[:n]
    return tuple(int(j) for j in order if totals[j] > 0)


def fitted_edits(latents: Sequence[int], alphas: np.ndarray) -> list[LatentEdit]:
    """The fitted correction as steering edits (one scale edit per latent): what its recipe stores."""
    return [LatentEdit((int(j),), "scale", float(a)) for j, a in zip(latents, alphas)]


def repair_report(rows_by_arm: dict[str, list[dict]], failures: list[dict], fits: list[dict], notes: Sequence[str]) -> Report:
    """The arms table, per-case rows, the failure list and the fitted corrections as one report."""
    report = Report("repair", "Steering real failures: every arm on the same failure cases")
    summary = summary_rows(rows_by_arm, CONTROLS)
    report.table("arms", "Arms (mean change per class with 95 % bootstrap CI over cases; recovered: mean Dice gain >= "
                 f"{RECOVERY_GAIN}; 'vs random control': paired difference of mean Dice change, 95 % CI)", summary)  # fmt: skip
    report.table("failures", f"Failure cases (rule: mean Dice < {FAILURE_DICE}, or >= {FAILURE_DROP} below the patient's clean case)", failures)
    report.table("per_case", "Per case and arm", [{"arm": arm, **row} for arm, rows in rows_by_arm.items() for row in rows])
    if fits:
        report.table("fitted", "Fitted corrections (one per fold: latents, alphas, calibration loss before and after)", fits)
    report.notes += list(notes)
    return report


def is_failure(base: dict, clean_dice: float | None) -> bool:
    """The failure rule (module docstring)."""
    return base["dice_mean"] < FAILURE_DICE or (clean_dice is not None and clean_dice - base["dice_mean"] >= FAILURE_DROP)


def run_repair(
    model: Segmenter,
    sae: BatchTopKSAE,
    cases: Sequence[ShiftedCase],
    reference: ReferenceStatistics,
    specific: dict[str, Sequence[int]],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_latents: int = 5,
    n_fit: int = 8,
    fit_steps: int = 40,
    folds: int = 2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[Report, dict]:
    """Every arm on the failure cases among ``cases``.

    Args:
        specific: population -> the reference SAE's latents specific to it (not shared), from alignment files.

    Returns:
        ``(report, results)``: the report, and its numbers (``arms``: per-arm rows, ``failures``, ``fits``).
    """
    sweeps, encoded_cases, truths, failures = [], [], [], []
    for shifted in cases:
        result, encoded, truth = sweep_case(model, sae, shifted, reference, specific.get(shifted.population), alphas, n_latents, seed)
        failed = is_failure(result.base, shifted.clean_dice)
        failures.append({"case": shifted.label, "population": shifted.population, "patient": shifted.patient,
                         "dice_mean": result.base["dice_mean"], "dice_WT": result.base["dice_WT"],
                         "clean_dice_mean": shifted.clean_dice, "failure": failed})  # fmt: skip
        log(f"  {shifted.label} ({shifted.population}): mean Dice {result.base['dice_mean']:.3f}"
            + (f", clean {shifted.clean_dice:.3f}" if shifted.clean_dice is not None else "") + (" -> failure" if failed else ""))
        if failed:
            sweeps.append(result)
            encoded_cases.append(encoded)
            truths.append(truth)
    if len({c.case.patient for c in sweeps}) < 2:
        raise ValueError(f"{len(sweeps)} failure case(s) from fewer than two patients: too few to calibrate on one and test on another")
    fold_list = patient_folds(sweeps, folds)
    arms = arm_rows(sweeps, fold_list)
    fits = []
    names = model.config.class_names
    for fold, (calibration, test) in enumerate(fold_list):
        latents = fitted_latents([encoded_cases[i] for i in calibration], n_fit)
        data = [fit_data(encoded_cases[i], sae, truths[i], latents, seed=seed) for i in calibration]
        fitted, losses = fit_correction(model, sae, data, latents, steps=fit_steps)
        edits = fitted_edits(latents, fitted)
        fits.append({"fold": fold, "calibration": " ".join(sweeps[i].case.label for i in calibration), "latents": " ".join(map(str, latents)),
                     "alphas": " ".join(f"{a:.2f}" for a in fitted), "loss_start": losses[0], "loss_end": losses[-1]})  # fmt: skip
        log(f"  fold {fold}: fitted alphas {[round(float(a), 2) for a in fitted]} on latents {list(latents)}, "
            f"calibration loss {losses[0]:.4f} -> {losses[-1]:.4f}")  # fmt: skip
        for i in test:
            labels = encoded_cases[i].steer(sae, edits)
            scores = segmentation_scores(labels, truths[i], names)
            row = {"case": sweeps[i].case.label, "population": sweeps[i].case.population, "setting": "fitted",
                   "voxels_changed": int((labels != encoded_cases[i].labels).sum())}  # fmt: skip
            row.update({key: scores[key] - sweeps[i].base[key] for key in CLASSES})
            row["base_dice_mean"], row["dice_mean_after"] = sweeps[i].base["dice_mean"], scores["dice_mean"]
            arms.setdefault("fitted (per-latent alphas)", []).append(row)
    notes = [
        f"Failure rule: mean Dice (NC, ED, ET) below {FAILURE_DICE}, or at least {FAILURE_DROP} below the same patient's clean case. "
        f"Recovered: mean Dice gain of at least {RECOVERY_GAIN}.",
        f"Latent sets ({n_latents} latents, chosen without the case's labels): top = most active in the predicted tumour; "
        "specific = the same among the reference SAE's latents specific to the case's population (alignment file); random = "
        "random latents that fire in the case (control). Alpha grid: " + ", ".join(f"{a:g}" for a in alphas) + " (1 = no edit).",
        "oracle: alpha chosen per case from its ground truth (upper bound). calibrated: alpha with the best mean Dice on the "
        f"other fold's failures ({len(fold_list)} folds by patient). ground-truth-free: alpha minimising the label-free "
        "plausibility (class proportions and size of the predicted tumour vs the reference cohort). fitted: one alpha per "
        f"latent for the {n_fit} latents most active in the calibration fold's predicted tumours, by gradient descent on "
        "Dice + cross-entropy of calibration slices.",
        "CCF / UF: connected-component and uncertainty filtering, setting calibrated like alpha.",
        "Confidence intervals: 95 % percentile bootstrap over cases (2,000 resamples); few cases make them wide.",
    ]
    # The product's calibrated alpha per population: chosen on all of its failure cases (no case is tested here).
    calibrated_alpha = {"all": choose_setting([_sweep(c, c.scores["top"]) for c in sweeps], prefer=1.0).setting}
    for population in sorted({c.case.population for c in sweeps}):
        members = [_sweep(c, c.scores["top"]) for c in sweeps if c.case.population == population]
        calibrated_alpha[population] = choose_setting(members, prefer=1.0).setting
    report = repair_report(arms, failures, fits, notes)
    return report, {"arms": arms, "failures": failures, "fits": fits, "summary": summary_rows(arms, CONTROLS),
                    "calibrated_alpha": calibrated_alpha}  # fmt: skip
