"""``seglens build-reference``: rebuild the shipped adult-glioma reference bundle from real labelled cases.

Every figure on the bundle's model card is measured by this build, on the weights it ships. Steps (resumable:
rerunning the same command continues where it stopped; the segmenter's training continues from its last epoch):

1. ``split``: the BraTS 2018 cases of ``DATA/brats2018`` into training, validation (checkpoint choice) and test
   cases (one per acquisition group: the 2013 cohort, CBICA, TCIA; never trained on, never used to choose
   anything); the BraTS 2013 cases of ``DATA/brats2013`` are held out whole (another site and protocol).
2. ``base``: the segmenter (SegFormer-B0 by default, or a U-Net) trained from scratch on the training cases
   (:class:`ReferenceSettings`).
3. ``leverage``: a quick SAE per hook point; how far scaling the top tumour latents moves the mask on the
   validation case, an SSA-like degraded copy of it and a training case, and how well hint fixes aim there (the
   mean Dice gain after three simulated clicks on the validation cases and failing copies of them); the hook is
   chosen by aim (:mod:`SegLensLogic.experiments.leverage`).
4. ``sae``: activations of the training and validation cases at the hook; SAEs for each k of the sweep, two seeds
   each, the setting chosen by stated rules (:mod:`SegLensLogic.experiments.sae_sweep`); the chosen setting's second seed
   (seed floor) and a replica on 80 % of the positions (resampling floor) are kept.
5. ``interpret``: ``latents.json`` over the labelled training and validation cases.
6. ``populations``: models fine-tuned from the base on the BraTS 2013 cases (another site; T1c and FLAIR only),
   on SSA-like degraded copies of the training cases, and on pediatric phantoms (no real pediatric case exists
   here); an SAE on each (its own seed), aligned with the reference SAE (the module's population columns).
7. ``evaluation``: per-class Dice on the test cases and the BraTS 2013 cases, SAE explained variance, L0 and dead
   fraction on the test cases' activations, Dice recovered, and a steering check.
8. ``repair``: the failure cases among the test cases under SSA-like shifts and missing sequences and the BraTS 2013
   cases, every steering arm and baseline on them (:mod:`SegLensLogic.experiments.repair`), and the suggested
   corrections per population (:mod:`SegLensLogic.steering.suggestions`).
9. ``hints``: the hint benchmark (:mod:`SegLensLogic.experiments.hint_benchmark`) on the failures of the test cases (clean,
   SSA-like, without FLAIR or T1c), the BraTS 2013 cases and the ``brats-extra`` cases not trained on.
10. ``bundle``: model, SAE, labels, alignments, suggestions and the model card (:mod:`.card`) in one bundle.

The build is deterministic given its seeds on one machine (PyTorch's CPU kernels may differ across CPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data.cohort import Cohort, load_cohort
from ..storage import atomic_write_text, publish_folder, staging_folder
from ..errors import InputFileError, SegLensError
from .pipeline import Pipeline, now_utc
from ..reference.card import hardware

STATE_NAME = "build.json"
STATE_KIND = "seglens-reference-build"
# Acquisition groups of the real cases, read from their ids: the BraTS 2013 cohort inside BraTS 2018, CBICA, TCIA
# (BraTS 2018 ids and the BRATS 2014 TCIA ids of brats-extra), and the BraTS 2021 release.
GROUPS = {
    "2013 cohort": ("Brats18_2013_",),
    "CBICA": ("Brats18_CBICA_",),
    "TCIA": ("Brats18_TCIA", "brats_tcia_"),
    "BraTS 2021": ("BraTS2021_",),
}


def acquisition_group(case_id: str) -> str | None:
    """The acquisition group (a key of :data:`GROUPS`) of a case id, or None."""
    return next((name for name, prefixes in GROUPS.items() if case_id.startswith(prefixes)), None)


@dataclass(frozen=True)
class ReferenceSettings:
    """Every choice the reference build makes (stored in ``build.json`` and on the model card).

    Attributes:
        arch, image_size, crop_to_brain: the segmenter: SegFormer-B1 on the brain's bounding box at 192 px
            (about 1 mm per pixel: the same detail as the whole 240 px slice at 256 px, for 56 % of the cost; B1 has
            twice B0's channels at every stage, for 1.5x its training time on the CPU).
        extra_cases, test_cases, validation_cases: the split (:func:`split_cases`): the cases of ``DATA/brats2018``
            and, with ``extra_cases``, ``DATA/brats-extra``; how many are held out for testing (never trained on,
            never used for a choice) and for validation.
        epochs, slices_per_epoch, batch_size, learning_rate, warmup_steps, weight_decay: training schedule
            (AdamW, linear warm-up then cosine decay).
        modality_dropout: share of training slices that lose random input sequences (so that the BraTS 2013
            cases, which have only T1c and FLAIR, can be segmented and used as a population).
        precision: autocast precision of training's forward passes.
        keep: the weights kept: the last epoch (the cosine schedule ends at 0; one validation case is too noisy to
            choose an epoch by), or the best by validation Dice.
        seed: weights, sampling, augmentation and the split.
        arch_options: architecture overrides (U-Net widths; small SegFormers for tiny builds); train_cases: use only the first N
            training cases (tiny builds only).
        leverage_sae_steps, leverage_alphas: the quick SAE per hook point and the alpha grid of the leverage step;
            aim_cases: the validation cases and failing copies of them the hook's aim is measured on (0: choose by
            leverage alone).
        sweep, sae_max_steps: the SAE settings ``(k, expansion)`` tried at the chosen hook (two seeds each), and
            the step budget of each; sae_expansion: the quick SAEs' expansion in the leverage step;
            sae_resample_every: dead latents of the swept and population SAEs are resampled every this many steps
            (None: never, as in the shipped U-Net, built before resampling was measured; docs/measurements/sae-resampling.md).
        interpret_top_k: examples per latent when labelling latents; sweep_readability: label every swept setting's
            two seeds on the training cases and choose the setting by its tumour latents that the other seed finds
            again and how repeatable their labels are (:func:`~SegLensLogic.experiments.sae_sweep.readability`), not by the paper's setting.
        finetune_epochs, finetune_slices, finetune_learning_rate: population models fine-tuned from the base.
        pediatric_cases, phantom_shape: the synthetic pediatric cohort (no real pediatric case is available).
        repair_alphas, repair_strengths, repair_missing, repair_brats2013, fit_steps: the failure-repair
            experiment: alpha grid, SSA-like degradation strengths of the test cases, sequences left out of them,
            BraTS 2013 cases used, gradient steps of the fitted correction; hint_clicks, hint_steps: simulated clicks per case of
            the hint benchmark and Adam steps of each hint fit (also in the leverage step's aim); repair_patients, leverage_hooks:
            fewer test patients and hook points (tiny builds only).
    """

    arch: str = "segformer-b1"
    image_size: int = 192
    crop_to_brain: bool = True
    extra_cases: bool = True
    test_cases: int = 4
    validation_cases: int = 2
    epochs: int = 100
    slices_per_epoch: int = 1024
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 300
    weight_decay: float = 1e-2
    modality_dropout: float = 0.2
    precision: str = "bfloat16"
    keep: str = "last"
    seed: int = 0
    arch_options: tuple[tuple[str, object], ...] = ()
    train_cases: int | None = None
    leverage_sae_steps: int = 3000
    leverage_alphas: tuple[float, ...] = (0.0, 0.5, 2.0, 4.0, 8.0)
    repair_alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    repair_strengths: tuple[float, ...] = (1.0, 2.0)
    repair_missing: tuple[str, ...] = ("t2f", "t1c")
    repair_brats2013: int = 3
    repair_patients: int | None = None
    leverage_hooks: tuple[str, ...] | None = None
    aim_cases: int = 4
    fit_steps: int = 40
    hint_clicks: int = 5
    hint_steps: int = 25
    # k 8 x 2: on the U-Net as faithful as x 4 with almost no dead latents, and more of its tumour latents found again
    # by another seed (docs/measurements/seed-agreement.md).
    sweep: tuple[tuple[int, int], ...] = ((8, 2), (8, 4), (16, 4), (16, 8), (32, 8), (32, 16))
    sae_expansion: int = 16
    sae_max_steps: int = 20000
    sae_resample_every: int | None = 1000
    interpret_top_k: int = 16
    sweep_readability: bool = True
    finetune_epochs: int = 6
    finetune_slices: int = 512
    finetune_learning_rate: float = 3e-4
    pediatric_cases: int = 8
    phantom_shape: tuple[int, int, int] = (96, 112, 96)

    @classmethod
    def unet(cls) -> "ReferenceSettings":
        """A U-Net reference (MONAI BasicUNet, widths 16-128, full-resolution output) at 128 px on the brain box."""
        return cls(arch="unet", image_size=128, arch_options=(("features", [16, 16, 32, 64, 128, 16]),), learning_rate=3e-3,
                   warmup_steps=100, sae_resample_every=None)  # fmt: skip

    @classmethod
    def tiny(cls, arch: str = "segformer") -> "ReferenceSettings":
        """Minutes instead of hours: the same steps on a small model and few cases (tests, a first look); ``arch``
        ``"unet"``: a small U-Net, leverage measured at an encoder and a decoder level."""
        if arch == "unet":
            return replace(cls.tiny(), arch="unet", arch_options=(("features", [8, 8, 16, 32, 64, 8]),), leverage_hooks=("down_3", "up_3"))
        return cls(
            arch="segformer-b0", extra_cases=False, test_cases=3, validation_cases=1, image_size=64, epochs=2, slices_per_epoch=64, batch_size=8, warmup_steps=0, precision="float32",
            arch_options=(("hidden_sizes", [16, 32, 64, 128]), ("decoder_hidden_size", 64), ("num_attention_heads", [1, 1, 2, 4])),
            train_cases=2, leverage_sae_steps=100, leverage_alphas=(0.0, 4.0), repair_alphas=(0.0, 1.0, 4.0), repair_strengths=(2.0,),
            repair_missing=(), repair_brats2013=1, repair_patients=2, leverage_hooks=("stage1", "stage2"), aim_cases=1, hint_clicks=1, hint_steps=6, fit_steps=3, sweep=((4, 2), (8, 4)), sae_expansion=4,
            sae_max_steps=300, sae_resample_every=50, interpret_top_k=4, finetune_epochs=1, finetune_slices=32, pediatric_cases=2,
            phantom_shape=(48, 56, 40),
        )  # fmt: skip


STEPS = [
    ("split", "split the real cases into training, validation and test"),
    ("base", "train the reference segmenter"),
    ("leverage", "measure how far latent edits at each hook point move the mask; choose the hook"),
    ("sae", "train SAEs at the chosen hook (settings sweep, two seeds each) and the resampling replica"),
    ("interpret", "label every latent from its top slices over the labelled training cases"),
    ("populations", "fine-tune population models (BraTS 2013, SSA-like degraded, pediatric phantoms), their SAEs and alignments"),
    ("evaluation", "measure the model and its SAE on cases never trained on"),
    ("repair", "steer real failure cases: every arm side by side; the suggested corrections per population"),
    ("hints", "fix real failure cases by pointing at them: the hint benchmark on simulated clicks"),
    ("bundle", "write the bundle with its model card"),
]
RESUMABLE_STEPS = ("base", "leverage", "sae", "populations")
MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
POPULATIONS = ("brats2013", "ssa", "pediatric")


@dataclass
class ReferenceBuild:
    """One build: its data folder, settings, resumable state and log."""

    data: Path
    settings: ReferenceSettings
    pipeline: Pipeline
    log: Callable[[str], None]

    def cohort(self, split: str) -> Cohort:
        """A split written by the ``split`` step as a cohort (``train``, ``validation``, ``test``, ``brats2013``,
        ``train+validation``)."""
        return load_cohort(self.pipeline.folder("split") / f"{split}.txt", name=split)

    def sub(self, message: str) -> None:
        self.log(f"    {message}")

    @property
    def model_dir(self) -> Path:
        return self.pipeline.out / self.pipeline.outputs("base")["model"]

    def model(self):
        from ..networks import load_segmenter

        return load_segmenter(self.model_dir)

    @property
    def hook(self) -> str:
        return self.pipeline.outputs("leverage")["hook"]


def split_cases(cohort: Cohort, seed: int, test_cases: int = 3, validation_cases: int = 1) -> dict[str, list[str]]:
    """Case ids per split, drawn with ``seed``.

    Test: one case of each acquisition group with at least two cases (:data:`GROUPS`: the 2013 cohort, CBICA,
    TCIA), then more from the group with the most cases left until there are ``test_cases``; validation:
    ``validation_cases`` more, each from the group with the most cases left; training: the rest (a group of one
    case, such as the BraTS 2021 case, always trains).
    """
    rng = np.random.default_rng(seed)
    ids = sorted(case.case_id for case in cohort)
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(acquisition_group(i) or "other", []).append(i)
    required = ("2013 cohort", "CBICA", "TCIA")
    if any(len(groups.get(g, [])) < 2 for g in required):
        raise InputFileError(Path(cohort.name), f"needs at least two cases of each group {', '.join(required)} to hold one out")
    left = {g: list(members) for g, members in groups.items()}

    def draw(group: str) -> str:
        chosen = str(rng.choice(left[group]))
        left[group].remove(chosen)
        return chosen

    def largest() -> str:  # the group with the most cases left (ties: the first in GROUPS order)
        return max((g for g in GROUPS if g in left), key=lambda g: len(left[g]))

    test = [draw(g) for g in required]
    while len(test) < test_cases:
        test.append(draw(largest()))
    validation = [draw(largest()) for _ in range(validation_cases)]
    train = [i for i in ids if i not in test and i not in validation]
    return {"train": train, "validation": validation, "test": test}


def _write_list(path: Path, cases) -> None:
    atomic_write_text(path, "".join(f"{c.folder.resolve()}\n" for c in cases), overwrite=True)


def _reference_cohort(build: ReferenceBuild) -> Cohort:
    """The labelled cases the build splits: ``DATA/brats2018`` and, with ``settings.extra_cases``, ``DATA/brats-extra``."""
    cohort = load_cohort(build.data / "brats2018", name="brats2018")
    if build.settings.extra_cases and (build.data / "brats-extra").is_dir():
        extra = load_cohort(build.data / "brats-extra", name="brats-extra")
        cohort = Cohort(name="brats2018+extra", cases=[*cohort, *extra])
    return cohort


def step_split(build: ReferenceBuild, folder: Path) -> dict:
    s = build.settings
    reference = _reference_cohort(build)
    shifted = load_cohort(build.data / "brats2013", name="brats2013")
    splits = split_cases(reference, s.seed, test_cases=s.test_cases, validation_cases=s.validation_cases)
    if build.settings.train_cases is not None:
        splits["train"] = splits["train"][: build.settings.train_cases]
    by_id = {c.case_id: c for c in reference}
    for name, ids in splits.items():
        _write_list(folder / f"{name}.txt", [by_id[i] for i in ids])
    _write_list(folder / "brats2013.txt", list(shifted))
    # Training reads validation cases from the end of its cohort.
    _write_list(folder / "train+validation.txt", [by_id[i] for i in splits["train"] + splits["validation"]])
    for name, ids in splits.items():
        build.sub(f"{name}: {', '.join(ids)}")
    build.sub(f"held out whole: {', '.join(c.case_id for c in shifted)} (BraTS 2013: T1c and FLAIR only)")
    return {**splits, "brats2013": [c.case_id for c in shifted]}


def _training_options(build: ReferenceBuild, fine_tune: bool, val_cases: int = 1):
    from ..segmentation.training import TrainingOptions

    s = build.settings
    if fine_tune:
        return TrainingOptions(
            epochs=s.finetune_epochs, batch_size=s.batch_size, learning_rate=s.finetune_learning_rate,
            warmup_steps=min(s.warmup_steps, 50), weight_decay=s.weight_decay, slices_per_epoch=s.finetune_slices,
            val_cases=val_cases, spatial_augmentation=True, modality_dropout=s.modality_dropout, precision=s.precision, keep=s.keep,
            seed=s.seed,
        )  # fmt: skip
    return TrainingOptions(
        epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate, warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay, slices_per_epoch=s.slices_per_epoch, val_cases=val_cases, spatial_augmentation=True,
        modality_dropout=s.modality_dropout, precision=s.precision, keep=s.keep, seed=s.seed,
    )  # fmt: skip


def step_base(build: ReferenceBuild, folder: Path) -> dict:
    from ..segmentation.training import train_segmenter

    s = build.settings
    cohort = load_cohort(build.pipeline.folder("split") / "train+validation.txt", name="adult glioma")
    result = train_segmenter(
        cohort, folder / "model", arch=s.arch, modalities=MODALITIES, image_size=s.image_size, arch_options=dict(s.arch_options),
        crop_to_brain=s.crop_to_brain, options=_training_options(build, fine_tune=False, val_cases=s.validation_cases), overwrite=True, resumable=True, log=build.sub,
    )  # fmt: skip
    return {"model": "base/model", "best_epoch": result.best_epoch, "validation": result.best_scores,
            "seconds": result.history[-1]["seconds"], "epochs": len(result.history), "hardware": hardware()}  # fmt: skip


def _extract(build: ReferenceBuild, model, model_dir: Path, cohort: Cohort, hook: str, out: Path, subsample: float = 1.0, seed: int = 0):
    """The activation store of ``cohort`` at ``hook``; a store already at ``out`` from the same weights, cases and
    options is reused (a resumed step would otherwise extract it again: minutes per rerun)."""
    import json

    from ..networks import weights_sha256
    from ..sae import ActivationStore, ExtractionOptions, extract_activations

    options = ExtractionOptions(hook=hook, subsample=subsample, seed=seed)
    if (out / "store.json").is_file():  # a store is renamed into place whole: present means complete
        try:
            store = ActivationStore(out)
        except SegLensError:
            store = None
        manifest = store.manifest if store is not None else {}
        if (manifest.get("model_sha256") == weights_sha256(model_dir) and [c["case_id"] for c in manifest.get("cases", [])] == [c.case_id for c in cohort]
                and manifest.get("options") == json.loads(json.dumps(vars(options)))):  # fmt: skip
            return store
    return extract_activations(model, cohort, out, options, model_dir=model_dir, overwrite=True, log=lambda m: None)


def _sae_workers() -> int:
    """SAEs trained side by side on the CPU, one thread each: an SAE step is too small for two threads; on the B1
    store a sweep ran 1.8-2.2 times faster two at a time than one at a time on two threads
    (``benchmarks/sae_sweep_workers.py``). One on a GPU."""
    return 1 if torch.cuda.is_available() else torch.get_num_threads()


@contextmanager
def _sae_threads():
    """One PyTorch thread for an SAE trained alone on the CPU (1.3 times faster than two, same benchmark)."""
    previous = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sae_options(build: ReferenceBuild, **fields):
    from ..sae import SAETrainingOptions

    return SAETrainingOptions(**{"expansion": build.settings.sae_expansion, "max_steps": build.settings.sae_max_steps,
                                 "resample_every": build.settings.sae_resample_every, "log_every": 10**9, **fields})  # fmt: skip


def step_leverage(build: ReferenceBuild, folder: Path) -> dict:
    from ..data.phantoms import degrade_case
    from ..experiments.leverage import leverage_report, quick_saes

    s = build.settings
    model = build.model()
    train = build.cohort("train")
    validation = build.cohort("validation")[0]
    # Cases to measure on: the validation case, an SSA-like degraded copy of it (a failure to move), a training case.
    degraded = degrade_case(validation.folder.resolve(), folder / "degraded", preset="ssa", seed=s.seed, overwrite=True)
    cases = [validation, load_cohort(degraded)[0], train[0]]
    hooks = [h for h in model.hook_names if s.leverage_hooks is None or h in s.leverage_hooks]
    saes = quick_saes(model, build.model_dir, train, hooks, folder / "stores", steps=s.leverage_sae_steps,
                      expansion=s.sae_expansion, seed=s.seed, log=build.sub)  # fmt: skip
    # Aim: hint fixes from simulated clicks on the validation cases and failing copies of them (SSA-like, no FLAIR).
    from ..experiments.repair import without_modalities

    validation_cases = list(build.cohort("validation"))
    aim_cases = [*validation_cases, load_cohort(degraded)[0]]
    aim_cases += [without_modalities(c, ["t2f"], "-no-t2f") for c in validation_cases[: s.aim_cases]]
    aim_cases = aim_cases[: max(1, s.aim_cases)] if s.aim_cases else []
    report, chosen, summary = leverage_report(model, saes, cases, s.leverage_alphas, log=build.sub, aim_cases=aim_cases,
                                               aim_steps=s.hint_steps, cache=folder / "hooks")  # fmt: skip
    report.write(folder / "report", overwrite=True)
    build.sub(f"chosen hook: {chosen}")
    return {"hook": chosen, "summary": summary, "cases": [c.case_id for c in cases[:1]] + [f"{cases[1].case_id} (SSA-degraded)", cases[2].case_id],
            "report": "leverage/report/README.md"}  # fmt: skip


def step_sae(build: ReferenceBuild, folder: Path) -> dict:
    from ..experiments.sae_sweep import choose_setting, sae_sweep
    from ..sae.trainer import load_trained, save_training_report, train_sae_once

    s = build.settings
    model = build.model()
    hook = build.hook
    train = build.cohort("train+validation")
    store = _extract(build, model, build.model_dir, train, hook, folder / "store")
    channels = store.d_in
    grid = [{"k": k, "expansion": e} for k, e in s.sweep if k <= channels // 2] or [{"k": max(1, channels // 4), "expansion": 4}]
    build.sub(f"{len(store)} vectors of {channels} channels at {hook}; sweep over (k, expansion) "
              f"{[(g['k'], g['expansion']) for g in grid]} (seeds 0 and 1)")  # fmt: skip
    rows, kept = sae_sweep(store, grid, base=_sae_options(build), keep=True, log=build.sub, cache=folder / "sweep", workers=_sae_workers())
    if s.sweep_readability:  # what a clinician reads: tumour latents, and whether another seed labels them alike
        from ..experiments.sae_sweep import readability

        build.sub("labelling both seeds of every setting on the training cases")
        pairs = [(kept[(i, 0)][0], kept[(i, 1)][0]) for i in range(len(rows))]
        from ..alignment.replication import comparison_vectors

        measured_rows = readability(model, pairs, train, top_k=s.interpret_top_k, log=build.sub, vectors=comparison_vectors(store))
        for row, measured in zip(rows, measured_rows):
            row.update(measured)
    chosen, why = choose_setting(rows, prefer={"k": 32, "expansion": 16})
    build.sub(f"chosen: k {rows[chosen]['k']}, expansion {rows[chosen]['expansion']} ({why})")
    for seed, name in ((0, "sae"), (1, "sae-seed1")):
        sae, report = kept[(chosen, seed)]
        sae.config.training["cohort"] = "brats2018"
        sae.save(folder / name, overwrite=True)
        save_training_report(report, folder / name)
    # The resampling floor: the chosen setting, seed 0, on a random 80 % of the positions.
    options = _sae_options(build, k=rows[chosen]["k"], expansion=rows[chosen]["expansion"], seed=0)
    trained = load_trained(folder / "sae-resampled", options)
    if trained is None:  # extraction runs the segmenter on all threads, the SAE trains on one
        resampled_store = _extract(build, model, build.model_dir, train, hook, folder / "store-resampled", subsample=0.8, seed=s.seed + 1)
        with _sae_threads():
            trained = train_sae_once(resampled_store, options, folder / "sae-resampled", log=lambda m: None)
    sae, report = trained
    sae.config.training["cohort"] = "brats2018 (80 % resample)"
    sae.save(folder / "sae-resampled", overwrite=True)
    save_training_report(report, folder / "sae-resampled")
    import shutil

    shutil.rmtree(folder / "store-resampled", ignore_errors=True)
    return {"sae": "sae/sae", "seed_replica": "sae/sae-seed1", "resampled_replica": "sae/sae-resampled", "store": "sae/store",
            "sweep": rows, "chosen": rows[chosen], "why": why, "resample_every": kept[(chosen, 0)][1]["options"].get("resample_every")}  # fmt: skip


def step_interpret(build: ReferenceBuild, folder: Path) -> dict:
    from ..interpretation import interpret_sae, write_latent_labels
    from ..sae import BatchTopKSAE

    model = build.model()
    sae_dir = build.pipeline.out / build.pipeline.outputs("sae")["sae"]
    sae = BatchTopKSAE.load(sae_dir)
    cohort = build.cohort("train+validation")
    result = interpret_sae(model, sae, cohort, top_k=build.settings.interpret_top_k, model_dir=build.model_dir, sae_dir=sae_dir,
                           log=lambda m: None)  # fmt: skip
    write_latent_labels(result.document, folder / "latents.json", overwrite=True)
    counts: dict[str, int] = {}
    for entry in result.document["latents"]:
        counts[entry["category"]] = counts.get(entry["category"], 0) + 1
    build.sub("latents per category: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    stability = result.document.get("stability") or {}
    # Whether the labels hold on new cases: the test cases' whole-volume heatmaps, as the panel shows them.
    from ..interpretation import label_mass, load_latent_labels

    measured = label_mass(model, sae, load_latent_labels(folder / "latents.json"), build.cohort("test"))
    if measured["mean_in_class"] is not None:
        build.sub(f"on the {measured['cases']} test cases, tumour-labelled latents put {measured['mean_in_class']:.0%} of their "
                  f"mass inside their class ({measured['holding']} of {measured['fired']} at >= {measured['holds_at']:.0%})")  # fmt: skip
    replicated = _replication(build, sae, result.document)
    build.sub(f"the seed replica finds {replicated['live_shared']:.0%} of the {replicated['live']} live latents again, "
              f"{replicated['tumour_replicating']} of the {replicated['tumour_live']} live tumour-labelled ones")  # fmt: skip
    return {"labels": "interpret/latents.json", "categories": counts, "stability": stability.get("agreement"), "label_mass": measured,
            "replication": replicated}  # fmt: skip


def _replication(build: ReferenceBuild, sae, document: dict) -> dict:
    """Which latents the ``sae`` step's seed replica finds again (:func:`~SegLensLogic.alignment.replication.replication`
    on the store's held-out positions), with the count among live tumour-labelled latents, for the card and the
    shipped labels."""
    from ..alignment.replication import comparison_vectors, replica_identity, replication
    from ..experiments.sae_sweep import READABLE_CATEGORIES
    from ..sae import ActivationStore, BatchTopKSAE

    out, outputs = build.pipeline.out, build.pipeline.outputs("sae")
    replica = BatchTopKSAE.load(out / outputs["seed_replica"])
    measured = replication(sae, replica, comparison_vectors(ActivationStore(out / outputs["store"])))
    flags = measured.pop("replicates")
    tumour = [int(e["id"]) for e in document["latents"] if e["category"] in READABLE_CATEGORIES and flags[int(e["id"])] is not None]
    identity = replica_identity(replica)
    return {**measured, "replicates": flags.tolist(), "replica_sha256": identity["sha256"], "replica_seed": identity["seed"],
            "tumour_live": len(tumour), "tumour_replicating": sum(bool(flags[j]) for j in tumour)}  # fmt: skip


def _population_cohort(build: ReferenceBuild, name: str, folder: Path) -> Cohort:
    from ..data.phantoms import degrade_case, write_phantom_cohort

    s = build.settings
    if name == "brats2013":
        return build.cohort("brats2013")
    if name == "ssa":
        out = folder / "cases"
        for case in build.cohort("train+validation"):
            if not (out / case.folder.resolve().name).exists():
                degrade_case(case.folder.resolve(), out, preset="ssa", seed=s.seed)
        return load_cohort(out, name="ssa")
    out = folder / "cases"
    if not (out / "cohort.json").exists():
        write_phantom_cohort(out, s.pediatric_cases, seed=s.seed, shape=s.phantom_shape, population="pediatric", overwrite=True)
    return load_cohort(out, name="pediatric")


def step_populations(build: ReferenceBuild, folder: Path) -> dict:
    from ..alignment import align_saes, alignment_document, sae_record, write_alignment
    from ..alignment.cohorts import replica_floors
    from ..alignment.quality import alignment_metrics
    from ..sae import ActivationStore, BatchTopKSAE, train_sae
    from ..alignment.replication import comparison_vectors, live_latents
    from ..sae.trainer import save_training_report
    from ..segmentation.training import train_segmenter

    out = build.pipeline.out
    sae_outputs = build.pipeline.outputs("sae")
    reference_dir = out / sae_outputs["sae"]
    reference = BatchTopKSAE.load(reference_dir)
    k, expansion = sae_outputs["chosen"]["k"], sae_outputs["chosen"]["expansion"]
    store = ActivationStore(out / sae_outputs["store"])
    held_out = comparison_vectors(store)
    # Live latents on the held-out positions, each SAE's once; every share below is over live latents only.
    saes = {"adult": reference, "seed": BatchTopKSAE.load(out / sae_outputs["seed_replica"]),
            "resample": BatchTopKSAE.load(out / sae_outputs["resampled_replica"])}  # fmt: skip
    live = {name: live_latents(sae, held_out) for name, sae in saes.items()}
    replicas = replica_floors("adult", {"seed": "seed", "resample": "resample"}, lambda a, b: align_saes(saes[a], saes[b]), live)
    floors = {kind: share or 0.0 for kind, (_alignment, share) in replicas.items()}
    build.sub(f"floors (share of the reference's live latents shared): another seed {floors['seed']:.2f}, "
              f"resampled data {floors['resample']:.2f}")  # fmt: skip
    results = {}
    for number, name in enumerate(POPULATIONS, start=1):
        pop_folder = folder / name
        pop_folder.mkdir(exist_ok=True)
        cohort = _population_cohort(build, name, pop_folder)
        model_dir = pop_folder / "model"
        if not (model_dir / "model.safetensors").exists():
            train_segmenter(cohort, model_dir, init=build.model_dir, options=_training_options(build, fine_tune=True, val_cases=1),
                            overwrite=True, resumable=True, log=lambda m: None)  # fmt: skip
        from ..networks import load_segmenter

        model = load_segmenter(model_dir)
        model.config.hook_point = build.hook
        pop_store = _extract(build, model, model_dir, cohort, build.hook, pop_folder / "store")
        with _sae_threads():
            sae, report = train_sae(pop_store, _sae_options(build, k=k, expansion=expansion, seed=100 + number), log=lambda m: None)
        sae.config.training["cohort"] = name
        sae.save(pop_folder / "sae", overwrite=True)
        save_training_report(report, pop_folder / "sae")
        import shutil

        shutil.rmtree(pop_folder / "store", ignore_errors=True)
        sae = BatchTopKSAE.load(pop_folder / "sae")
        alignment = align_saes(reference, sae)
        live_shared = alignment.live_shared_fraction(live["adult"], live_latents(sae, held_out)) or 0.0
        document = alignment_document(
            alignment, sae_record(reference, reference_dir, name="adult (BraTS 2018)"), sae_record(sae, pop_folder / "sae", name=name),
            metrics={**alignment_metrics(alignment), "live_shared": live_shared},
            seed_noise_floor={"seed_replica": floors["seed"], "resampled_replica": floors["resample"],
                              "measure": "share of the reference's live latents with a live shared partner"},
        )  # fmt: skip
        path = write_alignment(document, folder / f"adult-vs-{name}.json", overwrite=True)
        validation = model.config.training.get("best_validation", {})
        results[name] = {
            "cases": [c.case_id for c in cohort], "model": f"populations/{name}/model", "sae": f"populations/{name}/sae",
            "alignment": f"populations/{path.name}", "shared_fraction": alignment.shared_fraction(), "live_shared": live_shared,
            "sae_holdout": report["holdout"], "validation": validation,
        }  # fmt: skip
        build.sub(f"{name}: {len(cohort)} cases; fine-tuned validation Dice {validation.get('dice_mean', float('nan')):.3f}; "
                  f"SAE EV {report['holdout']['explained_variance']:.3f}, dead {report['holdout']['dead_fraction']:.3f}; "
                  f"shared with adult {live_shared:.2f} of live latents (floors: seed {floors['seed']:.2f}, resample {floors['resample']:.2f})")  # fmt: skip
    return {"populations": results, "floors": floors}


def step_evaluation(build: ReferenceBuild, folder: Path) -> dict:
    from ..segmentation.scores import segmentation_scores
    from ..sae import BatchTopKSAE, evaluate_reconstruction
    from ..steering.dice_recovered import recovered_scores
    from ..steering.encoded import encode_case
    from ..steering.interventions import LatentEdit
    from ..experiments.leverage import tumour_latents
    from ..data.cases import read_case

    model = build.model()
    model.config.hook_point = build.hook
    sae = BatchTopKSAE.load(build.pipeline.out / build.pipeline.outputs("sae")["sae"])
    config = model.config
    results: dict[str, dict] = {}
    test_vectors = []  # the SAE's reconstruction figures: the test cases' activations (never trained on), as encoded
    for split in ("test", "brats2013"):
        cohort = build.cohort(split)
        rows = []
        for case in cohort:
            images = read_case(case, modalities=config.modalities, allow_missing=True)
            encoded = encode_case(model, sae, images)
            if split == "test":
                test_vectors.append(encoded.activation_vectors(sae))
            scores = segmentation_scores(encoded.labels, images.label, config.class_names)
            dice_model, dice_sae, agreement = recovered_scores(encoded, sae, images.label, config.class_names)
            latents = tumour_latents(encoded.codes, encoded.labels, 3)
            steered = encoded.steer(sae, [LatentEdit(tuple(latents), "scale", 4.0)]) if latents else encoded.labels
            rows.append({"case": images.case_id, "missing": list(encoded.prepared.missing_modalities), **scores,
                         "dice_sae": dice_sae, "dice_recovered": dice_sae / dice_model if dice_model > 0 else float("nan"),
                         "steered_voxels_changed": int((steered != encoded.labels).sum())})  # fmt: skip
            build.sub(f"{split}: {images.case_id}: Dice WT {scores['dice_WT']:.3f}, TC {scores['dice_TC']:.3f}, ET {scores['dice_ET']:.3f}; "
                      f"with the SAE substituted {dice_sae:.3f} vs {dice_model:.3f}")  # fmt: skip
        mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if key.startswith("dice_")}
        results[split] = {"cases": rows, "mean": mean}
    sae_metrics = evaluate_reconstruction(sae, torch.cat(test_vectors))
    test_rows = results["test"]["cases"]
    sae_metrics["dice_recovered"] = float(np.mean([r["dice_sae"] for r in test_rows]) / max(np.mean([r["dice_mean"] for r in test_rows]), 1e-9))
    build.sub(f"SAE on test activations: EV {sae_metrics['explained_variance']:.3f}, L0 {sae_metrics['l0']:.1f}, "
              f"dead {sae_metrics['dead_fraction']:.3f}, Dice recovered {sae_metrics['dice_recovered']:.3f}")  # fmt: skip
    return {"segmentation": results, "sae": sae_metrics}


def step_repair(build: ReferenceBuild, folder: Path) -> dict:
    from ..alignment import load_alignment
    from ..data.cases import read_case
    from ..data.phantoms import degrade_case
    from ..data.preprocessing import brain_mask_from_images
    from ..experiments.repair import ShiftedCase, run_repair, without_modalities
    from ..steering.plausibility import ReferenceStatistics
    from ..segmentation.scores import segmentation_scores
    from ..segmentation.inference import predict_volume
    from ..sae import BatchTopKSAE
    from ..steering.suggestions import suggestions_document, write_suggestions

    s = build.settings
    out = build.pipeline.out
    model = build.model()
    model.config.hook_point = build.hook
    sae = BatchTopKSAE.load(out / build.pipeline.outputs("sae")["sae"])
    # What a tumour of the reference cohort looks like, from its own ground truth (never a test case's).
    labels = []
    for case in build.cohort("train+validation"):
        images = read_case(case, modalities=model.config.modalities)
        labels.append((images.label, brain_mask_from_images(list(images.images.values()))))
    reference = ReferenceStatistics.from_labels(labels)
    # The failure pool: held-out cases under shifts, each with its patient's clean Dice when there is one.
    pool = []
    for case in list(build.cohort("test"))[: s.repair_patients]:
        images = read_case(case, modalities=model.config.modalities)
        clean = segmentation_scores(predict_volume(model, images).labels, images.label, model.config.class_names)["dice_mean"]
        for strength in s.repair_strengths:
            target = folder / "cases" / f"ssa-x{strength:g}"
            degraded = target / case.folder.resolve().name
            if not degraded.exists():
                degrade_case(case.folder.resolve(), target, preset="ssa", seed=s.seed, strength=strength)
            pool.append(ShiftedCase(load_cohort(degraded)[0], "ssa", case.case_id, clean, name=f"{case.case_id} (SSA x{strength:g})"))
        for missing in s.repair_missing:
            pool.append(ShiftedCase(without_modalities(case, [missing], f"-no-{missing}"), f"missing-{missing}", case.case_id, clean,
                                    name=f"{case.case_id} (no {missing})"))  # fmt: skip
    for case in list(build.cohort("brats2013"))[: s.repair_brats2013]:
        pool.append(ShiftedCase(case, "brats2013", case.case_id, None, name=f"{case.case_id} (BraTS 2013)"))
    alignments = {name: load_alignment(out / record["alignment"]) for name, record in build.pipeline.outputs("populations")["populations"].items()}
    specific = {name: list(a.document["specific_a"]) for name, a in alignments.items()}
    report, results = run_repair(model, sae, pool, reference, specific, alphas=s.repair_alphas, fit_steps=s.fit_steps, seed=s.seed, log=build.sub)
    report.write(folder / "report", overwrite=True)
    for row in results["summary"]:
        build.sub(f"{row['arm']}: recovered {row['recovered']:.2f} of {row['cases']}, mean Dice change {row['dice_mean']}"
                  + (f", vs random {row['vs random control']}" if "vs random control" in row else ""))  # fmt: skip
    document = suggestions_document(results, reference, specific, s.repair_alphas, {n: f"alignments/adult-vs-{n}.json" for n in specific})
    write_suggestions(document, folder / "suggestions.json")
    return {"report": "repair/report/README.md", "suggestions": "repair/suggestions.json", "summary": results["summary"],
            "failures": results["failures"], "fits": results["fits"]}  # fmt: skip


def step_hints(build: ReferenceBuild, folder: Path) -> dict:
    from ..experiments.hint_benchmark import hint_failure_pool, run_hints
    from ..steering.guided import GuidedOptions
    from ..sae import BatchTopKSAE

    s = build.settings
    model = build.model()
    model.config.hook_point = build.hook
    sae = BatchTopKSAE.load(build.pipeline.out / build.pipeline.outputs("sae")["sae"])
    split = build.pipeline.outputs("split")
    figures = {"training": {"cases": split["train"], "validation_cases": split["validation"], "test_cases": split["test"]}}
    pool = hint_failure_pool(build.data, figures, folder / "cases", log=build.sub)
    if s.repair_patients is not None:  # tiny builds: fewer cases
        pool = pool[: 2 * s.repair_patients]
    report, results = run_hints(model, sae, pool, max_clicks=s.hint_clicks, options=GuidedOptions(steps=s.hint_steps), seed=s.seed,
                                log=build.sub)  # fmt: skip
    report.write(folder / "report", overwrite=True)
    return {"report": "hints/report/README.md", "results": results}


def step_bundle(build: ReferenceBuild, folder: Path) -> dict:
    from ..bundle import build_bundle
    from ..networks import load_segmenter
    from ..reference.card import model_card

    import json
    import shutil

    out = build.pipeline.out
    # The bundle's model reads its SAE's hook by default: the same weights file, the hook set in its config.
    model_dir = folder / "model-with-hook"
    model_dir.mkdir(exist_ok=True)
    shutil.copyfile(build.model_dir / "model.safetensors", model_dir / "model.safetensors")
    config = json.loads((build.model_dir / "config.json").read_text(encoding="utf-8"))
    config["hook_point"] = build.hook
    atomic_write_text(model_dir / "config.json", json.dumps(config, indent=2) + "\n", overwrite=True)
    load_segmenter(model_dir, device="cpu")
    populations = build.pipeline.outputs("populations")
    card_text, figures = model_card(build)
    atomic_write_text(folder / "MODEL_CARD.md", card_text, overwrite=True)
    # The shipped labels carry their measured hold on the test cases, for the panel's latent table.
    interpret = build.pipeline.outputs("interpret")
    labels = json.loads((out / interpret["labels"]).read_text(encoding="utf-8"))
    if interpret.get("label_mass"):
        from ..interpretation.label_mass import annotate_labels

        measured = interpret["label_mass"]  # builds before case_ids were recorded measured on the test split
        labels = annotate_labels(labels, {**measured, "case_ids": measured.get("case_ids") or build.pipeline.outputs("split")["test"]})
    # ... and which of its latents the seed replica finds again, for the latent table's "Other seed" column.
    from ..alignment.replication import annotate_replication

    replicated = interpret.get("replication")
    if replicated is None:  # a build whose interpret step finished before replication was measured there
        from ..sae import BatchTopKSAE

        replicated = _replication(build, BatchTopKSAE.load(out / build.pipeline.outputs("sae")["sae"]), labels)
    labels = annotate_replication(labels, {**replicated, "replicates": np.array(replicated["replicates"], dtype=object)},
                                  {"sha256": replicated["replica_sha256"], "seed": replicated["replica_seed"]})  # fmt: skip
    atomic_write_text(folder / "latents.json", json.dumps(labels, indent=1) + "\n", overwrite=True)
    bundle = build_bundle(
        model_dir, out / build.pipeline.outputs("sae")["sae"], folder / "bundle", name="adult-glioma",
        labels=folder / "latents.json",
        alignments=[out / p["alignment"] for p in populations["populations"].values()],
        cohort="BraTS 2018 (adult glioma)", card=folder / "MODEL_CARD.md", figures=figures, overwrite=True,
        suggestions=out / build.pipeline.outputs("repair")["suggestions"],
    )  # fmt: skip
    shutil.rmtree(model_dir, ignore_errors=True)
    build.sub(bundle.summary().replace("\n", "\n    "))
    return {"bundle": "bundle/bundle", "figures": figures}


def build_reference(
    data: str | Path,
    out: str | Path,
    settings: ReferenceSettings | None = None,
    overwrite: bool = False,
    publish: str | Path | None = None,
    log: Callable[[str], None] = print,
    until: str | None = None,
    redo: str | None = None,
) -> ReferenceBuild:
    """Run (or continue) the reference build into ``out`` from the real cases in ``data``.

    Args:
        until: stop after this step (e.g. ``"base"``: train the segmenter now, choose the hook later); a rerun
            without it continues from there.
        publish: copy the finished bundle there (replacing what is there) with the build log and the base model's
            per-epoch training history beside it.
        redo: run this step and every later one again, though they finished (e.g. ``"bundle"``: rewrite the card).
    """
    settings = settings or ReferenceSettings()
    data = Path(data)
    for sub in ("brats2018", "brats2013"):
        if not (data / sub).is_dir():
            raise InputFileError(data / sub, "not found: the reference build reads BraTS 2018 and BraTS 2013 cases from DATA")
    torch.manual_seed(settings.seed)
    pipeline = Pipeline(out, STATE_KIND, STATE_NAME, {"settings": asdict(settings), "data": str(data.resolve())},
                        STEPS, overwrite=overwrite, log=log, label="SegLens reference build",
                        defaults={"settings": asdict(ReferenceSettings.unet() if settings.arch == "unet" else ReferenceSettings()),
                                  "data": str(data.resolve())})  # fmt: skip
    log_path = pipeline.out / "build.log"

    def logged(message: str) -> None:
        log(message)
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(message + "\n")

    pipeline.log = logged
    build = ReferenceBuild(data=data, settings=settings, pipeline=pipeline, log=logged)
    logged(f"Reference build in {out} ({hardware()}), started {now_utc()}")
    names = [name for name, _title in STEPS]
    for option, step in (("--until", until), ("--redo", redo)):
        if step is not None and step not in names:
            raise SegLensError(f"unknown build step '{step}' ({option}); use one of {', '.join(names)}")
    if redo is not None:
        forgotten = pipeline.redo(redo)
        logged(f"Redoing step '{redo}' and the steps after it, as asked ({', '.join(forgotten) or 'none had finished'})")
    runners = {
        "split": step_split, "base": step_base, "leverage": step_leverage, "sae": step_sae, "interpret": step_interpret,
        "populations": step_populations, "evaluation": step_evaluation, "repair": step_repair, "hints": step_hints,
        "bundle": step_bundle,
    }  # fmt: skip
    for name in names:
        # Steps that keep what they finished (checkpoints, SAEs, hook measurements) get their folder back when rerun.
        pipeline.run(name, lambda folder, step=runners[name]: step(build, folder), resumable=name in RESUMABLE_STEPS)
        if name == until:
            logged(f"Stopped after step '{until}' as asked; rerun without --until to continue")
            return build
    if publish is not None:
        publish_bundle(pipeline.out / "bundle" / "bundle", Path(publish), log_path, build.model_dir / "training_history.json")
        logged(f"Published the bundle to {publish}")
    return build


def publish_bundle(bundle: Path, target: Path, log_path: Path, training_history: Path | None = None) -> None:
    """Copy a finished bundle, the build log and (when given) the training history to ``target``, replacing what
    was there, atomically. The history holds every epoch's loss and validation Dice, also of runs the build resumed
    (whose lines the build log of a later run does not repeat)."""
    import shutil

    from ..bundle import load_bundle

    load_bundle(bundle)
    tmp = staging_folder(target)
    try:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True)
        shutil.copyfile(log_path, tmp / "build.log")
        if training_history is not None:
            shutil.copyfile(training_history, tmp / "training_history.json")
        load_bundle(tmp)
        publish_folder(tmp, target, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
