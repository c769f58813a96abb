"""``seglens demo``: the whole Med-SegLens method in one resumable command, on a machine with no data and no GPU.

Steps (each writes into its own numbered folder of ``OUT``, built in a hidden temporary folder and renamed into
place when it is complete, then recorded in ``OUT/demo.json``):

1. ``cohorts``: synthetic cohorts (:mod:`SegLensLogic.data.phantoms` presets, :data:`PHANTOM_POPULATIONS`): adult
   (the reference), realistic shifts (pediatric, ssa, healthy) and planted features (pediatric-cyst, ssa-band:
   adult in every factor but a cyst or a band artefact whose voxel footprint is written beside the labels); each
   with ``cohort.json`` naming what it shifts. Or the ``--data`` folders (each a cohort; the first the reference).
   Every cohort is split into training and test cases.
2. ``base``: a tiny U-Net trained on the reference cohort: the shared initialisation.
3. ``models``: one model per population fine-tuned from the base (``train_segmenter(init=BASE)``), so that their
   activation spaces stay comparable. A population with other label classes (healthy: FreeSurfer structures)
   keeps the base's weights except the output layer, which is new.
4. ``evaluation``: every model on every test split with the same label classes (mean Dice).
5. ``saes``: hook-point activations (``down_2``, the middle encoder level) of each model on its own training
   cohort and a BatchTopK SAE on them, each from its own seed, with the training recipe of
   :mod:`SegLensLogic.sae.trainer`; for the floors, two replicas of every SAE: another seed on the same
   activations, and the same seed on a random 80% of them. Explained variance, L0, dead latents (on all of the
   cohort's vectors), Dice recovered, and how many principal components hold 95% of the activations' variance.
6. ``interpretation``: a labels file per SAE (``latents.json``) and galleries of a few latents per category.
7. ``alignment``: every pair of SAEs aligned by two rules, the paper's dictionary cosines (tau 0.8) and activation
   correlations at the same positions of the same images (tau 0.5), each with its seed and resampling floors for
   every SAE; diffing uses the cosines when two seeds of the reference share at least half of their live latents,
   else it falls back to activation correlations. Alignment files for both rules.
8. ``diffing``: for each population with a planted feature, the latents found specific to it (against the
   reference, by each rule) scored against the feature's footprint (:mod:`SegLensLogic.experiments.footprint`):
   precision, recall, the precision of chance, shared latents on the feature, and the same for specific latents
   that another seed of the population finds again.
9. ``experiments``: the reference model on every tumour test case: failure diagnosis, failure recovery by
   latent steering and adaptation to a shifted population, each with oracle and calibrated (cross-fitted)
   results (:mod:`SegLensLogic.experiments`).
10. ``bundles``: one bundle per population (model, SAE, labels, alignments; ``load_bundle`` opens it).
11. ``steering``: the worst failure cases opened from the reference bundle (``Bundle.open_session``),
    steered with the recovery sweep's setting, exported as a corrected mask with its recipe; the recipe is
    replayed and must give the same mask.
12. ``reference``: the shipped reference bundle (``Resources/adult-glioma-segformer``) on a real case (from the
    first ``--data`` folder, else ``$SEGLENS_DATA`` or ``../shared/data``; skipped with a note when there is none)
    under an SSA-like acquisition shift: its mask, its top latents with their labels, the bundle's suggested
    correction for that population exported with its recipe (replayed), and the bundle's measured arms table.
13. ``report``: ``OUT/13-report/report.html``, the audit report (:func:`SegLensLogic.app.report.render_report`).

Rerunning the same command continues after the last finished step; ``--overwrite`` starts over. A folder that
holds anything but a demo is refused. ``--quick`` shrinks every size (phantoms, cases, populations, training,
sweeps) to finish in under two minutes on two CPU cores (the default run: under ten); the log and the report say
so. Without a GPU the demo runs PyTorch on one thread (``threads``): models this small run faster on one thread
than on two that contend. State file ``demo.json``: ``{"format_version": 2, "kind": "seglens-demo", "options":
{"quick", "data"}, "started", "finished", "steps": {name: {"folder", "seconds", "finished", "outputs"}}}``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputFileError, SegLensError
from .pipeline import Pipeline, RunState
from ..storage import Schema, atomic_write_bytes, atomic_write_text

STATE_NAME = "demo.json"
STATE_KIND = "seglens-demo"
STATE_FORMAT_VERSION = 2  # 2: independent SAE seeds, floors per SAE, two diffing rules, footprint scores
# Realistic shifts (pediatric, ssa, healthy) and planted features with an exact footprint (pediatric-cyst, ssa-band:
# adult in every other factor), against which diffing is scored.
PHANTOM_POPULATIONS = ("adult", "pediatric", "ssa", "healthy", "pediatric-cyst", "ssa-band")
QUICK_POPULATIONS = ("adult", "healthy", "pediatric-cyst", "ssa-band")
REFERENCE = "adult"
# Diffing: the paper's dictionary cosines (tau 0.8) and, where their seed floor is below AGREEMENT_GOAL, the
# fallback of activation correlations on the same images (tau 0.5: correlations run lower than cosines).
COSINE, ACTIVATION = "cosine", "activation-correlation"
TAUS = {COSINE: 0.8, ACTIVATION: 0.5}
AGREEMENT_GOAL, DEAD_GOAL, FOOTPRINT_GOAL, CHANCE_GOAL = 0.5, 0.10, 0.8, 0.3


# -- sizes ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoSettings:
    """Every size the demo uses. ``quick`` trades fidelity for time; both fit two CPU cores (module docstring).

    Attributes:
        shape: phantom volume ``(X, Y, Z)`` in voxels (the grid spans the MNI brain: ~2.5-4 mm voxels).
        cases: phantom cases per population; ``test_cases`` of them are held out.
        image_size: model input side in pixels.
        unet_features: the tiny U-Net's widths; ``hook_point``: where SAEs read it (``down_2``, the middle of the
            five encoder levels: ``unet_features[2]`` channels at a quarter of the input side).
        base_epochs, finetune_epochs: training epochs of ``slices_per_epoch`` slices; ``train_minutes`` caps each run.
        populations: the phantom presets, the first the reference (``--data`` cohorts replace them).
        sae_k, sae_expansion, sae_steps, sae_batch: SAE sparsity, dictionary size over ``d_in``, the most training
            steps (the recipe's held-out stopping rule may end sooner) and batch; the learning rate is the recipe's
            (:func:`~SegLensLogic.sae.trainer.default_learning_rate`). Chosen by measurement on the demo's
            activations (docs/measurements/model-diffing.md): at most 10 % dead latents and explained variance above
            the earlier 256-latent, k 8 setting.
        resample_fraction: share of a cohort's activations its resampled replica SAE is trained on.
        top_k: examples per latent in interpretation; ``galleries``: gallery latents per SAE.
        alphas: the failure-recovery scale grid; ``adaptation_alphas``: the additive grid (multiplicative below).
    """

    quick: bool = False
    shape: tuple[int, int, int] = (64, 72, 40)
    cases: int = 10
    test_cases: int = 3
    image_size: int = 64
    unet_features: tuple[int, ...] = (8, 16, 32, 32, 64, 8)
    hook_point: str = "down_2"
    base_epochs: int = 8
    finetune_epochs: int = 3
    slices_per_epoch: int = 256
    train_minutes: float = 1.0
    populations: tuple[str, ...] = PHANTOM_POPULATIONS
    sae_k: int = 8
    sae_expansion: int = 2
    sae_steps: int = 600
    sae_batch: int = 512
    resample_fraction: float = 0.8
    top_k: int = 12
    galleries: int = 8
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 2.0, 4.0, 8.0)
    adaptation_alphas: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    multiplicative_alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)

    @classmethod
    def for_run(cls, quick: bool) -> "DemoSettings":
        if not quick:
            return cls()
        return cls(quick=True, shape=(48, 56, 24), cases=6, test_cases=2, image_size=48, base_epochs=6, finetune_epochs=2,
                   slices_per_epoch=128, train_minutes=0.4, populations=QUICK_POPULATIONS, sae_steps=150, sae_batch=256, top_k=6, galleries=4, alphas=(0.0, 0.5, 2.0, 8.0), adaptation_alphas=(-1.0, 0.0, 1.0),
                   multiplicative_alphas=(0.5, 1.0, 2.0))  # fmt: skip

    def describe(self, real: bool = False) -> str:
        cohorts = ("real cohorts, " if real else
                   f"{len(self.populations)} phantom populations of {'x'.join(map(str, self.shape))} voxels, {self.cases} cases each "
                   f"({self.test_cases} held out), ")
        return (
            f"{'QUICK run (reduced sizes)' if self.quick else 'default run'}: {cohorts}U-Net widths {list(self.unet_features)} at "
            f"{self.image_size} px, SAEs at {self.hook_point}, k {self.sae_k} x expansion {self.sae_expansion}"
            + (" (the paper uses k 32, expansion 16)" if self.quick or self.sae_k < 32 else "")
        )


# -- state and steps ------------------------------------------------------------------------------------------------
def _options_text(options: Any) -> str:
    if not isinstance(options, dict):
        return "unknown options"
    text = "--quick" if options.get("quick") else "default sizes"
    if options.get("hook"):
        text += f", --hook {options['hook']}"
    if options.get("data"):
        data = options["data"]
        text += ", --data " + (" ".join(map(str, data)) if isinstance(data, list) else str(data))
    return text


class DemoOptions(Schema):
    quick: bool
    data: list[str] | None = None
    hook: str | None = None


def open_state(out: Path, options: dict, overwrite: bool = False, log: Callable[[str], None] = print) -> Pipeline:
    """The demo's resumable state in ``out`` (:class:`~SegLensLogic.app.pipeline.Pipeline`): continued, started
    over (``overwrite``), or refused when ``out`` holds something else or a run with other options."""
    return Pipeline(out, STATE_KIND, STATE_NAME, options, [(name, title) for name, title, _ in STEPS], overwrite, log,
                    label="SegLens demo", format_version=STATE_FORMAT_VERSION, document=DemoStateDocument,
                    numbered=True, staged=True, describe_options=_options_text)  # fmt: skip


class DemoStateDocument(RunState):
    """``demo.json`` (module docstring): a run state whose options are the demo's."""

    options: DemoOptions


@dataclass
class Demo:
    """One demo run: where it writes, its sizes, its state and its log."""

    out: Path
    settings: DemoSettings
    data: list[Path] | None
    pipeline: Pipeline
    log: Callable[[str], None]
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def path(self, relative: str) -> Path:
        return self.out / relative

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.out.resolve()).as_posix()

    def sub(self, message: str) -> None:
        self.log(f"        {message}")


# -- helpers --------------------------------------------------------------------------------------------------------
def _quiet(_message: str) -> None:
    pass


def _load_cohorts(demo: Demo, split: str):
    """``{name: Cohort}`` of the ``train`` or ``test`` split of every cohort."""
    from ..data.cohort import load_cohort

    cohorts = demo.pipeline.outputs("cohorts")["cohorts"]
    return {c["name"]: load_cohort(demo.path(c[split]) if not Path(c[split]).is_absolute() else Path(c[split]), name=f"{c['name']}-{split}")
            for c in cohorts}  # fmt: skip


def _cohort_records(demo: Demo) -> list[dict]:
    return demo.pipeline.outputs("cohorts")["cohorts"]


def _link_cases(cases, folder: Path, within: Path | None = None) -> Path:
    """A cohort folder of symlinks to case folders (no image is copied); links to cases inside ``within`` (the
    step's folder, renamed when the step ends) are relative."""
    folder.mkdir(parents=True)
    for case in cases:
        source = case.folder.resolve()
        inside = within is not None and within.resolve() in source.parents
        os.symlink(os.path.relpath(source, folder.resolve()) if inside else source, folder / source.name)
    return folder


def _training_options(demo: Demo, epochs: int, learning_rate: float, seed: int):
    from ..segmentation.training import TrainingOptions

    s = demo.settings
    return TrainingOptions(epochs=epochs, minutes=s.train_minutes, batch_size=16, learning_rate=learning_rate,
                           slices_per_epoch=s.slices_per_epoch, val_cases=1, seed=seed)  # fmt: skip


def _write_json(path: Path, document: Any) -> Path:
    return atomic_write_text(path, json.dumps(document, indent=2, default=_json_default) + "\n")


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


# -- 1. cohorts -----------------------------------------------------------------------------------------------------
def step_cohorts(demo: Demo, folder: Path) -> dict:
    from ..data.cohort import load_cohort
    from ..data.phantoms import read_cohort_manifest, write_phantom_cohort

    s = demo.settings
    records = []
    if demo.data is None:
        for index, population in enumerate(s.populations):
            start = time.monotonic()
            target = folder / population / "all"
            write_phantom_cohort(target, s.cases, seed=1000 * index, shape=s.shape, population=population)
            cohort = load_cohort(target, name=population)
            manifest = read_cohort_manifest(target)
            train = _link_cases(cohort.cases[: -s.test_cases], folder / population / "train", within=folder)
            test = _link_cases(cohort.cases[-s.test_cases :], folder / population / "test", within=folder)
            records.append({
                "name": population, "population": population, "source": f"MNI152 phantoms ({population} preset)",
                "n_cases": len(cohort), "train": demo.rel(train), "test": demo.rel(test), "manifest": demo.rel(target / "cohort.json"),
                "label_scheme": manifest["label_scheme"], "shifted_factors": manifest["shifted_factors"],
                "feature": (manifest.get("feature") or {}).get("name"),
            })  # fmt: skip
            factors = ", ".join(manifest["shifted_factors"]) or "none (the reference)"
            demo.sub(f"{population}: {len(cohort)} phantoms ({s.test_cases} held out), shifted vs adult: {factors} ({time.monotonic() - start:.1f} s)")
    else:
        names = []
        for path in demo.data:
            cohort = load_cohort(path)
            name = cohort.name if cohort.name not in names else f"{cohort.name}-{len(names)}"
            names.append(name)
            labelled = [c for c in cohort if c.label is not None]
            if len(labelled) < 3:
                raise InputFileError(path, f"holds {len(labelled)} labelled case(s); the demo needs at least 3 per cohort (2 to train, 1 to test)")
            n_test = max(1, min(s.test_cases, len(labelled) // 3))
            train = _link_cases(labelled[:-n_test], folder / name / "train")
            test = _link_cases(labelled[-n_test:], folder / name / "test")
            from ..data.cases import read_case

            scheme = read_case(labelled[0]).label_scheme.name
            records.append({
                "name": name, "population": "-", "source": str(path), "n_cases": len(labelled), "train": demo.rel(train),
                "test": demo.rel(test), "manifest": None, "label_scheme": "aseg" if scheme == "aseg" else "brats2023",
                "shifted_factors": None, "feature": None,
            })  # fmt: skip
            demo.sub(f"{name}: {len(labelled)} labelled cases from {path} ({n_test} held out)")
        if records[0]["label_scheme"] != "brats2023":
            raise InputFileError(demo.data[0], "the first --data cohort is the reference and must have tumour labels")
    return {"cohorts": records, "reference": records[0]["name"]}


def _modalities(demo: Demo) -> list[str]:
    """Modalities every cohort has (all four for phantoms; e.g. t1c and t2f with BraTS 2013 among --data)."""
    cohorts = _load_cohorts(demo, "train")
    common = None
    for cohort in cohorts.values():
        have = set(cohort.modalities)
        common = have if common is None else common & have
    order = [m for m in ("t1n", "t1c", "t2w", "t2f") if m in (common or set())]
    if not order:
        raise SegLensError("the --data cohorts share no modality; a single base model cannot take them all")
    return order


# -- 2. base model ------------------------------------------------------------------------------------------------
def step_base(demo: Demo, folder: Path) -> dict:
    from ..segmentation.training import train_segmenter

    s = demo.settings
    reference = demo.pipeline.outputs("cohorts")["reference"]
    cohort = _load_cohorts(demo, "train")[reference]
    modalities = _modalities(demo)
    demo.sub(f"U-Net {list(s.unet_features)} at {s.image_size} px on '{reference}' ({len(cohort)} cases, {', '.join(modalities)}), "
             f"{s.base_epochs} epochs of {s.slices_per_epoch} slices, device {demo.device.type}")  # fmt: skip
    result = train_segmenter(
        cohort, folder / "model", arch="unet", modalities=modalities, image_size=s.image_size,
        arch_options={"features": list(s.unet_features)}, options=_training_options(demo, s.base_epochs, 1e-2, seed=0), log=_quiet,
    )  # fmt: skip
    result.model.config.hook_point = s.hook_point  # every fine-tuned model inherits it
    result.model.save_pretrained(folder / "model", overwrite=True)
    demo.sub(f"best epoch {result.best_epoch}: validation Dice {result.best_scores.get('dice_mean', float('nan')):.3f}")
    return {"model": demo.rel(folder / "model"), "cohort": reference, "best_validation": result.best_scores}


# -- 3. population models ---------------------------------------------------------------------------------------------
def step_models(demo: Demo, folder: Path) -> dict:
    from ..data.labels import get_scheme
    from ..segmentation.training import init_with_new_head, train_segmenter

    s = demo.settings
    base = demo.path(demo.pipeline.outputs("base")["model"])
    cohorts = _load_cohorts(demo, "train")
    models = {}
    for index, record in enumerate(_cohort_records(demo)):
        name = record["name"]
        start = time.monotonic()
        init, epochs, learning_rate = base, s.finetune_epochs, 3e-3
        if record["label_scheme"] != "brats2023":
            scheme = get_scheme(record["label_scheme"])
            init = init_with_new_head(base, list(scheme.class_names), scheme.name, folder / f".{name}-init")
            learning_rate = 1e-2  # a new output layer learns from scratch
        result = train_segmenter(cohorts[name], folder / name, init=init,
                                 options=_training_options(demo, epochs, learning_rate, seed=index + 1), log=_quiet)  # fmt: skip
        if init != base:
            shutil.rmtree(init)
        models[name] = {"model": demo.rel(folder / name), "validation_dice": result.best_scores.get("dice_mean"),
                        "new_head": init != base}  # fmt: skip
        head = " (new output layer for its classes)" if init != base else ""
        demo.sub(f"{name}: fine-tuned from the base{head}, validation Dice {result.best_scores.get('dice_mean', float('nan')):.3f} "
                 f"({time.monotonic() - start:.1f} s)")  # fmt: skip
    return {"models": models}


def _load_model(demo: Demo, name: str):
    from ..networks import load_segmenter

    return load_segmenter(demo.path(demo.pipeline.outputs("models")["models"][name]["model"]), device=demo.device)


# -- 4. evaluation --------------------------------------------------------------------------------------------------
def step_evaluation(demo: Demo, folder: Path) -> dict:
    from ..segmentation.evaluation import evaluate_cohort, write_csv

    tests = _load_cohorts(demo, "test")
    records = {r["name"]: r for r in _cohort_records(demo)}
    dice: dict[str, dict[str, float]] = {}
    for name in demo.pipeline.outputs("models")["models"]:
        model = _load_model(demo, name)
        dice[name] = {}
        for cohort_name, cohort in tests.items():
            if (records[cohort_name]["label_scheme"] == "aseg") != (model.config.label_scheme == "aseg"):
                continue  # other label classes: nothing to score against
            rows = evaluate_cohort(model, cohort)
            write_csv(rows, folder / f"{name}-on-{cohort_name}.csv")
            dice[name][cohort_name] = float(rows[-1]["dice_mean"])
        demo.sub(f"model {name}: " + ", ".join(f"{c} {d:.3f}" for c, d in dice[name].items()))
    _write_json(folder / "dice.json", dice)
    return {"dice": dice}


# -- 5. SAEs --------------------------------------------------------------------------------------------------------
def step_saes(demo: Demo, folder: Path) -> dict:
    """An SAE per population model on its own training activations, each from its own seed (the population's
    index), and two replicas of each for the floors (:func:`replica_names`): another seed on the same activations,
    and the same seed on a random ``resample_fraction`` of them. Dead latents are counted on all of the cohort's
    activation vectors (the held-out figure of the training report, on a few hundred vectors, misses rare latents)."""
    from ..alignment.cohorts import replica_names
    from ..data.cohort import Cohort
    from ..sae import ExtractionOptions, SAETrainingOptions, extract_activations, train_sae
    from ..sae.activations import effective_dimensions
    from ..steering.dice_recovered import dice_recovered
    from ..alignment.replication import live_latents
    from ..sae.trainer import save_training_report

    s = demo.settings
    trains, tests = _load_cohorts(demo, "train"), _load_cohorts(demo, "test")
    reference = demo.pipeline.outputs("cohorts")["reference"]
    names = list(trains)
    saes, replicas = {}, {}
    jobs = []
    for index, name in enumerate(names):
        seed = index  # independent seeds: no two cohort SAEs start from one dictionary
        replicas[name] = replica_names(name)
        jobs += [(name, name, 1.0, seed), (name, replicas[name]["seed"], 1.0, seed + len(names)),
                 (name, replicas[name]["resampled"], s.resample_fraction, seed)]  # fmt: skip
    stores, vectors, dimensions = {}, {}, {}
    for model_name, sae_name, fraction, seed in jobs:
        start = time.monotonic()
        model = _load_model(demo, model_name)
        model_dir = demo.path(demo.pipeline.outputs("models")["models"][model_name]["model"])
        key = (model_name, fraction)
        if key not in stores:
            suffix = "" if fraction == 1.0 else f"-{round(100 * fraction)}pct"
            stores[key] = extract_activations(model, trains[model_name], folder / "activations" / f"{model_name}{suffix}",
                                              ExtractionOptions(subsample=fraction, seed=1), model_dir=model_dir, log=_quiet)  # fmt: skip
        store = stores[key]
        if model_name not in vectors:
            vectors[model_name] = stores[(model_name, 1.0)].vectors(np.arange(len(stores[(model_name, 1.0)])))
            dimensions[model_name] = effective_dimensions(vectors[model_name])
        options = SAETrainingOptions(k=s.sae_k, expansion=s.sae_expansion, batch_size=s.sae_batch, epochs=1000, max_steps=s.sae_steps,
                                     holdout_fraction=0.1, eval_every=100, log_every=10**6, seed=seed)  # fmt: skip
        sae, report = train_sae(store, options, device=demo.device, log=_quiet)
        sae.save(folder / sae_name)
        save_training_report(report, folder / sae_name)
        holdout = report.get("holdout", {})
        live = live_latents(sae, vectors[model_name])
        record = {"sae": demo.rel(folder / sae_name), "model": model_name, "seed": seed, "activations_fraction": fraction,
                  "d_sae": sae.config.d_sae, "k": sae.config.k, "explained_variance": holdout.get("explained_variance"),
                  "l0": holdout.get("l0"), "dead_fraction": float(1 - live.mean()), "dead_fraction_holdout": holdout.get("dead_fraction"),
                  "live": int(live.sum()), "live_latents": np.flatnonzero(live).tolist(), "steps": report["steps"], "vectors": len(store)}  # fmt: skip
        if sae_name == model_name:
            recovered = dice_recovered(model, sae, Cohort(model_name, list(tests[model_name])))
            record.update({key: (None if not np.isfinite(recovered[key]) else float(recovered[key]))  # NaN: the model scores 0
                           for key in ("dice_model", "dice_sae", "dice_recovered")})
        saes[sae_name] = record
        recovered_text = f", Dice {record['dice_sae']:.3f} with it vs {record['dice_model']:.3f}" if record.get("dice_sae") is not None else ""
        demo.sub(f"{sae_name}: {sae.config.d_sae} latents (k {sae.config.k}, seed {seed}) on {len(store)} vectors, {report['steps']} steps, "
                 f"EV {record['explained_variance']:.3f}, L0 {record['l0']:.1f}, dead {record['dead_fraction']:.2f} of the cohort's vectors"
                 f"{recovered_text} ({time.monotonic() - start:.1f} s)")  # fmt: skip
    demo.sub("principal components holding 95% of the activations' variance: " + ", ".join(f"{n} {d}" for n, d in dimensions.items())
             + f" (of {next(iter(saes.values()))['d_sae'] // s.sae_expansion} channels)")
    return {"saes": saes, "reference": reference, "replicas": replicas, "effective_dimensions": dimensions}


def _sae_dir(demo: Demo, name: str) -> Path:
    return demo.path(demo.pipeline.outputs("saes")["saes"][name]["sae"])


def _population_names(demo: Demo) -> list[str]:
    return [r["name"] for r in _cohort_records(demo)]


# -- 6. interpretation ------------------------------------------------------------------------------------------------
def step_interpretation(demo: Demo, folder: Path) -> dict:
    from ..interpretation import interpret_sae, write_latent_labels
    from .interpretation_commands import gallery_choice
    from ..interpretation.figures import render_category_chart, write_galleries
    from ..sae import BatchTopKSAE

    s = demo.settings
    trains = _load_cohorts(demo, "train")
    out = {}
    for name in _population_names(demo):
        start = time.monotonic()
        model, sae_dir = _load_model(demo, name), _sae_dir(demo, name)
        model_dir = demo.path(demo.pipeline.outputs("models")["models"][name]["model"])
        sae = BatchTopKSAE.load(sae_dir)
        result = interpret_sae(model, sae, trains[name], top_k=s.top_k, splits=2, model_dir=model_dir, sae_dir=sae_dir)
        labels_path = write_latent_labels(result.document, folder / name / "latents.json")
        render_category_chart(result.document, folder / name / "categories.png")
        chosen = gallery_choice(result.document, s.galleries)
        write_galleries(result.cohort, result.document, folder / name / "galleries", model.config.modalities, model.config.image_size,
                        latents=chosen, examples=4)  # fmt: skip
        thumbnails = _thumbnails(result, chosen, model, folder / name / "thumbnails")
        counts = result.category_counts()
        agreement = result.stability.agreement if result.stability is not None else None
        out[name] = {"labels": demo.rel(labels_path), "categories": counts, "stability": agreement,
                     "galleries": [demo.rel(folder / name / "galleries" / f"latent_{j:05d}.png") for j in chosen],
                     "thumbnails": {str(j): demo.rel(p) for j, p in thumbnails.items()}}  # fmt: skip
        demo.sub(f"{name}: " + ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                 + (f"; split-half agreement {agreement:.2f}" if agreement is not None else "") + f" ({time.monotonic() - start:.1f} s)")  # fmt: skip
    return {"labels": out}


def _thumbnails(result, latents: list[int], model, folder: Path) -> dict[int, Path]:
    """One PNG per latent for the report: its strongest example slice with the heatmap over the image."""
    from ..interpretation.top_slices import upsample
    from ..interpretation.figures import load_display_slices
    from .report import array_png

    folder.mkdir(parents=True, exist_ok=True)
    full = result.cohort.full
    out = {}
    for j in latents:
        if full.count(j) == 0:
            continue
        c, z = int(full.case[j, 0]), int(full.slice[j, 0])
        slices = load_display_slices(result.cohort.case_folders[c], model.config.modalities, model.config.image_size, [z])
        image, _label, brain = slices[z]
        heat = upsample(full.maps[j, 0][None].astype(np.float32), slices["geometry"])[0]
        image = np.where(brain, image, image[brain].min() if brain.any() else 0)  # black, not z-score 0 grey, outside
        # RAS (X, Y) -> display rows from anterior (top) to posterior, patient right on the left (radiological)
        png = array_png(image.T[::-1], np.where(brain, heat, 0).T[::-1])
        out[j] = atomic_write_bytes(folder / f"latent_{j:05d}.png", png)
    return out


# -- 7. alignment ---------------------------------------------------------------------------------------------------
def _live_latents(demo: Demo, name: str) -> np.ndarray:
    """``(d_sae,)`` bool: latents of an SAE (a population's or a replica's) that fire on its cohort's activation vectors."""
    record = demo.pipeline.outputs("saes")["saes"][name]
    live = np.zeros(record["d_sae"], dtype=bool)
    live[record["live_latents"]] = True
    return live


def step_alignment(demo: Demo, folder: Path) -> dict:
    """Every pair of population SAEs aligned twice, with the floors of each method beside it.

    ``cosine``: the paper's rule (encoder and decoder cosines, tau 0.8). ``activation-correlation``: the
    correlation of two SAEs' latent activations at the same positions of the same images (those of both cohorts;
    each SAE encodes its own model's activations; tau 0.5). For every population, both floors by the same method:
    the share of its SAE's live latents that another seed on the same activations finds again (seed floor), and
    that the same seed on resampled activations finds again (resampling floor). Diffing uses the cosine rule when
    the reference's seed floor reaches ``AGREEMENT_GOAL``, else it falls back to activation correlations; the
    alignment files (reference against each population, and each SAE against its replicas) are written for both.
    """
    from ..alignment import alignment_document, sae_record, write_alignment
    from ..alignment.latent_alignment import align_saes, tau_sweep
    from ..alignment.cohorts import CohortDiff, replica_floors
    from ..alignment.spaces import alignment_from_correlations, shared_image_correlations
    from ..sae import BatchTopKSAE

    names = _population_names(demo)
    outputs = demo.pipeline.outputs("saes")
    reference = outputs["reference"]
    replicas = outputs["replicas"]
    saes = {n: BatchTopKSAE.load(_sae_dir(demo, n)) for name in names for n in (name, *replicas[name].values())}
    models = {name: _load_model(demo, name) for name in names}
    live = {n: _live_latents(demo, n) for n in saes}
    trains = _load_cohorts(demo, "train")
    cases = [case for name in names for case in trains[name]]
    owner = [name for name in names for _ in trains[name]]
    indices = {name: [i for i, o in enumerate(owner) if o == name] for name in names}

    # Activation correlations of every pair and of every SAE with its replicas, each case read once.
    start = time.monotonic()
    members = {n: (models[name], saes[n]) for name in names for n in (name, *replicas[name].values())}
    pairs = {(a, b): (a, b, indices[a] + indices[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    pairs.update({(name, r): (name, r, indices[name]) for name in names for r in replicas[name].values()})
    correlations = shared_image_correlations(members, pairs, cases)
    demo.sub(f"activation correlations of {len(pairs)} SAE pairs on {len(cases)} cases ({time.monotonic() - start:.1f} s)")

    def align(method: str, a: str, b: str):
        if method == COSINE:
            return align_saes(saes[a], saes[b], tau=TAUS[COSINE])
        return alignment_from_correlations(*correlations[(a, b)], tau=TAUS[ACTIVATION])

    methods = {}
    files: dict[str, dict] = {}
    for method in (COSINE, ACTIVATION):
        alignments = {(i, j): align(method, a, b) for i, a in enumerate(names) for j, b in enumerate(names) if i < j}
        diff = CohortDiff(names, alignments, TAUS[method])
        matrix = diff.live_fraction_matrix([live[name] for name in names])
        floors, floor_files = {}, {}
        for name in names:
            floors[name] = {}
            for kind, (alignment, share) in replica_floors(name, replicas[name], partial(align, method), live).items():
                replica = replicas[name][kind]
                floors[name][kind] = share
                document = alignment_document(alignment, sae_record(saes[name], _sae_dir(demo, name), name),
                                              sae_record(saes[replica], _sae_dir(demo, replica), replica), tau_sweep=tau_sweep(alignment))  # fmt: skip
                floor_files.setdefault(name, {})[kind] = demo.rel(write_alignment(document, folder / method / "floors" / f"{name}-vs-{replica}.json"))
        ref_index = names.index(reference)
        record = {"shared_fraction": floors[reference]["seed"], "resampling_floor": floors[reference]["resampled"], "method": method,
                  "replica": replicas[reference]["seed"], "resampled_replica": replicas[reference]["resampled"],
                  "of": "live latents of the reference SAE found again by another seed on the same activations "
                        "(resampling_floor: by the same seed on resampled activations)", "cohort": reference}  # fmt: skip
        files[method] = {}
        for j, name in enumerate(names):
            if name == reference:
                continue
            alignment, flipped = diff.alignment(ref_index, j)
            assert not flipped  # the reference comes first, so it is always side A
            document = alignment_document(alignment, sae_record(saes[reference], _sae_dir(demo, reference), reference),
                                          sae_record(saes[name], _sae_dir(demo, name), name), tau_sweep=tau_sweep(alignment),
                                          seed_noise_floor=record)  # fmt: skip
            files[method][name] = demo.rel(write_alignment(document, folder / method / f"{reference}-vs-{name}.json"))
        methods[method] = {"tau": TAUS[method], "fraction_shared": matrix.tolist(), "floors": floors, "floor_files": floor_files}
        row = matrix[ref_index]
        demo.sub(f"{method} (tau {TAUS[method]:g}): share of the {reference} SAE's live latents shared with "
                 + ", ".join(f"{n_} {row[k]:.2f}" for k, n_ in enumerate(names) if n_ != reference)
                 + "; floors (seed / resampled): " + ", ".join(f"{n_} {_pct(f['seed'])}/{_pct(f['resampled'])}" for n_, f in floors.items()))  # fmt: skip
    agreement = methods[COSINE]["floors"][reference]["seed"] or 0.0
    chosen = COSINE if agreement >= AGREEMENT_GOAL else ACTIVATION
    why = (f"two seeds of the {reference} SAE share {_pct(agreement)} of live latents by dictionary cosines "
           f"({'at least' if chosen == COSINE else 'below'} {AGREEMENT_GOAL:.0%})")
    demo.sub(f"diffing by {chosen}: {why}")
    chosen_record = methods[chosen]
    return {"names": names, "reference": reference, "method": chosen, "method_reason": why, "methods": methods, "files": files[chosen],
            "files_by_method": files, "fraction_shared": chosen_record["fraction_shared"], "tau": chosen_record["tau"],
            "seed_noise_floor": chosen_record["floors"][reference]["seed"], "resampling_floor": chosen_record["floors"][reference]["resampled"],
            "live": {k: len(v) for k, v in live.items()}}  # fmt: skip


# -- 8. diffing against the planted feature ---------------------------------------------------------------------------
def step_diffing(demo: Demo, folder: Path) -> dict:
    """The latents found specific to each population with a planted feature, scored against its footprint.

    For each population whose ``cohort.json`` names a planted feature: every live latent of its SAE gets the share of
    its activation mass (top slices, image resolution) on the footprint (:mod:`SegLensLogic.experiments.footprint`);
    those with most of it there are the feature latents. For each diffing method, the latents its alignment file
    against the reference calls specific (``specific_b``) are scored: precision, recall, chance and the converse
    (shared latents on the feature); and again keeping only latents another seed of the population finds again
    (its seed replica, same method): a latent seed noise made is no finding about the population.
    """
    from ..alignment import load_alignment
    from ..experiments.footprint import latent_footprint_fractions, score_against_footprint
    from ..sae import BatchTopKSAE

    s = demo.settings
    alignment = demo.pipeline.outputs("alignment")
    reference = alignment["reference"]
    records = {r["name"]: r for r in _cohort_records(demo)}
    trains = _load_cohorts(demo, "train")
    rows = []
    for name in _population_names(demo):
        feature = records[name].get("feature")
        if not feature:
            continue  # real cohorts and realistic shifts: no footprint to score against
        start = time.monotonic()
        model, sae = _load_model(demo, name), BatchTopKSAE.load(_sae_dir(demo, name))
        fractions = latent_footprint_fractions(model, sae, trains[name], top_slices=s.top_k)
        _write_json(folder / f"{name}-footprint-fractions.json", {"population": name, "feature": feature, "top_slices": fractions.top_slices,
                    "fraction": {str(j): round(f, 4) for j, f in sorted(fractions.fraction.items())},
                    "mass": {str(j): round(m, 4) for j, m in sorted(fractions.mass.items())}})  # fmt: skip
        for method in (COSINE, ACTIVATION):
            record = alignment["methods"][method]
            document = load_alignment(demo.path(alignment["files_by_method"][method][name]))
            specific, shared = document.specific("b"), document.shared("b")
            scores = score_against_footprint(fractions, specific, shared)
            seed_replica = load_alignment(demo.path(record["floor_files"][name]["seed"]))
            reproducible = set(seed_replica.shared("a"))
            filtered = score_against_footprint(fractions, [j for j in specific if j in reproducible], [j for j in shared if j in reproducible])
            rows.append({
                "reference": reference, "population": name, "feature": feature, "method": method, "tau": record["tau"],
                "used": method == alignment["method"], **{k: scores[k] for k in (
                    "n_live", "n_feature", "feature_latents", "n_specific", "n_hits", "precision", "recall", "chance_precision",
                    "chance_precision_95", "n_shared", "shared_on_feature", "shared_on_feature_fraction")},
                "reproducible_n_specific": filtered["n_specific"], "reproducible_precision": filtered["precision"],
                "reproducible_recall": filtered["recall"], "reproducible_chance_precision": filtered["chance_precision"],
                "seed_floor": record["floors"][name]["seed"], "resampling_floor": record["floors"][name]["resampled"],
                "threshold": scores["threshold"], "top_slices": scores["top_slices"],
                "best_fraction": max(fractions.fraction.values(), default=None),
            })  # fmt: skip
            demo.sub(f"{name} ({feature}), {method}: {scores['n_feature']} of {scores['n_live']} live latents on the feature; "
                     f"{scores['n_specific']} specific: precision {_num(scores['precision'])} (chance {_num(scores['chance_precision'])}), "
                     f"recall {_num(scores['recall'])}; shared on the feature {scores['shared_on_feature']} of {scores['n_shared']}; "
                     f"specific and found again by another seed: {filtered['n_specific']}, precision {_num(filtered['precision'])}")  # fmt: skip
        demo.sub(f"{name}: scored in {time.monotonic() - start:.1f} s")
    _write_json(folder / "diffing.json", rows)
    return {"rows": rows}


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- 9. experiments ---------------------------------------------------------------------------------------------------
def step_experiments(demo: Demo, folder: Path) -> dict:
    from ..experiments import Experiment, diagnose
    from ..experiments.adaptation import adaptation_report
    from ..experiments.recovery import failure_recovery_report
    from ..interpretation import load_latent_labels
    from ..sae import BatchTopKSAE

    s = demo.settings
    reference = demo.pipeline.outputs("cohorts")["reference"]
    records = {r["name"]: r for r in _cohort_records(demo)}
    tests = _load_cohorts(demo, "test")
    model = _load_model(demo, reference)
    sae = BatchTopKSAE.load(_sae_dir(demo, reference))
    labels = load_latent_labels(demo.path(demo.pipeline.outputs("interpretation")["labels"][reference]["labels"]))
    experiment = Experiment(model, sae)
    runs_by_population = {}
    for name, cohort in tests.items():
        if records[name]["label_scheme"] != "brats2023":
            continue
        runs_by_population[name] = experiment.run_cohort(cohort)
    runs = [r for rs in runs_by_population.values() for r in rs]
    population_of = {r.case_id: name for name, rs in runs_by_population.items() for r in rs}
    demo.sub(f"model '{reference}' on {len(runs)} tumour test cases: " + ", ".join(
        f"{name} {np.mean([r.base_scores['dice_mean'] for r in rs]):.3f}" for name, rs in runs_by_population.items()))

    # Diagnosis: worst cases, their most active latents and how unusual their use is against the reference's cases.
    diagnosis = diagnose(runs, reference=runs_by_population[reference], worst=min(4, len(runs)), top=3, labels=labels)
    _write_json(folder / "diagnosis.json", diagnosis)

    # Failure recovery (instance-level sweep and class-level steering), oracle and calibrated side by side.
    worst = max(2, len(runs) // 2)
    use_labels = labels if labels.latents_in_category("edema") else None
    recovery = failure_recovery_report(experiment, runs, worst=worst, alphas=s.alphas, top=1, folds=2, labels=use_labels,
                                       population="all tumour test cases")  # fmt: skip
    recovery.write(folder / "failure-recovery")
    cases3 = {row["case"]: row for row in recovery.tables["table3_cases"][1]}
    failures = []
    for row in cases3.values():
        rows_d = [d for d in diagnosis if d["case"] == row["case"]]
        failures.append({
            "population": population_of[row["case"]], "case": row["case"], "dice_before": row["base_dice_mean"],
            "dice_oracle": row["latent steering dice_mean"], "dice_calibrated": row["latent steering calibrated dice_mean"],
            "oracle alpha": row["latent steering setting"], "calibrated alpha": row["latent steering calibrated setting"],
            "steered latents": row["steered latents"],
            "diagnosis": "; ".join(f"{d['latent']} {d['category'] or '?'} z {d['z']:+.1f}" for d in rows_d) or None,
        })  # fmt: skip
    table3 = recovery.tables["table3_failure_recovery"][1]
    demo.sub(f"failure recovery on {len(failures)} worst cases: mean Dice {_method(table3, 'base model'):.3f} -> oracle "
             f"{_method(table3, 'latent steering (oracle'):.3f}, calibrated {_method(table3, 'latent steering (calibrated)'):.3f}")  # fmt: skip

    # Adaptation: the reference model on each shifted tumour population, its edema latents steered.
    adaptation = []
    for name, target in runs_by_population.items():
        if name == reference or len(target) < 2:
            continue
        try:
            report = adaptation_report(experiment, target, source=runs_by_population[reference], labels=use_labels, source_name=reference,
                                       target_name=name, additive=s.adaptation_alphas, multiplicative=s.multiplicative_alphas)  # fmt: skip
        except SegLensError as error:  # e.g. no latent of the reference is enriched on edema: nothing to steer
            demo.sub(f"adaptation {reference} -> {name}: skipped ({error})")
            continue
        report.write(folder / f"adaptation-{name}")
        table5 = report.tables["table5_adaptation"][1]
        base = _method(table5, "base model")
        for method in ("ALS", "MLS"):
            adaptation.append({"population": name, "method": f"{method} ({'additive' if method == 'ALS' else 'multiplicative'})",
                               "dice_before": base, "dice_oracle": _method(table5, f"{method} (oracle: best per case)"),
                               "dice_calibrated": _method(table5, f"{method} (calibrated")})  # fmt: skip
        demo.sub(f"adaptation {reference} -> {name}: " + ", ".join(
            f"{a['method'].split()[0]} oracle {a['dice_oracle']:.3f} / calibrated {a['dice_calibrated']:.3f}" for a in adaptation[-2:])
            + f" (base {base:.3f})")  # fmt: skip
    _write_json(folder / "summary.json", {"failure_recovery": failures, "adaptation": adaptation})
    return {"failure_recovery": failures, "adaptation": adaptation, "diagnosis": demo.rel(folder / "diagnosis.json"),
            "recovery_table": [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in table3]}  # fmt: skip


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _method(table: list[dict], prefix: str) -> float:
    row = next(r for r in table if r["method"].startswith(prefix))
    return float(row["dice_mean"])


# -- 10. bundles ------------------------------------------------------------------------------------------------------
def step_bundles(demo: Demo, folder: Path) -> dict:
    from ..bundle import build_bundle

    alignment = demo.pipeline.outputs("alignment")
    reference = alignment["reference"]
    labels = demo.pipeline.outputs("interpretation")["labels"]
    bundles = {}
    for name in _population_names(demo):
        files = list(alignment["files"].values()) if name == reference else [alignment["files"][name]]
        bundle = build_bundle(
            demo.path(demo.pipeline.outputs("models")["models"][name]["model"]), _sae_dir(demo, name), folder / name, name=name,
            labels=demo.path(labels[name]["labels"]), alignments=[demo.path(f) for f in files], cohort=name,
        )  # fmt: skip
        bundles[name] = demo.rel(bundle.root)
        demo.sub(f"{name}: {bundle.root} ({len(bundle.files)} files, {len(bundle.alignment_paths)} alignment(s))")
    return {"bundles": bundles}


# -- 11. steering ---------------------------------------------------------------------------------------------------
def step_steering(demo: Demo, folder: Path) -> dict:
    """Fix the reference population's worst failures by pointing at them: the simulated user clicks at the interior
    of the largest error (``seglens experiment hints``' protocol), the hint fix turns the clicks into latent edits,
    up to three clicks; the corrected mask is exported with its recipe, which is replayed bit for bit."""
    from ..bundle import load_bundle
    from ..data.cases import read_case
    from ..experiments import class_scores
    from ..experiments.hint_benchmark import simulate_clicks
    from ..steering import load_recipe

    reference = demo.pipeline.outputs("cohorts")["reference"]
    bundle = load_bundle(demo.path(demo.pipeline.outputs("bundles")["bundles"][reference]))
    failures = demo.pipeline.outputs("experiments")["failure_recovery"]
    tests = _load_cohorts(demo, "test")
    cases = {c.case_id: c for cohort in tests.values() for c in cohort}
    chosen = sorted(failures, key=lambda f: f["dice_before"])[:2]  # the worst failures
    steered = []
    names = bundle.class_names
    for failure in chosen:
        case = cases[failure["case"]]
        session = bundle.open_session(case, device=demo.device)
        before = session.segment()
        images = read_case(case, modalities=bundle.modalities)
        truth = images.label
        truth_ras = session.prepared.orientation.apply(truth)
        per_click = [class_scores(before, truth, names)["dice_mean"]]
        steps = list(simulate_clicks(session, truth_ras, max_clicks=3))
        for step in steps:
            per_click.append(class_scores(session.prepared.to_input_grid(step.labels_ras), truth, names)["dice_mean"])
        mask, recipe_path = session.export(folder / f"{case.case_id}-corrected.nii.gz")
        after = session.labels
        replay = bundle.open_session(case, device=demo.device)
        replayed = replay.apply_recipe(load_recipe(recipe_path), source=recipe_path)
        identical = bool(np.array_equal(replayed, after))
        dice_before, dice_after = per_click[0], class_scores(after, truth, names)["dice_mean"]
        changed = np.flatnonzero((before != after).sum(axis=(0, 1)))
        z = int(changed[np.argmax((before != after).sum(axis=(0, 1))[changed])]) if changed.size else int(np.argmax((truth > 0).sum(axis=(0, 1))))
        display = "t1c" if "t1c" in images.images else bundle.modalities[0]
        np_file = folder / f"{case.case_id}-panels.npz"
        np.savez_compressed(np_file, image=images.images[display][:, :, z].T.astype(np.float32), before=before[:, :, z].T,
                            after=after[:, :, z].T, truth=truth[:, :, z].T)  # fmt: skip
        last = steps[-1].fix if steps else None
        clicks = ", ".join(f"{s.click.sign}{names[s.click.cls] if s.click.cls else ''}" for s in steps)
        edit = (f"hint fix from {len(steps)} simulated click(s) ({clicks}): " + (", ".join(f"latent {e.latents[0]} x{e.alpha:.2f}" for e in last.edits)
                if last is not None and last.edits else "no latent edit found")) if steps else "no error to click on: unchanged"  # fmt: skip
        steered.append({
            "case_id": case.case_id, "population": failure["population"], "mask": demo.rel(mask), "recipe": demo.rel(recipe_path),
            "edit": edit, "dice_before": dice_before, "dice_after": dice_after, "dice_per_click": per_click, "replay_identical": identical,
            "slice": z, "panels": demo.rel(np_file), "voxels_changed": int((before != after).sum()),
        })  # fmt: skip
        demo.sub(f"{case.case_id}: Dice " + " -> ".join(f"{d:.3f}" for d in per_click) + f" over {len(steps)} click(s); "
                 f"{steered[-1]['voxels_changed']} voxels changed; wrote {mask.name} + {recipe_path.name}; recipe replays "
                 f"{'identically' if identical else 'DIFFERENTLY'}")  # fmt: skip
        if not identical:
            raise SegLensError(f"the recipe {recipe_path} did not reproduce the corrected mask of {case.case_id}")
    return {"cases": steered, "bundle": demo.rel(bundle.root)}


# -- 12. the shipped reference model on a real case --------------------------------------------------------------------
def _real_case(demo: Demo, bundle) -> Path | None:
    """A real labelled case for the shipped model: from the first --data folder, else ``$SEGLENS_DATA`` or
    ``../shared/data`` beside the repository (its ``brats2018`` folder); one the bundle never trained on first."""
    import os

    from ..data.cases import is_case_folder

    roots = [demo.data[0]] if demo.data else []
    if not roots:
        default = Path(os.environ["SEGLENS_DATA"]) if os.environ.get("SEGLENS_DATA") else Path(__file__).resolve().parents[3] / "shared" / "data"
        roots = [default / "brats2018", default]
    for root in roots:
        if not root.is_dir():
            continue
        cases = sorted(p for p in root.iterdir() if p.is_dir() and is_case_folder(p))
        if not cases:
            continue
        held_out = set(bundle.figures.get("training", {}).get("test_cases", []))
        trained = set(bundle.figures.get("training", {}).get("cases", []))
        ranked = sorted(cases, key=lambda c: (c.name not in held_out, c.name in trained, c.name))
        return ranked[0]
    return None


def step_reference(demo: Demo, folder: Path) -> dict:
    """The shipped reference bundle on a real case under an SSA-like acquisition shift: its mask, its top latents
    with their labels, and the bundle's suggested correction for that population, exported with its recipe (which
    is replayed). No label of the case is read to choose the correction; Dice is shown when the case has labels."""
    from ..bundle import load_bundle
    from ..data.cases import find_case, read_case
    from ..data.phantoms import degrade_case
    from ..experiments import class_scores
    from ..resources import reference_bundle_path
    from ..steering import load_recipe

    path = reference_bundle_path(required=False)
    if path is None:
        demo.sub("skipped: no reference bundle is shipped with this copy of SegLens (Resources/adult-glioma-segformer)")
        return {"skipped": "no reference bundle is shipped with this copy of SegLens"}
    bundle = load_bundle(path)
    source = _real_case(demo, bundle)
    if source is None:
        demo.sub("skipped: no real case (pass --data DIR with labelled BraTS cases, or set SEGLENS_DATA)")
        return {"skipped": "no real case: pass --data DIR with labelled BraTS cases, or set SEGLENS_DATA"}
    shifted = degrade_case(source, folder / "cases", preset="ssa", seed=0, strength=2.0)
    case = find_case(shifted)
    session = bundle.open_session(case, device=demo.device)
    before = session.segment()
    top = [{"id": r["id"], "label": r["label"], "category": r["category"], "status": r["status"],
            "shared_with": ", ".join(r["shared_with"] or []), "activation": round(r["volume_activation"], 1)}
           for r in session.latent_table()[:5]]  # fmt: skip
    method = "calibrated" if demo.settings.quick else "ground-truth-free"
    suggestion = session.suggest("ssa", method=method) if "ssa" in session.populations else None
    for edit in suggestion.edits if suggestion else ():
        session.apply(edit)
    mask, recipe_path = session.export(folder / f"{case.case_id}-corrected.nii.gz")
    after = session.labels
    replay = bundle.open_session(case, device=demo.device)
    identical = bool(np.array_equal(replay.apply_recipe(load_recipe(recipe_path), source=recipe_path), after))
    if not identical:
        raise SegLensError(f"the recipe {recipe_path} did not reproduce the corrected mask of {case.case_id}")
    images = read_case(case, modalities=bundle.modalities)
    names = bundle.class_names
    truth = images.label
    dice_before = class_scores(before, truth, names)["dice_mean"] if truth is not None else None
    dice_after = class_scores(after, truth, names)["dice_mean"] if truth is not None else None
    counts = (before > 0).sum(axis=(0, 1))
    z = int(np.argmax(counts)) if counts.any() else before.shape[2] // 2
    np_file = folder / f"{case.case_id}-panels.npz"
    np.savez_compressed(np_file, image=images.images["t2f" if "t2f" in images.images else bundle.modalities[0]][:, :, z].T.astype(np.float32),
                        before=before[:, :, z].T, after=after[:, :, z].T,
                        truth=(truth if truth is not None else np.zeros_like(before))[:, :, z].T)  # fmt: skip
    record = {
        "bundle": str(bundle.root), "case_id": case.case_id, "source": str(source), "shift": "SSA-like acquisition, strength 2",
        "top_latents": top, "suggestion": suggestion.describe() if suggestion else "the bundle has no suggestion for ssa",
        "method": method, "mask": demo.rel(mask), "recipe": demo.rel(recipe_path), "replay_identical": identical,
        "dice_before": dice_before, "dice_after": dice_after, "voxels_changed": int((before != after).sum()), "slice": z,
        "panels": demo.rel(np_file), "repair": bundle.figures.get("repair", {}),
        "hints": bundle.figures.get("hints", {}),
    }  # fmt: skip
    demo.sub(f"{case.case_id} (SSA-like x2): top latents " + ", ".join(f"{r['id']} {r['category']}" for r in top))
    demo.sub(f"suggested: {record['suggestion']}; {record['voxels_changed']} voxels changed"
             + (f"; Dice {dice_before:.3f} -> {dice_after:.3f}" if dice_before is not None else "")
             + f"; wrote {mask.name} + {recipe_path.name} (replays identically)")  # fmt: skip
    return record


# -- 13. report -----------------------------------------------------------------------------------------------------
def step_report(demo: Demo, folder: Path) -> dict:
    from .report import render_report

    results = report_results(demo)
    path = render_report(results, folder / "report.html")
    return {"report": demo.rel(path)}


def report_results(demo: Demo) -> dict:
    """The :func:`~SegLensLogic.app.report.render_report` input, read from the finished steps' outputs."""
    from ..bundle import load_bundle

    s = demo.settings
    state = demo.pipeline
    cohorts = _cohort_records(demo)
    dice = state.outputs("evaluation")["dice"]
    saes = state.outputs("saes")["saes"]
    labels = state.outputs("interpretation")["labels"]
    alignment = state.outputs("alignment")
    experiments = state.outputs("experiments")
    reference = alignment["reference"]
    seconds = {name: record["seconds"] for name, record in state.data["steps"].items()}
    results: dict = {
        "title": f"SegLens demo: audit of {len(cohorts)} population models" if demo.data is None else "SegLens demo: audit of real cohorts",
        "subtitle": (f"Synthetic MNI152 phantom cohorts with planted shifts; {s.describe()}." if demo.data is None
                     else f"Real cohorts {', '.join(c['name'] for c in cohorts)}; {s.describe(real=True)}."),
        "notes": [
            "Every model was fine-tuned from one base U-Net trained on the reference cohort "
            f"('{reference}'), so their activation spaces are comparable; every SAE was trained from its own seed.",
            "Oracle results choose the steering setting per case with its ground truth: an upper bound. Calibrated results "
            "choose it on the other fold's cases only (2-fold cross-fitting): what a user could expect.",
            "Tiny models and few cases: the numbers show the method end to end, not the paper's results."
            + (" This is the --quick run: phantom sizes, populations, training and sweeps are reduced further." if s.quick else ""),
            "Step times: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in seconds.items()) + ".",
        ],
    }
    results["cohorts"] = [{"name": c["name"], "population": c["population"], "n_cases": c["n_cases"], "source": c["source"],
                           "shifted_factors": ["unknown (real data)"] if c["shifted_factors"] is None else
                           [f"planted {c.get('feature')} (only)" if f == "feature" else f for f in c["shifted_factors"]]}
                          for c in cohorts]  # fmt: skip
    results["models"] = [{"name": name, "cohort": name, "arch": f"U-Net {list(s.unet_features)} @ {s.image_size} px", "dice": d}
                         for name, d in dice.items()]  # fmt: skip
    used = alignment["methods"][alignment["method"]]["floors"]
    results["sae_quality"] = [{"model": name, **{k: r.get(k) for k in ("d_sae", "k", "seed", "explained_variance", "l0", "dead_fraction", "dice_recovered")},
                               "seed_floor": used.get(name, {}).get("seed"), "resampling_floor": used.get(name, {}).get("resampled")}
                              for name, r in saes.items()]  # fmt: skip
    galleries = []
    for name, record in labels.items():
        from ..interpretation.latent_labels import load_latent_labels

        document = load_latent_labels(demo.path(record["labels"])).data
        entries = {e["id"]: e for e in document["latents"]}
        categories: dict[str, list] = {}
        for j_text, png in record["thumbnails"].items():
            entry = entries[int(j_text)]
            categories.setdefault(entry["category"], []).append({"id": int(j_text), "description": entry["description"],
                                                                 "confidence": entry["confidence"], "image": demo.path(png)})  # fmt: skip
        galleries.append({"model": f"{name} ({', '.join(f'{c} {n}' for c, n in sorted(record['categories'].items(), key=lambda kv: -kv[1]))})",
                          "categories": categories})  # fmt: skip
    results["latent_galleries"] = galleries
    method, names = alignment["method"], alignment["names"]
    floors = alignment["methods"][method]["floors"]
    other = COSINE if method == ACTIVATION else ACTIVATION
    rule = ("encoder and decoder cosines both at least 0.8 under one Hungarian matching" if method == COSINE else
            "activations correlated at 0.5 or more under one Hungarian matching, each SAE encoding its own model's activations "
            "at the same positions of the images of both cohorts")  # fmt: skip
    results["shared_matrix"] = {
        "names": names, "shared_fraction": alignment["fraction_shared"], "seed_noise_floor": [floors[n]["seed"] for n in names],
        "floors": [{"name": n, "method": m, "seed_floor": alignment["methods"][m]["floors"][n]["seed"],
                    "resampling_floor": alignment["methods"][m]["floors"][n]["resampled"]} for m in (method, other) for n in names],
        "description": (
            f"Share of the row SAE's live latents (those that fire on its cohort's activations) with a shared, live partner in "
            f"the column SAE, by {method}: {rule}. Every SAE was trained from its own seed. Beside every row, its floors by the "
            f"same rule: the share another seed on the same activations finds again (seed floor; hatched cells are at or below "
            f"the row's) and the same seed on a random {round(100 * s.resample_fraction)}% of them (resampling floor). Diffing "
            f"uses {method} because {alignment['method_reason']}. The other rule's figures are in the floors table and in "
            f"07-alignment."
        ),
    }  # fmt: skip
    results["diffing"] = state.outputs("diffing")["rows"]
    results["failure_recovery"] = experiments["failure_recovery"]
    results["adaptation"] = experiments["adaptation"]
    bundle = load_bundle(demo.path(state.outputs("bundles")["bundles"][reference]), verify=False)
    steered = []
    for case in state.outputs("steering")["cases"]:
        with np.load(demo.path(case["panels"])) as panels:
            steered.append({"case_id": f"{case['case_id']} ({case['population']}), axial slice {case['slice']}", "image": panels["image"],
                            "before": panels["before"], "after": panels["after"], "truth": panels["truth"],
                            "dice_before": case["dice_before"], "dice_after": case["dice_after"],
                            "recipe": f"{case['recipe']}: {case['edit']}; replayed {'identically' if case['replay_identical'] else 'differently'}",
                            "colours": [list(c) for c in bundle.colours]})  # fmt: skip
    results["steered_cases"] = steered
    real = state.outputs("reference")
    if not real.get("skipped"):
        with np.load(demo.path(real["panels"])) as panels:
            real = {**real, "image": panels["image"], "before": panels["before"], "after": panels["after"], "truth": panels["truth"],
                    "colours": [list(c) for c in bundle.colours]}  # fmt: skip
    results["reference_case"] = real
    results["notes"] = _headlines(demo, dice, alignment) + results["notes"] + _findings(demo, dice, saes)
    return results


def _headlines(demo: Demo, dice: dict, alignment: dict) -> list[str]:
    """The run's main results: the reference model under shift, what diffing found against the planted features and
    the floors, and each goal of the method that the run meets or misses (by how much, and why)."""
    reference = alignment["reference"]
    own = dice.get(reference, {})
    lines = []
    if own:
        lines.append(f"Results: the {reference} model's mean Dice is {own.get(reference, float('nan')):.3f} on its own test cases and "
                     + ", ".join(f"{score:.3f} on {name}" for name, score in own.items() if name != reference) + ".")  # fmt: skip
    rows = [r for r in demo.pipeline.outputs("diffing")["rows"] if r["used"]]
    for row in rows:
        if not row["n_feature"]:
            lines.append(
                f"Planted {row['feature']} ({row['population']} vs {reference}): no live latent of the {row['population']} SAE puts most "
                f"of its activation mass on the footprint (the best puts {_pct(row['best_fraction'])} there), so there is no feature "
                f"latent for diffing to find: at this size the SAE does not isolate the feature. Diffing ({row['method']}) calls "
                f"{row['n_specific']} of {row['n_live']} live latents specific.")  # fmt: skip
            continue
        lines.append(
            f"Planted {row['feature']} ({row['population']} vs {reference}, {row['method']}): {row['n_feature']} of {row['n_live']} live "
            f"latents fire mostly on its footprint; diffing calls {row['n_specific']} latents specific, precision {_num(row['precision'])} "
            f"(chance {_num(row['chance_precision'])}, 95th percentile {_num(row['chance_precision_95'])}), recall {_num(row['recall'])}; "
            f"{row['shared_on_feature']} of {row['n_shared']} shared latents fire on it. Keeping only specific latents another seed "
            f"finds again: {row['reproducible_n_specific']}, precision {_num(row['reproducible_precision'])}, recall "
            f"{_num(row['reproducible_recall'])}.")  # fmt: skip
    saes = demo.pipeline.outputs("saes")
    dims = saes.get("effective_dimensions", {})
    why = (f"the hook's activations are nearly {dims[reference]}-dimensional (95% of their variance in {dims[reference]} principal "
           f"components): many dictionaries reconstruct them equally well, so training does not pin the latents down"
           if reference in dims else "the dictionaries are not pinned down by the data")  # fmt: skip
    floors = alignment["methods"]
    cos, act = floors[COSINE]["floors"][reference], floors[ACTIVATION]["floors"][reference]
    lines.append(
        f"Goal: two seeds share at least {AGREEMENT_GOAL:.0%} of live latents. By dictionary cosines (tau 0.8) the {reference} SAE's "
        f"seeds share {_pct(cos['seed'])} (resampled data, same seed: {_pct(cos['resampled'])}); by activation correlations (tau "
        f"0.5) {_pct(act['seed'])} ({_pct(act['resampled'])}). "
        + ("Met by dictionary cosines." if (cos["seed"] or 0) >= AGREEMENT_GOAL else
           f"Not met by dictionary cosines, short by {_pct(AGREEMENT_GOAL - (cos['seed'] or 0))}, because {why}; diffing falls back "
           f"to activation correlations" + (", which meet it." if (act["seed"] or 0) >= AGREEMENT_GOAL else
                                            f", which miss it too (by {_pct(AGREEMENT_GOAL - (act['seed'] or 0))}).")))  # fmt: skip
    if rows:
        missed = [r for r in rows if (r["precision"] or 0) < FOOTPRINT_GOAL or (r["recall"] or 0) < FOOTPRINT_GOAL]
        chance_ok = all((r["chance_precision"] or 0) <= CHANCE_GOAL for r in rows)
        text = (f"Goal: precision and recall of at least {FOOTPRINT_GOAL:g} on the planted features with chance at most "
                f"{CHANCE_GOAL:g}. Chance is {'within' if chance_ok else 'above'} its bound. ")
        if not missed:
            text += "Met."
        else:
            causes = ["the SAEs barely isolate the planted features (feature latents: " + ", ".join(
                f"{r['population']} {r['n_feature']} of {r['n_live']}, the best latent with {_pct(r['best_fraction'])} of its mass on "
                f"the footprint" for r in rows) + ")"]  # fmt: skip
            if any(r["shared_on_feature"] for r in rows):
                causes.append("the rule calls feature latents shared (" + ", ".join(
                    f"{r['population']} {r['shared_on_feature']} of {r['n_feature']}" for r in rows)
                    + "): latents of the reference's SAE, on the reference model, fire at the same places of the same "
                    "images (correlation at least 0.5)")  # fmt: skip
            if any(r["n_specific"] > 2 * max(r["n_feature"], 1) for r in rows):
                causes.append("most latents called specific are ones another seed on the same data does not find again either "
                              "(seed floors " + ", ".join(f"{r['population']} {_pct(r['seed_floor'])}" for r in rows)
                              + "): a latent unmatched in the reference is then as likely seed noise as a population feature")  # fmt: skip
            text += ("Not met: " + "; ".join(f"{r['population']} precision {_num(r['precision'])}, recall {_num(r['recall'])}" for r in missed)
                     + f". Measured causes: {'; '.join(causes)}.")  # fmt: skip
        lines.append(text)
    dead = {n: r["dead_fraction"] for n, r in saes["saes"].items()}
    over = {n: d for n, d in dead.items() if d > DEAD_GOAL}
    lines.append(f"Goal: at most {DEAD_GOAL:.0%} dead latents per SAE (counted on all of its cohort's activation vectors): "
                 + ("met by all " + str(len(dead)) + f" SAEs (at most {_pct(max(dead.values()))})." if not over else
                    f"missed by {len(over)} of {len(dead)} SAEs, by at most {_pct(max(over.values()) - DEAD_GOAL)} "
                    f"({', '.join(f'{n} {_pct(d)}' for n, d in over.items())}). Training leaves as many dead (the recipe's "
                    f"auxiliary loss revives latents that then lose again): with {dims.get(reference, '?')} effective dimensions "
                    f"the {next(iter(saes['saes'].values()))['d_sae']} directions are partly redundant, and the redundant ones never win "
                    f"a place among a batch's top activations. Explained variance stays at "
                    f"{_num(min(r['explained_variance'] for r in saes['saes'].values()))} or more."))  # fmt: skip
    return lines


def _findings(demo: Demo, dice: dict, saes: dict) -> list[str]:
    """Notes read from the results that a reader needs to interpret them (tiny-model effects, failed models)."""
    notes = []
    records = {r["name"]: r for r in _cohort_records(demo)}
    for name, scores in dice.items():
        own = scores.get(name)
        if own is not None and own < 0.1 and records[name]["label_scheme"] == "aseg":
            notes.append(f"The {name} model segments FreeSurfer structures that span only tens of voxels at this resolution: its Dice "
                         f"({own:.3f}) stays near 0, and latents rarely concentrate on one structure. Its encoder, fine-tuned from the base, "
                         "still gives an SAE to diff against.")  # fmt: skip
    cases = demo.pipeline.outputs("steering")["cases"]
    changed = [c["voxels_changed"] for c in cases]
    recovered = [r.get("dice_recovered") for r in saes.values() if r.get("dice_recovered") is not None]
    if changed and max(changed) < 100:
        notes.append(f"Steering moved few voxels here ({', '.join(map(str, changed))} in the steered cases), and splicing SAE "
                     f"reconstructions in at the hook keeps the Dice (recovered {min(recovered):.2f}-{max(recovered):.2f}): in U-Nets "
                     "this small the decoder's skip connections from the encoder levels above the hook carry most of the signal "
                     "past it, so edits at the hook change little. Whether larger models lean on it more, this demo cannot tell.")  # fmt: skip
    return notes


STEPS: tuple[tuple[str, str, Callable[[Demo, Path], dict]], ...] = (
    ("cohorts", "Cohorts: synthetic populations with planted shifts, or the --data folders", step_cohorts),
    ("base", "Base model: a tiny U-Net on the reference cohort", step_base),
    ("models", "Population models: fine-tuned from the base", step_models),
    ("evaluation", "Evaluation: every model on every test split", step_evaluation),
    ("saes", "Sparse autoencoders: a BatchTopK SAE per model from its own seed, + a seed replica and a resampled replica of each", step_saes),
    ("interpretation", "Interpretation: latent labels and galleries", step_interpretation),
    ("alignment", "Alignment: shared latents across populations by two rules, each beside its seed and resampling floors", step_alignment),
    ("diffing", "Diffing scored against the planted features' footprints", step_diffing),
    ("experiments", "Experiments: failure diagnosis, recovery and adaptation (oracle and calibrated)", step_experiments),
    ("bundles", "Bundles: one per population", step_bundles),
    ("steering", "Fixing failures by pointing: simulated clicks, hint fixes, corrected masks with recipes", step_steering),
    ("reference", "The shipped reference model on a real case: top latents, a suggested correction and its recipe", step_reference),
    ("report", "Report: the HTML audit report", step_report),
)


def run_demo(
    out: str | Path = "seglens-demo",
    data: list[str | Path] | str | Path | None = None,
    quick: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    hook: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the demo in ``out``; returns the state document (``OUT/demo.json``).

    Args:
        out: the demo folder (created; a folder holding anything but a demo is refused).
        data: labelled cohort folders to use instead of phantoms (each a cohort; the first is the reference).
        quick: reduced sizes (about two minutes on two CPU cores).
        overwrite: start over in a demo folder instead of continuing it.
        threads: PyTorch CPU threads while the demo runs (default 1 without a GPU: models this small run faster on
            one thread than on two that contend with each other and with other processes; restored afterwards).
        hook: the U-Net hook point the SAEs read and steering edits (default ``down_2``); a decoder level
            (``up_3``, ``up_2``) is behind the skip connections, so its edits reach the mask
            (docs/measurements/steering-repair.md).
    """
    out = Path(out)
    if data is not None and not isinstance(data, (list, tuple)):
        data = [data]
    paths = [Path(p) for p in data] if data else None
    for path in paths or []:
        if not path.is_dir():
            raise InputFileError(path, "cohort folder not found")
    options = {"quick": bool(quick), "data": [str(p.resolve()) for p in paths] if paths else None}
    if hook is not None:
        from ..networks.unet import UNetSegmenter

        if hook not in UNetSegmenter.hook_names:
            raise SegLensError(f"--hook: the demo's U-Net has no hook point '{hook}' (it has {', '.join(UNetSegmenter.hook_names)})")
        options["hook"] = hook  # recorded only when given, so demos run before the option existed still continue
    if threads is not None and threads < 1:
        raise SegLensError(f"--threads must be at least 1, got {threads}")
    state = open_state(out, options, overwrite, log)
    settings = DemoSettings.for_run(quick)
    if hook is not None:
        settings = replace(settings, hook_point=hook)
    demo = Demo(out=out, settings=settings, data=paths, pipeline=state, log=log)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or (previous_threads if demo.device.type == "cuda" else 1))
    start = time.monotonic()
    log(f"SegLens demo in {out} ({settings.describe(real=paths is not None)}; device {demo.device.type}, {torch.get_num_threads()} CPU thread(s))")
    try:
        for name, _title, function in STEPS:
            state.run(name, partial(function, demo))
    finally:
        torch.set_num_threads(previous_threads)
    report = state.folder("report") / "report.html"
    state.finish()
    log(f"Finished in {time.monotonic() - start:.1f} s (all steps: {sum(r['seconds'] for r in state.data['steps'].values()):.1f} s).")
    log(f"  report:   {report}")
    log(f"  bundles:  {', '.join(str(demo.path(p)) for p in state.outputs('bundles')['bundles'].values())}")
    for case in state.outputs("steering")["cases"]:
        log(f"  corrected mask: {demo.path(case['mask'])} (recipe {demo.path(case['recipe']).name})")
    return state.data
