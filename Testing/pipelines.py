"""Small trained pipelines shared by the test suites: a segmenter trained on real cases and its SAE.

Training even a tiny model costs tens of seconds on 2 cores, so the steering, interpretation, diffing,
experiment and Slicer suites share one pipeline per pytest session (``real_pipeline`` and ``phantom_pipeline`` in
``conftest.py``). Everything is written to disk as a user would have it: model folder, SAE folder, cohorts.

Sizes: a tiny U-Net (widths 8..64) at 64x64 pixels, hook ``down_3`` (32 channels at 8x8 positions); an SAE with
expansion 4 and k 8 (128 latents). The paper's sizes (k 32, expansion 16) are the defaults of the real commands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from SegLensLogic.data import Cohort, load_cohort
from SegLensLogic.data.phantoms import write_phantom_cohort
from SegLensLogic.networks import Segmenter, load_segmenter
from SegLensLogic.sae import BatchTopKSAE, ExtractionOptions, SAETrainingOptions, extract_activations, train_sae
from SegLensLogic.segmentation.training import TrainingOptions, train_segmenter

QUIET = lambda message: None  # noqa: E731

TINY_UNET = {"features": [8, 8, 16, 32, 64, 8]}
PIPELINE_MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
# Four real cases from three sites train the model (the last validates); the others are held out.
REAL_TRAIN_CASES = ("Brats18_2013_11_1", "Brats18_CBICA_ABM_1", "Brats18_TCIA01_201_1", "Brats18_TCIA02_135_1")
REAL_TEST_CASES = ("Brats18_TCIA02_370_1", "Brats18_CBICA_AME_1", "Brats18_2013_23_1")
SAE_OPTIONS = dict(k=8, expansion=4, batch_size=512, epochs=50, max_steps=400, learning_rate=1e-3,
                   holdout_fraction=0.2, log_every=1000, seed=0)  # fmt: skip


@dataclass
class Pipeline:
    """A trained segmenter and SAE on disk and in memory.

    Attributes:
        root: folder holding everything below.
        model_dir, sae_dir: the model folder and the SAE folder (as ``seglens`` writes them).
        model, sae: loaded on the CPU, in eval mode.
        train: the training cohort (a folder of case folders or symlinks).
        test: held-out cohort (labelled).
    """

    root: Path
    model_dir: Path
    sae_dir: Path
    model: Segmenter
    sae: BatchTopKSAE
    train: Cohort
    test: Cohort
    extra: dict = field(default_factory=dict)


def _link_cohort(source: Path, names, folder: Path, name: str) -> Cohort:
    folder.mkdir(parents=True, exist_ok=True)
    for case in names:
        os.symlink(source / case, folder / case)
    return load_cohort(folder, name=name)


def build_pipeline(root: Path, train: Cohort, test: Cohort, epochs: int = 4, seed: int = 0) -> Pipeline:
    """Train the tiny U-Net on ``train``, extract its hook activations and train an SAE on them."""
    options = TrainingOptions(epochs=epochs, slices_per_epoch=256, batch_size=16, learning_rate=3e-3, val_cases=1, seed=seed)
    train_segmenter(train, root / "model", arch="unet", modalities=PIPELINE_MODALITIES, image_size=64,
                    arch_options=TINY_UNET, options=options, log=QUIET)  # fmt: skip
    model = load_segmenter(root / "model", device="cpu")
    store = extract_activations(model, train, root / "activations", ExtractionOptions(seed=seed), model_dir=root / "model", log=QUIET)
    sae, _ = train_sae(store, SAETrainingOptions(**SAE_OPTIONS), device="cpu", log=QUIET)
    sae.save(root / "sae")
    return Pipeline(root, root / "model", root / "sae", model, BatchTopKSAE.load(root / "sae"), train, test)


def decoder_sae(pipeline: Pipeline, root: Path, hook: str = "up_4") -> Path:
    """An SAE of the pipeline's model at a decoder level (``up_4``: 32 channels at 8x8, the encoder hook's size),
    where edits are not bypassed by skip connections: what hint fixes on the tiny model steer. Returns its folder."""
    store = extract_activations(pipeline.model, pipeline.train, root / f"activations-{hook}", ExtractionOptions(hook=hook, seed=0),
                                model_dir=pipeline.model_dir, log=QUIET)  # fmt: skip
    sae, _ = train_sae(store, SAETrainingOptions(**SAE_OPTIONS), device="cpu", log=QUIET)
    sae.save(root / f"sae-{hook}")
    return root / f"sae-{hook}"


def real_pipeline(brats2018_dir: Path, root: Path) -> Pipeline:
    train = _link_cohort(brats2018_dir, REAL_TRAIN_CASES, root / "adult-train", "adult")
    test = _link_cohort(brats2018_dir, REAL_TEST_CASES, root / "adult-test", "adult-test")
    return build_pipeline(root, train, test)


def phantom_pipeline(root: Path) -> Pipeline:
    cohort = load_cohort(write_phantom_cohort(root / "phantoms", 6, seed=0, shape=(64, 64, 32)), name="phantoms")
    train, test = cohort.split(2)
    return build_pipeline(root, train, test, epochs=3)
