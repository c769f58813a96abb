"""The reference bundle's model card: every figure measured by the build that wrote the weights.

:func:`model_card` turns a finished build's recorded outputs (``build.json``) into the card's Markdown and the
``figures`` stored in ``bundle.json``; nothing on the card is typed by hand.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

# Quality goals of the reference bundle (held-out cases).
# The second edition's goals (issue 25); a card records the goals it was measured against in its figures.
GOALS = {"dice_WT": 0.87, "dice_TC": 0.78, "dice_ET": 0.70, "explained_variance": 0.90, "dead_fraction": 0.10, "dice_recovered": 0.97}

CITATIONS = """\
- BraTS: Menze et al., "The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)", IEEE TMI 34(10), 2015;
  Bakas et al., "Advancing The Cancer Genome Atlas glioma MRI collections with expert segmentation labels and
  radiomic features", Scientific Data 4:170117, 2017; Bakas et al., arXiv:1811.02629, 2018. TCGA label collections:
  doi:10.7937/K9/TCIA.2017.KLXWJJ1Q, doi:10.7937/K9/TCIA.2017.GJQ7R0EF.
- The BraTS 2018 cases are sample volumes of the DeepBrainSeg repository (koriavinash1/DeepBrainSeg @ 5d4f3810f1c7);
  the BraTS 2013 cases come from the DeepMedic example data (deepmedic/deepmedic @ e10ba7c3570d), licence
  CC BY-NC-SA 3.0. BraTS data are released for research; these weights inherit that restriction.
- SegFormer: Xie et al., NeurIPS 2021. U-Net: Ronneberger et al., MICCAI 2015 (MONAI BasicUNet). BatchTopK SAEs: Bussmann et al., 2024. Med-SegLens (the method).
- MNI152 template (pediatric phantoms): Fonov et al., NeuroImage 2011, via nilearn."""


def hardware() -> str:
    """The machine this process runs on, in words (training's hardware on the model card)."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} PyTorch threads"


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# The sweep's readability measures (:func:`~SegLensLogic.experiments.sae_sweep.readability`), shown when measured.
READABILITY_COLUMNS = ("tumour_latents", "tumour_latents_seed1", "label_agreement", "tumour_replicating", "label_stability")


def _table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _goal(name: str, value: float) -> str:
    goal = GOALS[name]
    met = value <= goal if name == "dead_fraction" else value >= goal
    return f"{value:.3f} ({'meets' if met else 'below'} the goal {'<=' if name == 'dead_fraction' else '>='} {goal})"


def _intervals(cases: list[dict], keys: tuple[str, ...] = ("dice_WT", "dice_TC", "dice_ET")) -> str:
    """The means of ``keys`` over ``cases`` with 95 % bootstrap intervals (resampling cases), and how many cases:
    a mean over three or four cases is a rough estimate, and the card says so next to it."""
    from ..experiments.repair import bootstrap_interval

    parts = []
    for key in keys:
        values = np.array([float(case[key]) for case in cases])
        low, high = bootstrap_interval(values)
        parts.append(f"{key[5:]} {values.mean():.3f} [{low:.3f}, {high:.3f}]")
    return f"Means over n = {len(cases)} cases with 95 % bootstrap intervals over the cases: " + ", ".join(parts) + "."


def _interval(text: str) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a ``"+0.015 [+0.002, +0.034]"`` cell of the repair summary."""
    mean, low, high = (float(v) for v in re.findall(r"[-+]?\d+\.\d+|nan", text)[:3])
    return mean, low, high


def steering_verdict(summary: list[dict]) -> list[str]:
    """The steering goals, met or not, read from the repair summary's rows (one line each)."""
    rows = {row["arm"]: row for row in summary}
    lines = []
    oracle = rows.get("oracle (top latents)")
    if oracle:
        met = oracle["recovered"] >= 0.5
        lines.append(f"- The oracle recovers {oracle['recovered']:.0%} of the failures ({'meets' if met else 'below'} the goal: at least half).")
    baselines = [rows[b] for b in ("CCF (calibrated)", "UF (calibrated)") if b in rows]
    for arm in ("calibrated (top latents)", "ground-truth-free (specific latents)"):
        if arm not in rows or "vs random control" not in rows[arm]:
            continue
        mean = _interval(rows[arm]["dice_mean"])[0]
        diff, low, _high = _interval(rows[arm]["vs random control"])
        beats_random = low > 0
        beats_baselines = all(mean > _interval(b["dice_mean"])[0] for b in baselines)
        lines.append(f"- {arm}: mean Dice change {mean:+.3f}; against its random control {diff:+.3f} "
                     f"({'a real gain: the interval excludes 0' if beats_random else 'not distinguishable from random latents'}); "
                     f"{'above' if beats_baselines else 'not above'} both filtering baselines.")  # fmt: skip
    return lines


HINT_GOALS = {"gain": 0.05, "gaining": 0.5, "far": 0.5, "seconds": 10.0}


def hints_figures(results: dict) -> dict:
    """What the card's figures keep of a hint benchmark (:func:`~SegLensLogic.experiments.hint_benchmark.run_hints`): the
    latent fix's row at each click count, the paired differences, and a one-line summary the Slicer panel shows."""
    out: dict[str, Any] = {"cases": len([f for f in results["failures"] if f["failure"]])}
    for clicks, rows in results["summary"].items():
        fix = next(r for r in rows if r["arm"] == "latent fix")
        out[f"clicks_{clicks}"] = {key: fix.get(key) for key in ("dice_mean", "dice_WT", "gaining >= 0.05", "far from clicks", "seconds",
                                                                 "vs random latents", "vs logit bias", "vs spheres")}  # fmt: skip
    three = out.get("clicks_3", {})
    out["summary_line"] = (
        f"Measured on {out['cases']} real failures of this model, 3 simulated clicks each: mean Dice change {three.get('dice_mean')} "
        f"(against the same fit on random latents {three.get('vs random latents')}; against a fitted logit bias "
        f"{three.get('vs logit bias')}); {float(three.get('gaining >= 0.05') or 0):.0%} of the failures gain 0.05 or more."
    )
    return out


def hints_section(results: dict) -> list[str]:
    """The card's section on fixing by pointing: the benchmark's tables at 1, 3 and 5 clicks, and its goals."""
    columns = ["arm", "dice_mean", "dice_WT", "dice_TC", "dice_ET", "gaining >= 0.05", "far from clicks", "vs random latents",
               "vs logit bias", "vs spheres"]  # fmt: skip
    failures = [f for f in results["failures"] if f["failure"]]
    lines = [
        "## Fixing by pointing (hints)",
        f"`seglens experiment hints` on the failures of this model ({len(failures)} of {len(results['failures'])} cases: the test cases "
        "clean, SSA-like x1 and x2, without FLAIR and without T1c, the BraTS 2013 cases and the brats-extra cases never trained on; "
        "a failure has mean Dice < 0.6 or lost >= 0.10 against its clean case). The simulated user clicks at the interior of the "
        "largest error of the latent fix's current mask; every arm sees the same clicks. Mean change with 95 % bootstrap intervals "
        "over the failures; 'vs' columns: paired differences of the latent fix's mean Dice change to each other arm; far from "
        "clicks: share of the changed voxels more than 15 mm from every click.",
        "",
    ]
    for clicks, rows in results["summary"].items():
        lines += [f"After {clicks} click(s):", "", _table(rows, columns), ""]
    lines += [f"Reference, the paper's protocol (no clicks; alpha read from each case's truth): {results['paper']['dice_mean']} "
              f"({results['paper']['recovered (>= 0.05)']:.0%} of the failures gain 0.05 or more).", ""]
    three = next((r for r in results["summary"].get("3", []) if r["arm"] == "latent fix"), None)
    if three is not None:
        mean = _interval(three["dice_mean"])[0]
        random_low = _interval(three["vs random latents"])[1]
        bias_low = _interval(three["vs logit bias"])[1]
        lines += [
            f"- Goal, after 3 clicks a mean gain of at least {HINT_GOALS['gain']}: {mean:+.3f} ({'met' if mean >= HINT_GOALS['gain'] else 'not met'}); "
            f"the interval against random latents {'excludes' if random_low > 0 else 'includes'} 0, against the logit bias "
            f"{'excludes' if bias_low > 0 else 'includes'} 0; {three['gaining >= 0.05']:.0%} of the failures gain 0.05 or more "
            f"(goal: half); {three['far from clicks']:.0%} of the changed voxels lie farther than 15 mm from every click (goal: "
            f"more than half).",
        ]
    return lines


def hints_headline(results: dict) -> list[str]:
    """The README's short table of a hint benchmark: mean Dice change (95 % interval over the failures) of each arm
    at each click count, with the latent fix's share of failures gaining 0.05 and of changed voxels far from clicks."""
    arms = ["latent fix", "random latents", "logit bias", "spheres"]
    n = len([f for f in results["failures"] if f["failure"]])
    lines = [f"| clicks | {' | '.join(arms)} | fix: gaining >= 0.05 | fix: far from clicks |", "|---" * (len(arms) + 3) + "|"]
    for clicks, rows in results["summary"].items():
        by_arm = {r["arm"]: r for r in rows}
        fix = by_arm["latent fix"]
        lines.append(f"| {clicks} | " + " | ".join(str(by_arm[a]["dice_mean"]) for a in arms)
                     + f" | {float(fix['gaining >= 0.05']):.0%} | {float(fix['far from clicks']):.0%} |")  # fmt: skip
    lines += ["", f"Mean Dice (NC, ED, ET) change on {n} real failures of the shipped model, 95 % bootstrap intervals. The "
              f"paper's protocol (no clicks, alpha read from each case's truth): {results['paper']['dice_mean']}."]  # fmt: skip
    return lines


def model_card(build) -> tuple[str, dict]:
    """``(markdown, figures)`` of a build whose steps up to ``evaluation`` have finished."""
    p = build.pipeline
    lines = [
        *_card_opening(build),
        *_segmentation_section(p.outputs("split"), p.outputs("evaluation"), build.settings.arch),
        *_sae_section(p.outputs("leverage"), p.outputs("sae"), p.outputs("interpret"), p.outputs("evaluation")),
        *_leverage_section(p.outputs("leverage")),
        *_populations_section(p.outputs("populations")),
        *_steering_section(build.settings, p.outputs("repair")),
        *(hints_section(p.outputs("hints")["results"]) + [""] if p.done("hints") else []),
        "## Data licences and citations",
        CITATIONS,
        "",
    ]
    return "\n".join(lines), card_figures(build)


def card_figures(build) -> dict:
    """The card's measured numbers, kept in the bundle's manifest (``figures``: what the Slicer panel shows)."""
    p = build.pipeline
    s = build.settings
    split, base = p.outputs("split"), p.outputs("base")
    leverage, sae = p.outputs("leverage"), p.outputs("sae")
    populations, evaluation, repair = p.outputs("populations"), p.outputs("evaluation"), p.outputs("repair")
    sae_metrics, chosen = evaluation["sae"], sae["chosen"]
    return {
        "training": {"cases": split["train"], "validation_cases": split["validation"], "test_cases": split["test"],
                     "held_out_cohort": split["brats2013"], "epochs": base["epochs"], "best_epoch": base["best_epoch"],
                     "wall_time_minutes": round(base["seconds"] / 60, 1), "hardware": _training_hardware(base),
                     "arch": s.arch, "image_size": s.image_size, "crop_to_brain": s.crop_to_brain},
        "dice_test": evaluation["segmentation"]["test"]["mean"],
        "dice_brats2013": evaluation["segmentation"]["brats2013"]["mean"],
        "hook_point": leverage["hook"],
        "sae": {"k": chosen["k"], "expansion": chosen["expansion"], "explained_variance": sae_metrics["explained_variance"],
                "l0": sae_metrics["l0"], "dead_fraction": sae_metrics["dead_fraction"], "dice_recovered": sae_metrics["dice_recovered"],
                "seed_shared": chosen["seed_shared"]},
        "populations": {name: {"live_shared": r["live_shared"], "shared_fraction": r["shared_fraction"]}
                        for name, r in populations["populations"].items()},
        "floors": populations["floors"],
        "repair": {row["arm"]: {"cases": row["cases"], "recovered": row["recovered"], "dice_mean": row["dice_mean"]} for row in repair["summary"]},
        "goals": GOALS,
        **({"hints": hints_figures(p.outputs("hints")["results"])} if p.done("hints") else {}),
    }  # fmt: skip


def _training_hardware(base: dict) -> str:
    """Where the base model trained, as its step recorded it (builds before that record: the CPU, threads unknown;
    the card must not name the machine that merely wrote it)."""
    return base.get("hardware") or "the CPU (thread count not recorded by this build)"


def _architecture(s) -> str:
    """The architecture as the card's title names it: ``SegFormer-B1`` or ``U-Net``."""
    return "SegFormer-" + s.arch.split("-")[1].upper() if s.arch.startswith("segformer") else "U-Net"


def _model_name(s) -> str:
    """The model as the card describes it: the architecture, and for the U-Net its library and widths."""
    if s.arch.startswith("segformer"):
        return _architecture(s)
    features = dict(s.arch_options).get("features")
    return "U-Net (MONAI BasicUNet" + (f", widths {', '.join(map(str, features))}" if features else "") + ")"


def _card_opening(build) -> list[str]:
    """The title, intended use and how the model was made."""
    s = build.settings
    split, base, leverage = build.pipeline.outputs("split"), build.pipeline.outputs("base"), build.pipeline.outputs("leverage")
    return [
        f"# Reference model card: adult glioma, {_architecture(s)}",
        "",
        "**Intended use: research only, not clinical use.** This model segments adult glioma on skull-stripped, co-registered "
        "BraTS-style MRI (T1, T1c, T2, FLAIR; a missing sequence is set to the brain mean) so that its sparse-autoencoder "
        "latents can be inspected and steered with SegLens. It was trained on "
        f"{len(split['train'])} real cases: it is a reference for the method, not a clinical segmenter, and it has not been "
        "validated for any diagnostic purpose.",
        "",
        "## How it was made",
        f"- `seglens build-reference --data ../shared/data{' --arch unet' if s.arch == 'unet' else ''} --out reference-build` (every "
        "figure below was measured by that build, on the weights in this bundle; its log is `build.log` beside this card).",
        f"- Model: {_model_name(s)}, trained from scratch on the four BraTS sequences, axial slices of the brain's bounding box "
        f"(plus 8 voxels) at {s.image_size} px (about 1 mm per pixel); hook point `{leverage['hook']}` (chosen by leverage, below).",
        f"- Training: {base['epochs']} epochs of {s.slices_per_epoch} slices (batch {s.batch_size}, AdamW lr {s.learning_rate}, "
        f"{s.warmup_steps} warm-up steps then cosine decay, weight decay {s.weight_decay}, flips, rotation, scaling, intensity "
        f"jitter, modality dropout {s.modality_dropout}, {s.precision} autocast, seed {s.seed}); weights kept: "
        + ("the last epoch (the schedule anneals to 0; one validation case is too noisy to pick an epoch by)" if s.keep == "last"
           else f"the best validation epoch ({base['best_epoch']})")
        + f"; wall time {base['seconds'] / 60:.0f} min on {_training_hardware(base)}.",
        f"- Trained on: {', '.join(split['train'])}.",
        f"- Validated on (checkpoint choice only): {', '.join(split['validation'])}.",
        f"- Never trained on nor used for any choice: {', '.join(split['test'])} (BraTS 2018 test cases, one per acquisition "
        f"group) and {', '.join(split['brats2013'])} (BraTS 2013, another release and protocol, T1c and FLAIR only).",
        "",
    ]


def _segmentation_section(split: dict, evaluation: dict, arch: str) -> list[str]:
    test, shifted = evaluation["segmentation"]["test"], evaluation["segmentation"]["brats2013"]
    mean = test["mean"]
    return [
        "## Segmentation on held-out cases",
        "Dice per class (NC necrotic core, ED edema, ET enhancing tumour) and region (WT whole tumour, TC tumour core):",
        "",
        _table(test["cases"] + [{"case": "**mean**", **test["mean"]}], ["case", "dice_NC", "dice_ED", "dice_ET", "dice_WT", "dice_TC"],
               ["case", "NC", "ED", "ET", "WT", "TC"]),
        "",
        f"- Whole tumour {_goal('dice_WT', mean['dice_WT'])}; tumour core {_goal('dice_TC', mean['dice_TC'])}; "
        f"enhancing tumour {_goal('dice_ET', mean['dice_ET'])}.",
        f"- {_intervals(test['cases'])}",
        *([f"- What would reach the missed goals: more training cases ({len(split['train'])} here; adult BraTS models that reach "
           "about 0.90 / 0.80 / 0.75 train on hundreds), and a GPU for a larger model at full resolution ("
           + ("SegFormer-B1 at 256 px" if arch.startswith("segformer") else "a wider U-Net at 192 px or more")
           + "), which two CPU cores cannot train in hours."]
          if any(mean[key] < GOALS[key] for key in ("dice_WT", "dice_TC", "dice_ET")) else []),
        "- BraTS 2013 cases (T1 and T2 missing, set to the brain mean; another site):",
        "",
        _table(shifted["cases"] + [{"case": "**mean**", **shifted["mean"]}], ["case", "dice_NC", "dice_ED", "dice_ET", "dice_WT", "dice_TC"],
               ["case", "NC", "ED", "ET", "WT", "TC"]),
        "",
        f"- {_intervals(shifted['cases'])}",
        "",
    ]


def _sae_section(leverage: dict, sae: dict, labels: dict, evaluation: dict) -> list[str]:
    sae_metrics, chosen = evaluation["sae"], sae["chosen"]
    return [
        "## Sparse autoencoder",
        f"- BatchTopK, k {chosen['k']}, expansion {chosen['expansion']} ({chosen['k']} active latents on average of {chosen['expansion']} x d), trained on "
        f"every brain position of the training and validation cases at `{leverage['hook']}`"
        + (f"; dead latents resampled every {sae['resample_every']} steps in the first half of training." if sae.get("resample_every")
           else "; dead latents not resampled (the auxiliary loss only)."),
        f"- On the test cases' activations (never trained on): explained variance {_goal('explained_variance', sae_metrics['explained_variance'])}, "
        f"L0 {sae_metrics['l0']:.1f}, dead latents {_goal('dead_fraction', sae_metrics['dead_fraction'])}, Dice recovered "
        f"{_goal('dice_recovered', sae_metrics['dice_recovered'])}.",
        f"- Setting chosen from a sweep (two seeds each; `seed_shared`: share of live latents the other seed finds again at tau 0.8): {sae['why']}.",
        "",
        _table(sae["sweep"], ["k", "expansion", "explained_variance", "dead_fraction", "l0", "seed_shared", "live", "steps"]
               + [c for c in READABILITY_COLUMNS if any(c in row for row in sae["sweep"])]),  # fmt: skip
        "",
        "- Latent labels (`latents.json`, automatic interpretation over the training cases): "
        + ", ".join(f"{k} {v}" for k, v in sorted(labels["categories"].items(), key=lambda kv: -kv[1]))
        + (f"; split-half stability {labels['stability']:.2f}." if labels.get("stability") is not None else "."),
        *_label_mass_lines(labels.get("label_mass")),
        *_replication_lines(labels.get("replication")),
        "",
    ]


def _leverage_section(leverage: dict) -> list[str]:
    aimed = all("aim_gain" in row for row in leverage["summary"])  # builds since the hook is chosen by aim
    return [
        "## Hook point: leverage",
        "Scaling each case's five most active tumour latents by alpha at each hook (quick SAE per hook; 'moved': share of the "
        "predicted tumour whose label changes, mean over the alpha grid; oracle gains read the ground truth: upper bounds):",
        "",
        _table(leverage["summary"], ["hook", "grid", "d_in", "moved", "voxels_per_alpha", "oracle_gain_WT", "oracle_gain_mean"]
               + (["aim_gain"] if aimed else [])),  # fmt: skip
        "",
        f"Measured on {', '.join(leverage['cases'])}. Chosen: `{leverage['hook']}`"
        + (" (the largest aim gain: the mean Dice change of hint fixes after 3 simulated clicks on the aim cases, then 'moved')."
           if aimed else "."),
        "",
    ]


def _populations_section(populations: dict) -> list[str]:
    return [
        "## Populations (alignment files)",
        "Models fine-tuned from this one, an SAE on each (independent seed), aligned with this SAE by encoder and decoder cosines "
        "(Hungarian, tau 0.8). Shared: share of this SAE's live latents with a live shared partner. Floors: the same measure "
        f"between two seeds on the same data ({populations['floors']['seed']:.2f}) and between this SAE and one trained on 80 % "
        f"of the positions ({populations['floors']['resample']:.2f}).",
        "",
        _table([{"population": n, **r, "vs floors": _against_floors(r["live_shared"], populations["floors"])}
                for n, r in populations["populations"].items()], ["population", "live_shared", "shared_fraction", "vs floors"]),  # fmt: skip
        "",
        "- 'vs floors': a population whose share falls between the floors is no further from this SAE than a retrained SAE "
        "on the same data, so its 'population-specific' latents cannot be told apart from training noise; only one below "
        "both floors differs by more. The floors themselves vary from seed to seed (docs/measurements/seed-agreement.md).",
        "",
        "- brats2013: the 3 BraTS 2013 cases (another site and protocol). ssa: SSA-like degraded copies of the training cases "
        "(`seglens degrade --preset ssa`: low SNR, bias field, thick slices). pediatric: synthetic pediatric phantoms (no real "
        "pediatric case is available here), labelled as synthetic.",
        "",
    ]


def _against_floors(shared: float, floors: dict) -> str:
    """Where a population's shared share lies against the seed and resampling floors (the lower the share, the more
    the population's SAE differs from this one)."""
    low, high = sorted((floors["seed"], floors["resample"]))
    if shared < low:
        return "below both floors"
    if shared < high:
        return "between the floors"
    return "at or above both floors"


def _steering_section(s, repair: dict) -> list[str]:
    return [
        "## Steering real failures",
        f"Failure cases: the test cases under SSA-like acquisition (strengths {', '.join(f'x{v:g}' for v in s.repair_strengths)}), "
        + (f"without {', '.join(s.repair_missing)}, " if s.repair_missing else "") + "and BraTS 2013 cases; a failure has mean Dice < 0.6 or lost "
        f">= 0.10 against its clean case ({sum(f['failure'] for f in repair['failures'])} of {len(repair['failures'])}). Mean "
        "change per class with 95 % bootstrap intervals; 'vs random control': paired difference to the same choice with random "
        "latents. Oracle rows read each case's ground truth (upper bounds); calibrated rows choose alpha on the other patients' "
        "failures; ground-truth-free rows need no label at all (what `seglens steer --suggest` and the module's *Suggest a "
        "correction* do).",
        "",
        _table(repair["summary"], ["arm", "cases", "recovered", "dice_mean", "dice_WT", "dice_ED", "voxels_changed", "vs random control"]),
        "",
        *steering_verdict(repair["summary"]),
        "",
    ]


def _label_mass_lines(measured: dict | None) -> list[str]:
    """Whether the tumour labels hold on the test cases (:func:`~SegLensLogic.interpretation.label_mass.label_mass`)."""
    if not measured or not measured.get("latents"):
        return []
    ideal = measured.get("ideal") or {}

    def bounds(c: str) -> str:  # what a latent firing evenly scores, and the most any latent of this grid can
        return f"chance {measured['chance'].get(c, 0.0):.1%}" + (f", an ideal latent at this grid {ideal[c]:.0%}" if c in ideal else "")

    by_category = "; ".join(f"{c} {v['in_class']:.0%} over {v['latents']} latent(s) ({bounds(c)})" for c, v in measured["by_category"].items())
    return [
        f"- Do the labels hold on the {measured['cases']} test cases? Share of a tumour-labelled latent's whole-volume heatmap "
        f"(what the panel shows) inside its class: mean {measured['mean_in_class']:.0%} (goal >= {measured['holds_at']:.0%}; "
        f"{measured['holding']} of {measured['fired']} latents reach it), inside any tumour {measured['mean_in_tumour']:.0%}; "
        f"{by_category}. Where the labeller's top-slice share and this measure disagree, trust this one: it is what a "
        "heatmap layer shows on a new case." + _reading_guide(measured),
        *([] if not ideal else [
            "- An ideal latent is one whose value on each feature-grid cell is the share of the cell inside the class: "
            "upsampled like any heatmap, it is the most a latent of this hook can put inside the class, because the "
            "grid blurs every heatmap across class borders (docs/measurements/label-resolution.md)."]),
    ]


def _replication_lines(measured: dict | None) -> list[str]:
    """How many latents an SAE of another seed finds again (:func:`~SegLensLogic.alignment.replication.replication`)."""
    if not measured:
        return []
    return [
        f"- Found again by another seed (an SAE of seed {measured['replica_seed']} on the same activations, by the diffing rule "
        f"at tau {measured['tau']}): {measured['tumour_replicating']} of the {measured['tumour_live']} live tumour-labelled "
        f"latents, {measured['live_shared']:.0%} of all {measured['live']} live latents. The panel's *Other seed* column "
        "marks them; a latent another seed does not find may be an accident of training, so weigh a population-specific "
        "call on it accordingly.",
    ]


def _reading_guide(measured: dict) -> str:
    """Which labels a user can read as named on a new case, and which only as "fires on tumour", by the measure above
    (docs/measurements/label-volume-rule.md: class by class, the share on training cases does not predict it)."""
    categories, holds = measured["by_category"], measured["holds_at"]
    named = [c for c, v in categories.items() if v["in_class"] >= holds]
    tumour = [c for c, v in categories.items() if v["in_class"] < holds and v["in_tumour"] >= 0.5]
    parts = []
    if named:
        parts.append(f"Read as named: {', '.join(named)} (at least {holds:.0%} in class on average).")
    if tumour:
        parts.append(f"Read as \"fires on tumour\", not as the class: {', '.join(tumour)} (under {holds:.0%} in class, "
                     "at least half inside tumour).")  # fmt: skip
    return "" if not parts else " " + " ".join(parts)
