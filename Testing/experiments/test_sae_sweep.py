"""The SAE sweep's choice: quality bars first, then what a clinician can read (tumour latents, repeatable labels)."""

from __future__ import annotations

import copy

import pytest
import torch

from SegLensLogic.experiments.sae_sweep import TUMOUR_LATENTS_MIN, choose_setting, readability


def _row(k, expansion, ev=0.95, dead=0.02, shared=0.7, **more):
    return {"k": k, "expansion": expansion, "explained_variance": ev, "dead_fraction": dead, "seed_shared": shared, **more}


def test_without_readability_the_papers_setting_wins_when_it_meets_the_bars():
    rows = [_row(8, 4, shared=0.9), _row(32, 16, shared=0.6), _row(16, 8, ev=0.5)]
    assert choose_setting(rows, prefer={"k": 32, "expansion": 16})[0] == 1
    rows[1]["dead_fraction"] = 0.5  # the paper's setting fails a bar: the highest seed agreement among the rest
    chosen, why = choose_setting(rows, prefer={"k": 32, "expansion": 16})
    assert chosen == 0 and "highest seed agreement" in why


def test_readability_decides_among_settings_that_meet_the_bars():
    rows = [_row(8, 4, tumour_latents=30, label_agreement=0.4),
            _row(32, 16, tumour_latents=40, label_agreement=0.7),
            _row(16, 8, tumour_latents=12, label_agreement=0.9),  # repeatable, but too few tumour latents to read
            _row(16, 4, ev=0.5, tumour_latents=60, label_agreement=1.0)]  # fmt: skip  (fails the EV bar)
    chosen, why = choose_setting(rows, prefer={"k": 8, "expansion": 4})
    assert chosen == 1 and "most repeatable tumour labels" in why
    few = [dict(r, tumour_latents=TUMOUR_LATENTS_MIN - 1) for r in rows]
    chosen, why = choose_setting(few)
    assert chosen == 2 and f"no remaining setting has {TUMOUR_LATENTS_MIN} latents labelled with a tumour class" in why


def test_tumour_latents_another_seed_finds_again_decide_when_measured():
    rows = [_row(8, 4, tumour_latents=30, label_agreement=0.7, tumour_replicating=3),
            _row(8, 1, tumour_latents=25, label_agreement=0.5, tumour_replicating=9),
            _row(16, 8, tumour_latents=60, label_agreement=0.9, tumour_replicating=20, dead=0.5)]  # fmt: skip  (fails the dead bar)
    chosen, why = choose_setting(rows)
    assert chosen == 1 and "the most tumour latents another seed finds again" in why
    del rows[0]["tumour_replicating"]  # not measured for every setting: the labels' repeatability decides, as before
    assert choose_setting(rows)[0] == 0


def test_readability_labels_both_seeds_on_real_cases(real_pipeline):
    """An SAE against itself: every tumour latent's partner is itself, with the same label; against a copy whose
    decoder is permuted, the partners move with the permutation and the labels follow them."""
    sae = real_pipeline.sae
    permuted = copy.deepcopy(sae)
    order = torch.randperm(sae.d_sae, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        permuted.W_enc.copy_(sae.W_enc[:, order])
        permuted.b_enc.copy_(sae.b_enc[order])
        permuted.W_dec.copy_(sae.W_dec[order])
    cohort = real_pipeline.test
    messages = []
    from SegLensLogic.alignment.replication import comparison_vectors
    from SegLensLogic.sae import ActivationStore

    vectors = comparison_vectors(ActivationStore(real_pipeline.root / "activations"))
    same, moved = readability(real_pipeline.model, [(sae, sae), (sae, permuted)], cohort, top_k=4, log=messages.append, vectors=vectors)
    assert same["tumour_latents"] == same["tumour_latents_seed1"] == moved["tumour_latents_seed1"]
    assert same["tumour_latents"] > 0, "the tiny model's SAE has no tumour latent on real cases"
    assert same["label_agreement"] == pytest.approx(1.0) and moved["label_agreement"] == pytest.approx(1.0)
    assert 0.0 <= same["label_stability"] <= 1.0 and len(messages) == 2
    # every live tumour latent is found again by itself, and by its permuted copy
    assert 0 < same["tumour_replicating"] == moved["tumour_replicating"] <= same["tumour_latents"]
    assert "found again by it" in messages[0]
