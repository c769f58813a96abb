"""A case is encoded exactly once per steering session and per experiment case: the layers before the hook run
once over its brain slices, however many edits, previews, heatmaps, suggestions and scores follow."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from SegLensLogic.experiments.runs import Experiment
from SegLensLogic.segmentation.inference import prepare_for_model
from SegLensLogic.steering.dice_recovered import dice_recovered
from SegLensLogic.steering import LatentEdit, Region, SteeringSession


class EncoderCounter:
    """Wraps ``model.encode`` and counts the slices that go through it."""

    def __init__(self, model, monkeypatch):
        self.slices = 0
        original = model.encode

        def counted(x, *args, **kwargs):
            self.slices += int(x.shape[0])
            return original(x, *args, **kwargs)

        monkeypatch.setattr(model, "encode", counted)


@pytest.fixture
def setting(real_pipeline):
    model = copy.deepcopy(real_pipeline.model)  # the session-wide model stays unwrapped
    case = next(iter(real_pipeline.test))
    return model, real_pipeline.sae, case, len(prepare_for_model(model, case).brain_slices())


def test_a_session_encodes_its_case_once(setting, monkeypatch):
    model, sae, case, n_slices = setting
    counter = EncoderCounter(model, monkeypatch)
    session = SteeringSession(model, sae, case)
    base = session.segment()
    assert counter.slices == n_slices
    top = [j for j, _ in session.top_latents(3)]
    session.heatmap(top[0])
    session.preview(LatentEdit(top, "scale", 3.0), slice_index=int(session.forward.slices[len(session.forward.slices) // 2]))
    session.apply(LatentEdit(top, "scale", 3.0))
    session.apply(LatentEdit(top[:1], "zero", region=Region.slices(0, session.num_slices // 2)))
    session.undo()
    session.reset()
    assert np.array_equal(session.labels, base)
    assert counter.slices == n_slices  # nothing after segment() ran the encoder again


def test_an_experiment_case_is_encoded_once_for_all_its_sweeps(setting, monkeypatch):
    model, sae, case, n_slices = setting
    counter = EncoderCounter(model, monkeypatch)
    experiment = Experiment(model, sae)
    run = experiment.run_case(case)
    assert counter.slices == n_slices
    top = np.argsort(-run.usage())[:3]
    for alpha in (0.0, 0.5, 2.0, 4.0):
        experiment.steer(run, top, "scale", alpha)
    assert counter.slices == n_slices


def test_dice_recovered_encodes_each_case_once(setting, monkeypatch):
    model, sae, case, n_slices = setting
    counter = EncoderCounter(model, monkeypatch)
    dice_recovered(model, sae, [case])
    assert counter.slices == n_slices


def test_an_encoded_case_gives_the_vectors_an_activation_store_holds(setting, tmp_path, monkeypatch):
    from SegLensLogic.data import Cohort
    from SegLensLogic.sae import ExtractionOptions, extract_activations
    from SegLensLogic.steering.encoded import encode_case

    model, sae, case, n_slices = setting
    counter = EncoderCounter(model, monkeypatch)
    encoded = encode_case(model, sae, case)
    vectors = encoded.activation_vectors(sae)
    assert counter.slices == n_slices  # read from the encoded case, not a second pass
    options = ExtractionOptions(hook=sae.config.hook_point, dtype="float32", min_brain_fraction=sae.config.min_brain_fraction)
    store = extract_activations(model, Cohort("one", [case]), tmp_path / "store", options, log=lambda m: None)
    assert vectors.shape == (len(store), sae.config.d_in) and vectors.dtype == torch.float32
    assert torch.equal(vectors, store.vectors(np.arange(len(store))))
