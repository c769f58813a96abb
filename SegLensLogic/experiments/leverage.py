"""Leverage: how far latent edits at each hook point can move a model's mask (the hook is chosen from it).

Skip connections and late fusion can carry the signal around a hook point, so that editing its latents changes a
handful of voxels. For each hook (one SAE per hook) and each labelled case, the ``n`` latents with the largest
activation mass inside the ground-truth tumour are scaled by every alpha of a grid, over the whole volume, and
the mask is re-segmented (:class:`~SegLensLogic.steering.encoded.EncodedCase`, only changed slices decoded).
Reported per hook:

- ``moved``: voxels whose label changes, as a share of the unedited predicted tumour, averaged over the grid;
- ``voxels_per_alpha``: changed voxels per unit of ``|alpha - 1|``, averaged over the grid;
- ``oracle_gain_WT`` / ``oracle_gain_mean``: the best Dice change over the grid per case (ground truth read: an
  upper bound, labelled as such), averaged over cases.

:func:`choose_hook` takes the hook with the largest ``moved`` among hooks whose feature map has at least
``min_side`` positions per side (a latent heatmap coarser than that says little about where a latent fires).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..data.cases import read_case
from ..segmentation.scores import segmentation_scores
from ..networks.segmenter import Segmenter
from ..sae.model import BatchTopKSAE
from ..steering.encoded import encode_case
from ..steering.interventions import LatentEdit
from .tables import Report, plot_curves

DEFAULT_ALPHAS = (0.0, 0.5, 2.0, 4.0, 8.0)
MIN_SIDE = 12


def quick_saes(
    model: Segmenter,
    model_dir,
    cohort,
    hooks: Sequence[str],
    folder,
    steps: int = 3000,
    vectors_per_hook: int = 300_000,
    expansion: int = 16,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, BatchTopKSAE]:
    """A quickly trained SAE per hook point (for measuring leverage, not for interpretation): about
    ``vectors_per_hook`` activation vectors of ``cohort`` each (every position of deep hooks, a sample of shallow
    ones), k a quarter of the hook's width (4 to 32), a fixed number of steps. Stores are removed afterwards."""
    import shutil
    from pathlib import Path

    from ..sae import ExtractionOptions, SAETrainingOptions, extract_activations
    from ..sae.trainer import train_sae_once

    folder = Path(folder)
    shapes = model.hook_points()
    saes = {}
    for hook in hooks:
        channels, height, width = shapes[hook]
        per_case = height * width * 100  # ~100 brain slices a case
        subsample = min(1.0, vectors_per_hook / max(per_case * len(cohort), 1))
        k = max(4, min(32, channels // 4))
        options = SAETrainingOptions(k=k, expansion=expansion, max_steps=steps, patience=None, log_every=10**9, seed=seed)

        def store(hook=hook, subsample=subsample):
            return extract_activations(model, cohort, folder / hook, ExtractionOptions(hook=hook, subsample=subsample, seed=seed),
                                       model_dir=model_dir, overwrite=True, log=lambda m: None)  # fmt: skip

        # Kept beside the stores' folder: a build cut off after some hooks resumes at the next one.
        sae, report = train_sae_once(store, options, folder / "saes" / hook, log=lambda m: None)
        log(f"{hook}: {channels} channels x {height}x{width}, quick SAE k {k} x {sae.d_sae} latents on "
            f"{report.get('vectors', '?')} vectors: "
            f"EV {report['holdout']['explained_variance']:.3f}, dead {report['holdout']['dead_fraction']:.3f}")  # fmt: skip
        saes[hook] = sae
        shutil.rmtree(folder / hook, ignore_errors=True)
    return saes


def tumour_latents(codes, truth: np.ndarray, n: int) -> list[int]:
    """The ``n`` latents with the largest activation mass inside the ground-truth tumour (labels > 0)."""
    return [j for j, _ in codes.top_latents(n, region=truth > 0)]


def case_leverage(model: Segmenter, sae: BatchTopKSAE, case, alphas: Sequence[float] = DEFAULT_ALPHAS, n_latents: int = 5) -> list[dict]:
    """One row per alpha for one labelled case: Dice (WT, mean) and voxels changed when the case's top tumour
    latents are scaled by alpha (alpha 1 is the unedited mask)."""
    config = model.config
    images = read_case(case, modalities=config.modalities, allow_missing=config.accepts_missing_modalities)
    encoded = encode_case(model, sae, images)
    base = encoded.labels
    base_scores = segmentation_scores(base, images.label, config.class_names)
    latents = tumour_latents(encoded.codes, images.label, n_latents)
    predicted_tumour = max(int((base > 0).sum()), 1)
    rows = []
    for alpha in alphas:
        labels = encoded.steer(sae, [LatentEdit(tuple(latents), "scale", float(alpha))]) if latents else base
        scores = segmentation_scores(labels, images.label, config.class_names)
        changed = int((labels != base).sum())
        rows.append({
            "case": images.case_id, "alpha": float(alpha), "latents": " ".join(map(str, latents)),
            "dice_WT": scores["dice_WT"], "dice_mean": scores["dice_mean"],
            "gain_WT": scores["dice_WT"] - base_scores["dice_WT"], "gain_mean": scores["dice_mean"] - base_scores["dice_mean"],
            "voxels_changed": changed, "moved": changed / predicted_tumour,
        })  # fmt: skip
    return rows


def summarise_hook(hook: str, sae: BatchTopKSAE, grid: tuple[int, int], rows: Sequence[dict]) -> dict:
    """The per-hook summary (module docstring) of :func:`case_leverage` rows of several cases."""
    edited = [r for r in rows if r["alpha"] != 1.0]
    cases = sorted({r["case"] for r in rows})
    per_case = {c: [r for r in edited if r["case"] == c] for c in cases}
    return {
        "hook": hook, "grid": f"{grid[0]}x{grid[1]}", "d_in": sae.config.d_in, "latents": sae.d_sae, "cases": len(cases),
        "moved": float(np.mean([r["moved"] for r in edited])) if edited else 0.0,
        "voxels_per_alpha": float(np.mean([r["voxels_changed"] / abs(r["alpha"] - 1) for r in edited])) if edited else 0.0,
        "oracle_gain_WT": float(np.mean([max(r["gain_WT"] for r in rs) for rs in per_case.values() if rs])) if edited else 0.0,
        "oracle_gain_mean": float(np.mean([max(r["gain_mean"] for r in rs) for rs in per_case.values() if rs])) if edited else 0.0,
    }  # fmt: skip


def choose_hook(summary: Sequence[dict], min_side: int = MIN_SIDE) -> str:
    """Among the hooks with at least ``min_side`` positions per side (any hook when none has): the one whose hint
    fixes aim best (largest ``aim_gain``, when measured: :func:`~SegLensLogic.experiments.hint_benchmark.aim`), then the
    one whose edits move the mask most (``moved``)."""
    eligible = [r for r in summary if min(int(v) for v in r["grid"].split("x")) >= min_side] or list(summary)
    return max(eligible, key=lambda r: (r.get("aim_gain", 0.0), r["moved"], r["oracle_gain_mean"]))["hook"]


def leverage_report(
    model: Segmenter,
    saes: dict[str, BatchTopKSAE],
    cases: Sequence,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_latents: int = 5,
    min_side: int = MIN_SIDE,
    log: Callable[[str], None] = print,
    aim_cases: Sequence = (),
    aim_clicks: int = 3,
    aim_steps: int = 25,
    cache: str | Path | None = None,
) -> tuple[Report, str, list[dict]]:
    """Leverage of every hook (one SAE each) on labelled ``cases``, and, on ``aim_cases``, how well hint fixes
    at each hook aim (the mean Dice gain after ``aim_clicks`` simulated clicks, fits of ``aim_steps`` Adam steps): the
    hook is chosen by aim.

    ``cache``: a folder keeping each hook's measurement (``<hook>.json``, with what it was measured with: the SAE's
    weights, the cases, the grid), so that a run cut off part way measures only the hooks it had not finished.

    Returns:
        ``(report, chosen hook, summary rows)``.
    """
    shapes = model.hook_points()
    per_alpha, summary = [], []
    for hook, sae in saes.items():
        if sae.config.hook_point not in (None, hook):
            raise ValueError(f"the SAE given for hook '{hook}' was trained at '{sae.config.hook_point}'")
        sae.config.hook_point = hook
        measured_with = {"sae": _fingerprint(sae), "cases": [c.case_id for c in cases], "alphas": [float(a) for a in alphas],
                         "n_latents": n_latents, "aim_cases": [c.case_id for c in aim_cases], "aim_clicks": aim_clicks,
                         "aim_steps": aim_steps}  # fmt: skip
        kept = _kept_hook(cache, hook, measured_with)
        if kept is not None:
            log(f"  {hook}: measured in an earlier run with the same SAE, cases and grid, loaded")
            per_alpha += kept["rows"]
            summary.append(kept["summary"])
            continue
        rows = []
        for number, case in enumerate(cases):
            case_rows = case_leverage(model, sae, case, alphas, n_latents)
            if any(r["case"] == case_rows[0]["case"] for r in rows):  # a degraded copy keeps its case's id
                case_rows = [{**r, "case": f"{r['case']} #{number + 1}"} for r in case_rows]
            rows += [{"hook": hook, **r} for r in case_rows]
            best = max(case_rows, key=lambda r: r["gain_mean"])
            log(f"  {hook}: {case_rows[0]['case']}: moved up to {max(r['moved'] for r in case_rows):.2f} of the predicted tumour, "
                f"best mean Dice change {best['gain_mean']:+.3f} at alpha {best['alpha']:g}")  # fmt: skip
        per_alpha += rows
        summary.append(summarise_hook(hook, sae, shapes[hook][1:], rows))
        if aim_cases:
            from ..steering.guided import GuidedOptions
            from .hint_benchmark import aim

            aimed = aim(model, sae, aim_cases, aim_clicks, GuidedOptions(steps=aim_steps), log=log)
            summary[-1].update(aim_gain=aimed["aim_gain"])
        if cache is not None:
            from ..storage import atomic_write_json

            atomic_write_json(Path(cache) / f"{hook}.json", {"measured_with": measured_with, "rows": rows, "summary": summary[-1]},
                              overwrite=True, default=_json_number)  # fmt: skip
    chosen = choose_hook(summary, min_side)
    report = Report("leverage", "Leverage: how far latent edits at each hook point move the mask")
    report.table("leverage", "Per hook (moved: share of the predicted tumour changed, mean over the alpha grid; oracle gains: best over the grid per case, ground truth read)", summary)
    report.table("leverage_per_alpha", "Per hook, case and alpha", per_alpha)
    report.notes += [
        f"Each case's {n_latents} latents with the largest activation mass inside its ground-truth tumour are scaled by alpha in "
        f"{list(alphas)} over the whole volume; the mask is re-segmented from the hook on.",
        f"Chosen hook: {chosen} (" + ("best aim: the largest mean Dice gain of hint fixes after "
        f"{aim_clicks} simulated clicks on {len(aim_cases)} case(s), then " if aim_cases else "") + "the largest 'moved', among hooks "
        f"with at least {min_side}x{min_side} positions per slice).",
        "Oracle gains read each case's ground truth to pick the best alpha: an upper bound, not what a user gets.",
    ]

    for name, key, ylabel in (("leverage_moved", "moved", "share of the predicted tumour changed"),
                              ("leverage_dice", "gain_mean", "mean Dice change (vs unedited)")):  # fmt: skip
        curves = {h: _curve(per_alpha, h, key, alphas) for h in saes}
        report.figure(name, lambda path, overwrite, curves=curves, ylabel=ylabel: plot_curves(
            {"top tumour latents scaled by alpha": curves}, path, "alpha", ylabel, overwrite=overwrite, xscale="symlog"))
    return report, chosen, summary


def _fingerprint(sae: BatchTopKSAE) -> str:
    """A hash of the SAE's weights: a kept hook measurement is reused only for the very same SAE."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _kept_hook(cache, hook: str, measured_with: dict) -> dict | None:
    """A hook's kept measurement, if it was made with ``measured_with``; else None."""
    if cache is None or not (Path(cache) / f"{hook}.json").is_file():
        return None
    from ..storage import read_json

    kept = read_json(Path(cache) / f"{hook}.json")
    if not isinstance(kept, dict) or kept.get("measured_with") != json.loads(json.dumps(measured_with)):
        return None
    return kept


def _json_number(value):
    """NumPy scalars in the rows, as JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _curve(rows: Sequence[dict], hook: str, key: str, alphas: Sequence[float]) -> tuple[list[float], list[float]]:
    xs = [float(a) for a in alphas]
    return xs, [float(np.mean([r[key] for r in rows if r["hook"] == hook and r["alpha"] == a])) for a in xs]
