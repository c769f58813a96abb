"""Scoring a diffing against a planted feature's footprint: a latent on the footprint scores 1.0, random latents score
about chance, and bad inputs give one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import save_tiny_unet

from SegLensLogic.experiments.footprint import (
    FootprintFractions,
    chance_precision,
    footprint_scores,
    latent_footprint_fractions,
    score_against_footprint,
)
from SegLensLogic.data import load_cohort
from SegLensLogic.data.phantoms import read_feature_mask, write_phantom_cohort
from SegLensLogic.errors import SegLensError
from SegLensLogic.networks import load_segmenter
from SegLensLogic.sae import BatchTopKSAE
from SegLensLogic.sae.model import SAEConfig
from SegLensLogic.sae.trainer import estimate_threshold
from SegLensLogic.steering.encoded import encode_case

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODALITIES = ["t1n", "t1c", "t2w", "t2f"]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A random tiny U-Net, an SAE at its hook with a threshold from its activations, two cyst phantoms."""
    from SegLensLogic.steering.resegment import CachedForward
    from SegLensLogic.sae.activations import feature_map_to_vectors

    root = tmp_path_factory.mktemp("footprint")
    model = load_segmenter(save_tiny_unet(root / "model", MODALITIES), device="cpu")
    cohort = load_cohort(write_phantom_cohort(root / "cyst", 2, seed=3, shape=(48, 56, 32), population="pediatric-cyst"))
    hook = model.config.hook_point
    torch.manual_seed(0)
    sae = BatchTopKSAE(SAEConfig(d_in=model.hook_points()[hook][0], expansion=4, k=4, hook_point=hook))
    vectors = torch.cat([feature_map_to_vectors(CachedForward(model, case).activations) for case in cohort])
    estimate_threshold(sae, vectors)
    return model, sae, list(cohort)


def test_a_latent_on_the_footprint_scores_one_and_random_latents_score_chance(setting):
    model, sae, cases = setting
    encoded = {case.case_id: encode_case(model, sae, case) for case in cases}
    counts = sum(np.bincount(e.codes.latents, minlength=sae.d_sae) for e in encoded.values())
    j = int(np.argmax(counts))
    # A hand-made footprint exactly where latent j fires: all of its mass is on it, so it is a feature latent.
    footprints = {cid: e.codes.heatmap(j) > 0 for cid, e in encoded.items()}
    fractions = latent_footprint_fractions(model, sae, cases, footprints)
    assert fractions.fraction[j] == pytest.approx(1.0)
    assert set(fractions.live) == set(np.flatnonzero(counts).tolist())  # dead latents are left out
    scores = score_against_footprint(fractions, specific=[j])
    assert scores["precision"] == 1.0 and scores["n_hits"] == 1 and j in scores["feature_latents"]
    assert scores["recall"] == pytest.approx(1 / scores["n_feature"])
    assert scores["shared_on_feature"] == scores["n_feature"] - 1  # the other feature latents were called shared

    # The planted cyst's footprint (the -feature files): random choices of "specific" latents score about chance,
    # and chance is low by construction (the footprint is a small part of the images).
    fractions = latent_footprint_fractions(model, sae, cases, footprints=None)
    assert fractions.cases_with_footprint == [c.case_id for c in cases]
    live = fractions.live
    expected, upper = chance_precision(len(live), len(fractions.feature_latents()), 5)
    assert expected <= 0.3 and upper >= expected
    rng = np.random.default_rng(0)
    draws = [score_against_footprint(fractions, rng.choice(live, size=5, replace=False))["precision"] for _ in range(400)]
    assert np.mean(draws) == pytest.approx(expected, abs=0.03)
    assert footprint_scores(model, sae, cases, None, specific=live[:5])["chance_precision"] == pytest.approx(expected)


def test_footprint_fractions_measure_mass_on_the_top_slices(setting):
    model, sae, cases = setting
    case = cases[0]
    codes = encode_case(model, sae, case).codes
    j = int(np.bincount(codes.latents, minlength=sae.d_sae).argmax())
    # Slices are ranked by code mass; their heatmap mass is measured inside the brain at image resolution.
    per_slice = codes.grid[0] * codes.grid[1]
    code_mass = np.zeros(len(codes.slices))
    np.add.at(code_mass, codes.positions_of()[codes.latents == j] // per_slice, codes.values[codes.latents == j])
    ranked = codes.slices[np.argsort(-code_mass, kind="stable")]
    brain = codes.prepared.to_input_grid(codes.prepared.brain_mask)
    heat_mass = (np.clip(codes.heatmap(j), 0, None) * brain).sum(axis=(0, 1))
    # A footprint that is one axial slice (the latent's strongest): with one top slice the fraction is 1, with more it
    # is that slice's share of the mass on the top slices.
    z = int(ranked[0])
    mask = np.zeros(brain.shape, dtype=bool)
    mask[:, :, z] = True
    one = latent_footprint_fractions(model, sae, [case], {case.case_id: mask}, latents=[j], top_slices=1)
    assert set(one.fraction) == {j} and one.fraction[j] == pytest.approx(1.0)
    three = latent_footprint_fractions(model, sae, [case], {case.case_id: mask}, latents=[j], top_slices=3)
    assert three.fraction[j] == pytest.approx(heat_mass[z] / heat_mass[ranked[:3]].sum(), rel=1e-4)
    assert 0 < three.fraction[j] < 1


def test_footprint_errors(setting):
    model, sae, cases = setting
    with pytest.raises(SegLensError, match="no case of the cohort has a"):
        latent_footprint_fractions(model, sae, cases, {})
    wrong = {cases[0].case_id: np.ones((3, 3, 3), dtype=bool)}
    with pytest.raises(SegLensError, match="has shape"):
        latent_footprint_fractions(model, sae, cases[:1], wrong)
    with pytest.raises(SegLensError, match="latent ids must lie"):
        latent_footprint_fractions(model, sae, cases, None, latents=[sae.d_sae])
    with pytest.raises(SegLensError, match="threshold"):
        score_against_footprint(FootprintFractions({0: 1.0}, {0: 1.0}, 10), [0], threshold=0)
    assert score_against_footprint(FootprintFractions({0: 0.9, 1: 0.1}, {0: 1.0, 1: 1.0}, 10), [])["precision"] is None
    assert read_feature_mask(cases[0]).shape == encode_case(model, sae, cases[0]).labels.shape
