"""``seglens build-reference``: rebuild the shipped adult-glioma reference bundle from real labelled cases.

Every figure on the bundle's model card is measured by this build, on the weights it ships. Steps (resumable:
rerunning the same command continues where it stopped; the segmenter's training continues from its last epoch):

1. ``split``: the BraTS 2018 cases of ``DATA/brats2018`` into training, validation (checkpoint choice) and test
   cases (one per acquisition group: the 2013 cohort, CBICA, TCIA; never trained on, never used to choose
   anything); the BraTS 2013 cases of ``DATA/brats2013`` are held out whole (another site and protocol).
2. ``base``: the SegFormer trained from scratch on the training cases (:class:`ReferenceSettings`).

The build is deterministic given its seeds on one machine (PyTorch's CPU kernels may differ across CPUs).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.cohort import Cohort, load_cohort
from ..data.io import atomic_write_text
from ..errors import InputFileError
from ..pipeline import Pipeline

STATE_NAME = "build.json"
STATE_KIND = "seglens-reference-build"
# Acquisition groups of BraTS 2018 training cases, read from their ids.
GROUPS = ("Brats18_2013_", "Brats18_CBICA_", "Brats18_TCIA")


@dataclass(frozen=True)
class ReferenceSettings:
    """Every choice the reference build makes (stored in ``build.json`` and on the model card).

    Attributes:
        arch, image_size, crop_to_brain: the segmenter: SegFormer-B0 on the brain's bounding box at 192 px
            (about 1 mm per pixel: the same detail as the whole 240 px slice at 256 px, for 56 % of the cost).
        epochs, slices_per_epoch, batch_size, learning_rate, warmup_steps, weight_decay: training schedule
            (AdamW, linear warm-up then cosine decay).
        modality_dropout: share of training slices that lose random input sequences (so that the BraTS 2013
            cases, which have only T1c and FLAIR, can be segmented and used as a population).
        precision: autocast precision of training's forward passes.
        seed: weights, sampling, augmentation and the split.
    """

    arch: str = "segformer-b0"
    image_size: int = 192
    crop_to_brain: bool = True
    epochs: int = 80
    slices_per_epoch: int = 1024
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 300
    weight_decay: float = 1e-2
    modality_dropout: float = 0.2
    precision: str = "bfloat16"
    seed: int = 0

    @classmethod
    def tiny(cls) -> "ReferenceSettings":
        """Minutes instead of hours: the same steps on a small model (tests, a first look)."""
        return cls(image_size=64, epochs=2, slices_per_epoch=64, batch_size=8, warmup_steps=0, precision="float32")


STEPS = [
    ("split", "split the real cases into training, validation and test"),
    ("base", "train the reference segmenter"),
]


@dataclass
class ReferenceBuild:
    """One build: its data folder, settings, resumable state and log."""

    data: Path
    settings: ReferenceSettings
    pipeline: Pipeline
    log: Callable[[str], None]

    def cohort(self, split: str) -> Cohort:
        """A split written by the ``split`` step as a cohort (``train``, ``validation``, ``test``, ``brats2013``)."""
        return load_cohort(self.pipeline.folder("split") / f"{split}.txt", name=f"brats2018-{split}" if split != "brats2013" else split)


def split_cases(cohort: Cohort, seed: int) -> dict[str, list[str]]:
    """Test: one case of each acquisition group (:data:`GROUPS`), drawn with ``seed``; validation: one more case of
    the largest group; training: the rest. Returns case ids per split."""
    rng = np.random.default_rng(seed)
    ids = sorted(case.case_id for case in cohort)
    groups = {g: [i for i in ids if i.startswith(g)] for g in GROUPS}
    if any(len(members) < 2 for members in groups.values()):
        raise InputFileError(Path(cohort.name), f"needs at least two cases of each group {GROUPS} to hold one out")
    test = [str(rng.choice(members)) for members in groups.values()]
    largest = max(groups.values(), key=len)
    validation = [str(rng.choice([i for i in largest if i not in test]))]
    train = [i for i in ids if i not in test and i not in validation]
    return {"train": train, "validation": validation, "test": test}


def _write_list(path: Path, cases) -> None:
    atomic_write_text(path, "".join(f"{Path(next(iter(c.images.values()))).parent.resolve()}\n" for c in cases), overwrite=True)


def step_split(build: ReferenceBuild, folder: Path) -> dict:
    reference = load_cohort(build.data / "brats2018", name="brats2018")
    shifted = load_cohort(build.data / "brats2013", name="brats2013")
    splits = split_cases(reference, build.settings.seed)
    by_id = {c.case_id: c for c in reference}
    for name, ids in splits.items():
        _write_list(folder / f"{name}.txt", [by_id[i] for i in ids])
    _write_list(folder / "brats2013.txt", list(shifted))
    # Training reads validation cases from the end of its cohort.
    _write_list(folder / "train+validation.txt", [by_id[i] for i in splits["train"] + splits["validation"]])
    for name, ids in splits.items():
        build.log(f"    {name}: {', '.join(ids)}")
    build.log(f"    held out whole: {', '.join(c.case_id for c in shifted)} (BraTS 2013: T1c and FLAIR only)")
    return {**splits, "brats2013": [c.case_id for c in shifted]}


def step_base(build: ReferenceBuild, folder: Path) -> dict:
    from ..training import TrainingOptions, train_segmenter

    s = build.settings
    cohort = load_cohort(build.pipeline.folder("split") / "train+validation.txt", name="brats2018")
    options = TrainingOptions(
        epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate, warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay, slices_per_epoch=s.slices_per_epoch, val_cases=1, spatial_augmentation=True,
        modality_dropout=s.modality_dropout, precision=s.precision, seed=s.seed,
    )  # fmt: skip
    result = train_segmenter(
        cohort, folder / "model", arch=s.arch, modalities=["t1n", "t1c", "t2w", "t2f"], image_size=s.image_size,
        crop_to_brain=s.crop_to_brain, options=options, overwrite=True, resumable=True, log=lambda m: build.log(f"    {m}"),
    )  # fmt: skip
    return {"model": "base/model", "best_epoch": result.best_epoch, "validation": result.best_scores,
            "seconds": result.history[-1]["seconds"], "epochs": len(result.history)}  # fmt: skip


def hardware() -> str:
    """The machine training ran on, in words (for the model card)."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} PyTorch threads"


def build_reference(
    data: str | Path,
    out: str | Path,
    settings: ReferenceSettings | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> ReferenceBuild:
    """Run (or continue) the reference build into ``out`` from the real cases in ``data``."""
    settings = settings or ReferenceSettings()
    data = Path(data)
    for sub in ("brats2018", "brats2013"):
        if not (data / sub).is_dir():
            raise InputFileError(data / sub, "not found: the reference build reads BraTS 2018 and BraTS 2013 cases from DATA")
    torch.manual_seed(settings.seed)
    pipeline = Pipeline(out, STATE_KIND, STATE_NAME, {"settings": asdict(settings), "data": str(data.resolve())},
                        STEPS, overwrite=overwrite, log=log)  # fmt: skip
    build = ReferenceBuild(data=data, settings=settings, pipeline=pipeline, log=log)
    log(f"Reference build in {out} ({hardware()})")
    pipeline.run("split", lambda folder: step_split(build, folder))
    pipeline.run("base", lambda folder: step_base(build, folder), resumable=True)
    return build
