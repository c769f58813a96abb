"""Cohort training on real cases: a short run must beat the untrained model on a held-out case; fine-tuning from
a base model keeps its architecture and records its hash; healthy cohorts train on aseg structures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SegLensLogic.data import Cohort, case_from_mapping, find_case, load_cohort, read_case
from SegLensLogic.data.phantoms import write_phantom_cohort
from SegLensLogic.errors import OutputExistsError, SegLensError
from SegLensLogic.segmentation.inference import predict_volume
from SegLensLogic.segmentation.scores import segmentation_scores
from SegLensLogic.networks import build_segmenter, load_segmenter, weights_sha256
from SegLensLogic.segmentation.training import SliceDataset, TrainingOptions, augment, train_segmenter

TINY_UNET = {"features": [8, 8, 16, 32, 64, 8]}
TINY_SEGFORMER = {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64, "num_attention_heads": [1, 1, 2, 4]}
QUIET = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def real_cohort(brats2018_dir):
    cohort = load_cohort(brats2018_dir)
    # Three cases from three sites to train (the last of them validates), a fourth from another site to test.
    by_id = {case.case_id: case for case in cohort}
    train = Cohort("adult-mini", [by_id["Brats18_2013_11_1"], by_id["Brats18_CBICA_ABM_1"], by_id["Brats18_TCIA01_201_1"]])
    return train, by_id["Brats18_TCIA02_370_1"]


def test_short_training_beats_untrained_model_on_held_out_real_case(real_cohort, tmp_path):
    train, held_out = real_cohort
    options = TrainingOptions(epochs=4, slices_per_epoch=256, batch_size=16, learning_rate=3e-3, val_cases=1, seed=0)
    result = train_segmenter(
        train, tmp_path / "model", arch="unet", modalities=["t1c", "t2f"], image_size=64, arch_options=TINY_UNET,
        options=options, log=QUIET,
    )  # fmt: skip
    torch.manual_seed(0)
    untrained = build_segmenter(result.model.config).eval()

    images = read_case(held_out, modalities=["t1c", "t2f"])
    trained_scores = segmentation_scores(predict_volume(result.model, images).labels, images.label)
    untrained_scores = segmentation_scores(predict_volume(untrained, images).labels, images.label)
    assert trained_scores["dice_WT"] > untrained_scores["dice_WT"] + 0.1, (trained_scores, untrained_scores)
    assert trained_scores["dice_mean"] > untrained_scores["dice_mean"]

    # What was saved is the best checkpoint, with its provenance and per-epoch history.
    saved = load_segmenter(tmp_path / "model", device="cpu")
    assert saved.config.training["best_epoch"] == result.best_epoch
    assert saved.config.training["validation_cases"] == ["Brats18_TCIA01_201_1"]
    history = json.loads((tmp_path / "model" / "training_history.json").read_text())
    assert len(history) == 4 and all("validation" in h for h in history)
    best = max(history, key=lambda h: h["validation"]["dice_mean"])
    assert best["epoch"] == result.best_epoch
    with torch.no_grad():
        x = torch.randn(2, 2, 64, 64)
        assert torch.equal(saved(x), result.model.cpu()(x))


def test_fine_tuning_from_a_base_model_keeps_architecture_and_records_its_hash(tmp_path):
    cohort = load_cohort(write_phantom_cohort(tmp_path / "cohort", 3, shape=(64, 64, 24)))
    options = TrainingOptions(epochs=1, slices_per_epoch=32, batch_size=8, val_cases=1)
    train_segmenter(cohort, tmp_path / "base", arch="segformer-b0", image_size=64, arch_options=TINY_SEGFORMER, options=options, log=QUIET)
    base_hash = weights_sha256(tmp_path / "base")

    tuned = train_segmenter(cohort, tmp_path / "tuned", init=tmp_path / "base", options=options, log=QUIET).model
    assert tuned.config.arch == "segformer-b0" and tuned.config.arch_options == TINY_SEGFORMER
    assert tuned.config.training["init_model_sha256"] == base_hash
    assert weights_sha256(tmp_path / "base") == base_hash  # the base model is untouched
    assert weights_sha256(tmp_path / "tuned") != base_hash
    with pytest.raises(SegLensError, match="takes"):
        train_segmenter(cohort, tmp_path / "other", init=tmp_path / "base", modalities=["t1c"], options=options, log=QUIET)
    with pytest.raises(OutputExistsError):
        train_segmenter(cohort, tmp_path / "tuned", init=tmp_path / "base", options=options, log=QUIET)


def test_healthy_cohort_trains_on_aseg_structures(bert_case, voxelmorph_case, tmp_path):
    voxelmorph = case_from_mapping({"t1": "test_vol.nii.gz", "seg": "test_scan.npz:seg"}, label_scheme="aseg", base=voxelmorph_case)
    cohort = Cohort("healthy", [find_case(bert_case), voxelmorph])
    options = TrainingOptions(epochs=1, slices_per_epoch=32, batch_size=8, val_cases=1)
    model = train_segmenter(cohort, tmp_path / "healthy", arch="unet", image_size=64, arch_options=TINY_UNET, options=options, log=QUIET).model
    assert model.config.label_scheme == "aseg"
    assert model.config.class_names[1:4] == ["thalamus", "caudate", "putamen"]
    assert model.config.num_classes == 9
    assert "dice_hippocampus" in model.config.training["best_validation"]


def test_mixed_label_schemes_are_refused(bert_case, brats2018_case, tmp_path):
    cohort = Cohort("mixed", [find_case(bert_case), find_case(brats2018_case)])
    with pytest.raises(SegLensError, match="mixes label schemes"):
        train_segmenter(cohort, tmp_path / "m", modalities=["t1n"], image_size=64, arch_options=TINY_UNET, log=QUIET)


def test_unlabelled_case_is_refused(brats2023_case, tmp_path):
    with pytest.raises(SegLensError, match="no label map"):
        train_segmenter(load_cohort(brats2023_case), tmp_path / "m", image_size=64, arch_options=TINY_UNET, log=QUIET)


def test_slice_dataset_and_augmentation_keep_images_and_labels_aligned(tmp_path):
    cohort = load_cohort(write_phantom_cohort(tmp_path / "cohort", 1, shape=(64, 64, 24)))
    from SegLensLogic.data import prepare_case

    prepared = prepare_case(read_case(cohort[0]), ["t1c", "t2f"], 64)
    dataset = SliceDataset([prepared])
    assert len(dataset) == len(prepared.brain_slices())
    assert dataset.images.shape == (len(dataset), 2, 64, 64) and dataset.images.dtype == torch.float16
    assert dataset.foreground.any() and not dataset.foreground.all()
    images, labels = dataset.batch(torch.arange(len(dataset)), torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    flipped_images, flipped_labels = augment(images.clone(), labels.clone(), generator)
    # Flips move images and labels together: the tumour (labels > 0) stays where FLAIR is bright.
    for before, after, lab_before, lab_after in zip(images, flipped_images, labels, flipped_labels):
        if lab_before.any():
            ratio = (after[1][lab_after[0] > 0].mean() - after[1].mean()) / (before[1][lab_before[0] > 0].mean() - before[1].mean())
            assert 0.8 < float(ratio) < 1.25
        assert int(lab_after.sum()) == int(lab_before.sum())
    assert not torch.equal(flipped_labels, labels)  # something was flipped


def test_training_is_reproducible_from_a_seed(tmp_path):
    cohort = load_cohort(write_phantom_cohort(tmp_path / "cohort", 2, shape=(64, 64, 24)))

    def run(name, seed):
        options = TrainingOptions(epochs=1, slices_per_epoch=16, batch_size=8, val_cases=1, seed=seed)
        return train_segmenter(cohort, tmp_path / name, image_size=64, arch_options=TINY_UNET, options=options, log=QUIET)

    a, b, c = run("a", 3), run("b", 3), run("c", 4)
    state_a, state_b, state_c = (r.model.state_dict() for r in (a, b, c))
    # Multi-threaded CPU reductions may differ in the last bits between runs; the same seed stays within rounding.
    assert all(torch.allclose(state_a[k].float(), state_b[k].float(), atol=1e-5) for k in state_a)
    assert np.isclose(a.history[0]["loss"], b.history[0]["loss"], rtol=1e-5)
    assert not all(torch.allclose(state_a[k].float(), state_c[k].float(), atol=1e-3) for k in state_a)


def test_an_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch, one_torch_thread):
    """``resumable=True`` writes the whole training state after each epoch; a run killed during epoch 3 and
    started again continues after epoch 2 and ends with the weights and history of an uninterrupted run."""
    import SegLensLogic.segmentation.training as training

    cohort = load_cohort(write_phantom_cohort(tmp_path / "cohort", 2, shape=(64, 64, 24)))
    options = TrainingOptions(epochs=3, slices_per_epoch=16, batch_size=8, val_cases=1, seed=5, warmup_steps=3,
                              spatial_augmentation=True, modality_dropout=0.3)  # fmt: skip

    def run(name):
        return train_segmenter(cohort, tmp_path / name, arch="segformer-b0", image_size=64, arch_options=TINY_SEGFORMER,
                               options=options, log=QUIET, resumable=True)  # fmt: skip

    # (one_torch_thread: bit-exact comparisons need one reduction order)
    straight = run("straight")

    real_validate, calls = training._validate, []

    def dies_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(training, "_validate", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "training_state.json").read_text())
    assert state["epoch"] == 2
    monkeypatch.setattr(training, "_validate", real_validate)
    resumed = run("resumed")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.model.config.accepts_missing_modalities

    # another cohort or other options are not resumed silently
    other = TrainingOptions(**{**options.__dict__, "learning_rate": 0.01})
    (tmp_path / "resumed" / "model.safetensors").unlink()
    with pytest.raises(SegLensError, match="another cohort, model or options"):
        train_segmenter(cohort, tmp_path / "resumed", arch="segformer-b0", image_size=64, arch_options=TINY_SEGFORMER,
                        options=other, log=QUIET, resumable=True)  # fmt: skip
