"""Tests of the sparse-autoencoder part of SegLens (``SegLensLogic.sae``) and its commands.

- a BatchTopK SAE trained on vectors built from a known random dictionary recovers the dictionary's atoms;
- the inference threshold gives held-out vectors ``k`` active latents on average;
- an SAE folder round-trips exactly, without unpickling, with the normalisation folded into the weights;
- BatchTopK keeps ``n * k`` activations per batch, and its sparse backward equals a dense reference;
- on real BraTS 2018 cases: extraction (provenance, values, brain restriction, subsampling), training, volume codes,
  heatmaps on the input grid, top latents of the tumour, Dice recovered;
- every kind of broken input gives one clear error naming the file; a failed extraction writes nothing;
- ``seglens extract`` -> ``seglens train-sae`` -> ``seglens latents`` end to end.

Models are tiny, randomly initialised U-Nets at 64x64 (hook ``down_3``: 32 channels on an 8x8 grid): the point is
the plumbing and the SAE, not the segmenter's accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_one_line_error, save_tiny_unet, seglens, write_synthetic_case
from SegLensLogic.data.cohort import Cohort, load_cohort
from SegLensLogic.errors import InputFileError, OutputExistsError, SegLensError
from SegLensLogic.segmentation.inference import prepare_for_model
from SegLensLogic.networks import load_segmenter
from SegLensLogic.sae import (
    ActivationStore,
    BatchTopKSAE,
    ExtractionOptions,
    SAEConfig,
    SAETrainingOptions,
    estimate_threshold,
    evaluate_reconstruction,
    extract_activations,
    feature_map_to_vectors,
    train_sae,
    vectors_to_feature_map,
)
from SegLensLogic.sae.activations import brain_fraction_on_grid, mask_fraction_on_grid
from SegLensLogic.sae.batch_topk import batch_topk, train_forward
from SegLensLogic.sae.codes import encode_volume
from SegLensLogic.steering.dice_recovered import dice_recovered, reconstruction_edit
from SegLensLogic.sae.model import SAE_CONFIG_NAME, SAE_WEIGHTS_NAME
from SegLensLogic.sae.trainer import geometric_median, resample_dead_latents

MODALITIES = ["t1c", "t2f"]
REAL_CASES = ("Brats18_CBICA_ABM_1", "Brats18_2013_11_1")
QUIET = lambda message: None  # noqa: E731

# The known dictionary: 128 random unit atoms in 64 dimensions (2x overcomplete, so atoms are in superposition),
# 4 atoms per vector with coefficients in [0.5, 1.5], small Gaussian noise. (In 32 dimensions 128 random atoms are
# so coherent that a one-layer encoder cannot reach an explained variance of 0.8 even with the dictionary found.)
D_IN, N_ATOMS, ATOMS_PER_VECTOR, NOISE = 64, 128, 4, 0.01
SYNTH_OPTIONS = SAETrainingOptions(
    k=ATOMS_PER_VECTOR, expansion=4, batch_size=512, epochs=4, learning_rate=1e-2, log_every=10**9, seed=0
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def write_store(
    folder: Path,
    vectors: np.ndarray,
    index: np.ndarray | None = None,
    dtype: str = "float16",
    shard_size: int | None = None,
    cases: list[dict] | None = None,
    hook_point: str = "synthetic",
) -> Path:
    """Write ``vectors`` ``(n, d_in)`` as an activation store folder, the way :func:`extract_activations` does."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    vectors = np.asarray(vectors)
    n, d_in = vectors.shape
    if index is None:
        index = np.zeros((n, 4), dtype=np.int32)
    shard_size = shard_size or max(n, 1)
    shards = []
    for number, start in enumerate(range(0, max(n, 1), shard_size)):
        stop = min(start + shard_size, n)
        np.save(folder / f"vectors_{number:05d}.npy", vectors[start:stop].astype(dtype))
        np.save(folder / f"index_{number:05d}.npy", np.asarray(index[start:stop], dtype=np.int32))
        shards.append({"vectors": f"vectors_{number:05d}.npy", "index": f"index_{number:05d}.npy", "n": int(stop - start)})
    manifest = {
        "format_version": 1,
        "d_in": int(d_in),
        "dtype": dtype,
        "hook_point": hook_point,
        "feature_map": [1, 1],
        "arch": None,
        "model_dir": None,
        "model_sha256": None,
        "image_size": None,
        "modalities": [],
        "cohort": "synthetic",
        "cases": cases or [],
        "n_vectors": int(n),
        "shards": shards,
        "options": {},
    }
    (folder / "store.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def random_dictionary(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((N_ATOMS, D_IN))
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def dictionary_vectors(atoms: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` vectors, each a positive combination of ``ATOMS_PER_VECTOR`` distinct atoms plus noise: float32."""
    rng = np.random.default_rng(seed)
    which = np.argsort(rng.random((n, len(atoms))), axis=1)[:, :ATOMS_PER_VECTOR]
    coefficients = rng.uniform(0.5, 1.5, (n, ATOMS_PER_VECTOR))
    x = np.einsum("nk,nkd->nd", coefficients, atoms[which]) + NOISE * rng.standard_normal((n, atoms.shape[1]))
    return x.astype(np.float32)







def random_sae(d_in: int = 16, expansion: int = 8, k: int = 4, seed: int = 0) -> BatchTopKSAE:
    torch.manual_seed(seed)
    sae = BatchTopKSAE(SAEConfig(d_in=d_in, expansion=expansion, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    return sae


# ---------------------------------------------------------------------------------------------------------------
# The known dictionary


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory):
    """(atoms, store of 40 000 vectors, 6 000 fresh test vectors never seen by training or the threshold)."""
    atoms = random_dictionary(seed=0)
    folder = tmp_path_factory.mktemp("dictionary") / "store"
    store = ActivationStore(write_store(folder, dictionary_vectors(atoms, 40_000, seed=1)))
    test = torch.from_numpy(dictionary_vectors(atoms, 6_000, seed=2))
    return atoms, store, test


@pytest.fixture(scope="module")
def dictionary_sae(dictionary):
    """An SAE trained on the dictionary store (not saved: ``norm_scale`` still != 1) and its training report."""
    _, store, _ = dictionary
    return train_sae(store, copy.deepcopy(SYNTH_OPTIONS), device="cpu", log=QUIET)


def test_sae_recovers_known_dictionary(dictionary, dictionary_sae):
    atoms, store, test = dictionary
    sae, report = dictionary_sae
    assert sae.d_sae == 4 * D_IN >= N_ATOMS
    decoder = sae.W_dec.detach().double().numpy()
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    best_cosine = (atoms @ decoder.T).max(axis=1)  # each atom's closest decoder row
    recovered = float(np.mean(best_cosine > 0.9))
    print(f"atoms recovered (cosine > 0.9): {recovered:.3f}; median best cosine {np.median(best_cosine):.4f}")
    assert recovered >= 0.9, np.sort(best_cosine)[:20]  # observed 0.98-1.0 over seeds

    # A random decoder of the same size recovers nothing: the check above is not trivially met.
    random_rows = np.random.default_rng(5).standard_normal(decoder.shape)
    random_rows /= np.linalg.norm(random_rows, axis=1, keepdims=True)
    assert np.mean((atoms @ random_rows.T).max(axis=1) > 0.9) == 0

    metrics = evaluate_reconstruction(sae, test)
    print(f"fresh test vectors: {metrics}; training hold-out: {report['holdout']}")
    assert metrics["explained_variance"] > 0.8  # observed ~0.94
    assert report["holdout"]["explained_variance"] > 0.8
    budget = math.ceil(SYNTH_OPTIONS.epochs * math.ceil(len(store) * 0.95 / SYNTH_OPTIONS.batch_size))
    # The stopping rule ends training once the held-out loss stops falling (then a short decay), within budget.
    assert report["steps"] <= budget and report["stopped_early"] == (report["steps"] < budget)
    # The reconstruction is in raw units (norm_scale is applied inside): errors are small next to the signal.
    assert metrics["mse"] < 0.1 * float(test.pow(2).mean())  # observed ~0.056


def test_inference_threshold_gives_k_on_unseen_vectors(dictionary, dictionary_sae):
    _, _, test = dictionary
    sae, _ = dictionary_sae
    k = sae.config.k
    assert sae.threshold.dtype == torch.float32
    assert sae.config.threshold == float(sae.threshold)  # set by training, from a hold-out the test set is not in
    # The fresh vectors were used neither to train nor to estimate the threshold.
    l0 = evaluate_reconstruction(sae, test)["l0"]
    counted = float((sae.encode(test, use_threshold=True) > 0).sum(dim=1).float().mean())
    print(f"mean L0 on unseen vectors: {l0:.3f} (k {k})")
    assert l0 == pytest.approx(counted)
    assert abs(l0 - k) <= 0.1 * k
    # Per-vector counts vary (a single global threshold, not a per-vector top-k).
    counts = (sae.encode(test, use_threshold=True) > 0).sum(dim=1)
    assert counts.min() < k < counts.max()

    # Re-estimated on one half: that half averages k (to one activation), the other half within 10%.
    other = copy.deepcopy(sae)
    first, second = test[:3000], test[3000:]
    theta = estimate_threshold(other, first)
    assert other.threshold.dtype == torch.float32 and float(other.threshold) == pytest.approx(theta)
    on_first = int((other.encode(first, use_threshold=True) > 0).sum())
    assert len(first) * k - 1 <= on_first <= len(first) * k
    assert abs(evaluate_reconstruction(other, second)["l0"] - k) <= 0.1 * k
    # A threshold estimated with chunks equals the one computed in one go.
    assert estimate_threshold(copy.deepcopy(sae), first, chunk=257) == theta

    # Without a threshold, thresholded encoding is refused with a message saying what to do.
    fresh = BatchTopKSAE(SAEConfig(d_in=D_IN, expansion=2, k=4))
    assert torch.isnan(fresh.threshold) and fresh.threshold.dtype == torch.float32
    with pytest.raises(RuntimeError, match="threshold"):
        fresh.encode(test[:4])


def test_save_load_round_trip_is_exact_and_unpickled(dictionary, dictionary_sae, tmp_path, monkeypatch):
    _, _, test = dictionary
    trained, _ = dictionary_sae
    sae = copy.deepcopy(trained)
    x = test[:2000]
    scale = float(sae.norm_scale)
    assert abs(scale - 1) > 0.1, scale  # the data are not at sqrt(d_in) norm: the fold is really exercised
    with torch.no_grad():
        before_recon = sae(x, use_threshold=True)
        before_codes = sae.encode(x, use_threshold=True)

    folder = sae.save(tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == sorted([SAE_CONFIG_NAME, SAE_WEIGHTS_NAME])
    saved_config = json.loads((folder / SAE_CONFIG_NAME).read_text())
    assert saved_config["threshold"] == float(sae.threshold) == sae.config.threshold
    assert saved_config["d_in"] == D_IN and saved_config["k"] == ATOMS_PER_VECTOR and saved_config["expansion"] == 4
    assert saved_config["training"]["norm_scale"] == pytest.approx(scale)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = BatchTopKSAE.load(folder)
    monkeypatch.undo()

    # Normalisation folded: the loaded SAE takes raw activations with norm_scale 1, decoder rows of norm 1/s.
    assert float(loaded.norm_scale) == 1.0 and float(sae.norm_scale) == 1.0
    np.testing.assert_allclose(loaded.W_dec.detach().norm(dim=1).numpy(), 1 / scale, rtol=1e-5)
    assert not loaded.training
    assert loaded.config.to_dict() == sae.config.to_dict()
    assert loaded.threshold.dtype == torch.float32 and float(loaded.threshold) == loaded.config.threshold

    # Exact: the state dicts and all outputs are bit-identical between the saved (folded in place) and loaded SAE.
    assert sae.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        codes = sae.encode(x, use_threshold=True)
        assert torch.equal(codes, loaded.encode(x, use_threshold=True))
        assert torch.equal(sae.decode(codes), loaded.decode(codes))
        assert torch.equal(sae(x), loaded(x))  # BatchTopK path too
        for a, b in zip(sae.encode_sparse(x), loaded.encode_sparse(x)):
            assert torch.equal(a, b)
        # Folding changed no function: same reconstructions as before saving, in raw units.
        after_recon = loaded(x, use_threshold=True)
        after_codes = loaded.encode(x, use_threshold=True)
    flips = int(((before_codes > 0) != (after_codes > 0)).sum())
    print(f"fold: norm_scale {scale:.4f}, {flips} latent(s) flipped at the threshold, max reconstruction change "
          f"{float((after_recon - before_recon).abs().max()):.2e}")
    assert flips <= 2, flips  # only pre-activations within rounding of the threshold may flip
    same_support = ((before_codes > 0) == (after_codes > 0)).all(dim=1)
    assert same_support.float().mean() > 0.99
    torch.testing.assert_close(after_recon[same_support], before_recon[same_support], rtol=0, atol=1e-5)
    torch.testing.assert_close(after_codes[same_support], before_codes[same_support], rtol=1e-5, atol=1e-5)

    # Saving again without overwrite is refused and leaves the folder as it was.
    weights = (folder / SAE_WEIGHTS_NAME).read_bytes()
    with pytest.raises(OutputExistsError, match=SAE_CONFIG_NAME):
        loaded.save(folder)
    assert (folder / SAE_WEIGHTS_NAME).read_bytes() == weights
    stored = load_file(str(folder / SAE_WEIGHTS_NAME))
    loaded.save(folder, overwrite=True)
    again = load_file(str(folder / SAE_WEIGHTS_NAME))  # folding a folded SAE changes nothing
    assert stored.keys() == again.keys() and all(torch.equal(stored[name], again[name]) for name in stored)
    assert sorted(p.name for p in folder.iterdir()) == sorted([SAE_CONFIG_NAME, SAE_WEIGHTS_NAME])


def test_sae_without_threshold_saves_null_and_loads(tmp_path):
    sae = random_sae()
    folder = sae.save(tmp_path / "untrained")
    assert json.loads((folder / SAE_CONFIG_NAME).read_text())["threshold"] is None
    loaded = BatchTopKSAE.load(folder)
    assert torch.isnan(loaded.threshold) and loaded.config.threshold is None


# ---------------------------------------------------------------------------------------------------------------
# BatchTopK semantics and the sparse backward


def test_batch_topk_keeps_n_times_k_with_varying_counts():
    sae = random_sae(d_in=16, expansion=8, k=4)
    n, k = 32, 4
    x = torch.randn(n, 16)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: exactly n * k are kept
    rows, latents, values = batch_topk(sae, x)
    assert len(rows) == len(latents) == len(values) == n * k
    assert bool((values > 0).all())
    pre = sae.pre_activations(x).detach()
    values = values.detach()
    # They are the n*k largest of the whole batch, not the k largest of each vector.
    assert float(values.min()) >= float(torch.topk(pre.flatten(), n * k).values.min())
    torch.testing.assert_close(values, pre[rows, latents])
    assert len(set(zip(rows.tolist(), latents.tolist()))) == n * k  # no pair twice
    counts = torch.bincount(rows, minlength=n)
    assert counts.sum() == n * k and counts.min() != counts.max(), counts  # vectors get different numbers
    # A vector scaled up takes more of the batch's budget.
    x2 = x.clone()
    x2[0] *= 20
    with torch.no_grad():
        sae.b_enc.zero_()
    rows2, _, _ = batch_topk(sae, x2)
    assert torch.bincount(rows2, minlength=n)[0] > k

    # Few positive pre-activations: fewer than n*k are kept, and only positive ones.
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)
    rows, latents, values = batch_topk(sae, x)
    positive = int((sae.pre_activations(x) > 0).sum())
    assert positive < n * k
    assert len(values) == positive and bool((values > 0).all())
    # An explicit k overrides the config's.
    with torch.no_grad():
        sae.b_enc.fill_(5.0)
    assert len(batch_topk(sae, x, k=2)[0]) == n * 2
    # Dense BatchTopK encoding matches the sparse triples.
    codes = sae.encode(x, use_threshold=False)
    assert int((codes > 0).sum()) == n * k


def test_batch_topk_sparse_backward_matches_dense_reference():
    torch.manual_seed(3)
    d_in, expansion, k, n = 12, 6, 3, 20
    sae = random_sae(d_in=d_in, expansion=expansion, k=k, seed=3)
    with torch.no_grad():
        sae.norm_scale.fill_(1.7)  # gradients must flow through the input scaling too
        sae.b_enc.normal_(0.0, 0.3)
    x = torch.randn(n, d_in)
    weights = torch.randn(n, d_in)  # a random linear loss

    # Sparse path: what training runs.
    xs = x.clone().requires_grad_(True)
    rows, latents, values = batch_topk(sae, xs)
    assert values.requires_grad and 0 < len(values) <= n * k
    loss = (sae.decode_sparse(rows, latents, values, n) * weights).sum() + (values**2).sum()
    loss.backward()
    sparse = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sparse["x"] = xs.grad.clone()

    # Dense reference with plain torch ops.
    reference = copy.deepcopy(sae)
    reference.zero_grad(set_to_none=True)
    xd = x.clone().requires_grad_(True)
    pre = torch.relu((xd * reference.norm_scale) @ reference.W_enc + reference.b_enc)
    threshold = torch.topk(pre.detach().flatten(), n * k).values.min()
    mask = (pre.detach() >= threshold) & (pre.detach() > 0)
    assert int(mask.sum()) == len(values)
    z = pre * mask
    dense_out = (z @ reference.W_dec + reference.b_dec) / reference.norm_scale
    torch.testing.assert_close(dense_out, dense_batch_topk_reference(reference, xd, k)[0])
    dense_loss = (dense_out * weights).sum() + (z**2).sum()
    dense_loss.backward()
    torch.testing.assert_close(loss.detach(), dense_loss.detach(), rtol=1e-5, atol=1e-5)
    dense = {name: p.grad for name, p in reference.named_parameters()}
    dense["x"] = xd.grad
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "x"):
        assert dense[name].abs().max() > 0, name
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def dense_batch_topk_reference(sae: BatchTopKSAE, x: torch.Tensor, k: int):
    """Dense BatchTopK with plain torch ops: keep the top ``n*k`` of ``relu(x s W + b)``, decode densely."""
    pre = torch.relu((x * sae.norm_scale) @ sae.W_enc + sae.b_enc)
    threshold = torch.topk(pre.detach().flatten(), x.shape[0] * k).values.min()
    mask = (pre.detach() >= threshold) & (pre.detach() > 0)
    z = pre * mask
    return (z @ sae.W_dec + sae.b_dec) / sae.norm_scale, mask


def test_train_forward_matches_dense_reference():
    """The training pass (CSR codes, sampled top-k) computes the same function and gradients as dense BatchTopK."""
    d_in, expansion, k, n = 32, 8, 4, 512  # n * d_sae = 131072 entries: the sampled top-k shortcut is taken
    sae = random_sae(d_in=d_in, expansion=expansion, k=k, seed=4)
    with torch.no_grad():
        sae.norm_scale.fill_(0.6)
    x = torch.randn(n, d_in)
    weights = torch.randn(n, d_in)

    xs = x.clone().requires_grad_(True)
    x_hat, latents = train_forward(sae, xs)
    assert x_hat.shape == (n, d_in) and 0 < len(latents) <= n * k
    (x_hat * weights).sum().backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()}
    fast["x"] = xs.grad.clone()

    reference = copy.deepcopy(sae)
    reference.zero_grad(set_to_none=True)
    xd = x.clone().requires_grad_(True)
    dense_out, mask = dense_batch_topk_reference(reference, xd, k)
    (dense_out * weights).sum().backward()
    assert int(mask.sum()) == len(latents)
    assert sorted(latents.tolist()) == sorted(torch.nonzero(mask)[:, 1].tolist())
    torch.testing.assert_close(x_hat.detach(), dense_out.detach(), rtol=1e-5, atol=1e-5)
    dense = {name: p.grad for name, p in reference.named_parameters()}
    dense["x"] = xd.grad
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "x"):
        assert dense[name].abs().max() > 0, name
        torch.testing.assert_close(fast[name], dense[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_sampled_topk_is_exact():
    from SegLensLogic.sae.batch_topk import batch_topk_flat_indices

    torch.manual_seed(0)
    for values, m in (
        (torch.rand(200_000), 5_000),  # the sampled shortcut
        (torch.randn(100_000).exp() ** 4, 20_000),  # heavy tail
        (torch.cat([torch.zeros(99_000), torch.rand(1_000) + 1]), 3_000),  # fewer positives than m: zeros fill up
        # m so small that the 1/16 sample's cut usually leaves fewer than m candidates: the full topk takes over.
        *[(torch.rand(1 << 16), 20) for _ in range(10)],
        (torch.rand(1_000), 100),  # small: plain topk
    ):
        got = batch_topk_flat_indices(values, m)
        assert len(got) == m and bool((got[1:] > got[:-1]).all())  # ascending, distinct
        expected = torch.topk(values, m).values
        torch.testing.assert_close(torch.sort(values[got]).values, torch.sort(expected).values, rtol=0, atol=0)


def test_decoder_constraint_and_parallel_gradient_removal(dictionary):
    sae = random_sae(d_in=16, expansion=4, k=4)
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=1).numpy(), 1.0, rtol=1e-6)  # unit rows from the start
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_gradient()
    parallel = (sae.W_dec.grad * sae.W_dec.detach()).sum(dim=1)
    assert parallel.abs().max() < 1e-5
    # Only the parallel component went: the orthogonal part is untouched.
    rows = sae.W_dec.detach()
    expected = before - (before * rows).sum(dim=1, keepdim=True) * rows
    torch.testing.assert_close(sae.W_dec.grad, expected)
    assert (sae.W_dec.grad - before).abs().max() > 1e-3  # it did change something
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.d_sae, 1) + 0.5)
    sae.normalise_decoder()
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=1).numpy(), 1.0, rtol=1e-6)

    # After real training steps (Adam moves rows off the sphere; training puts them back), rows have unit norm.
    _, store, _ = dictionary
    options = SAETrainingOptions(k=4, expansion=2, batch_size=256, max_steps=7, learning_rate=3e-2, log_every=1)
    trained, report = train_sae(store, options, device="cpu", log=QUIET)
    assert report["steps"] == 7 and len(report["history"]) == 7
    np.testing.assert_allclose(trained.W_dec.detach().norm(dim=1).numpy(), 1.0, rtol=1e-5)
    assert all(record["l0"] <= options.k for record in report["history"])


def test_parallel_gradient_removal_on_rows_of_any_norm():
    sae = random_sae(d_in=16, expansion=4, k=4)
    with torch.no_grad():
        sae.W_dec.mul_(0.25)  # rows of norm 1/s with s = 4, as after fold_normalisation
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_gradient()
    parallel = (sae.W_dec.grad * torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)).sum(dim=1)
    assert parallel.abs().max() < 1e-5


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    cluster = torch.randn(200, 3) * 0.1 + torch.tensor([1.0, -2.0, 0.5])
    outliers = torch.full((40, 3), 50.0)
    points = torch.cat([cluster, outliers])
    median = geometric_median(points)
    assert (median - torch.tensor([1.0, -2.0, 0.5])).norm() < 0.2
    assert (points.mean(dim=0) - torch.tensor([1.0, -2.0, 0.5])).norm() > 5
    # It minimises the sum of distances (better than the mean and the coordinate-wise median).
    cost = lambda c: float((points - c).norm(dim=1).sum())  # noqa: E731
    assert cost(median) <= cost(points.median(dim=0).values) + 1e-4
    assert cost(median) < cost(points.mean(dim=0))


def test_feature_map_vectors_order_and_round_trip():
    maps = torch.randn(3, 5, 4, 6)
    vectors = feature_map_to_vectors(maps)
    assert vectors.shape == (3 * 4 * 6, 5)
    n, r, c = 2, 3, 1
    assert torch.equal(vectors[(n * 4 + r) * 6 + c], maps[n, :, r, c])
    assert torch.equal(vectors_to_feature_map(vectors, 3, (4, 6)), maps)
    maps3d = torch.randn(2, 5, 3, 4, 6)
    assert torch.equal(vectors_to_feature_map(feature_map_to_vectors(maps3d), 2, (3, 4, 6)), maps3d)


def test_store_reads_across_shards_in_requested_order(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 8)).astype(np.float32)
    index = np.stack([np.arange(1000) % 2, np.arange(1000), np.arange(1000) % 7, np.arange(1000) % 5], axis=1)
    store = ActivationStore(write_store(tmp_path / "s", vectors, index, dtype="float32", shard_size=300,
                                        cases=[{"case_id": "a"}, {"case_id": "b"}]))  # fmt: skip
    assert len(store) == 1000 and len(store.manifest["shards"]) == 4 and store.d_in == 8
    wanted = np.array([999, 0, 301, 299, 300, 650, 0])
    np.testing.assert_array_equal(store.vectors(wanted).numpy(), vectors[wanted])
    assert store.trace(np.array([301, 0])) == [
        {"case_id": "b", "slice": 301, "row": 301 % 7, "col": 301 % 5},
        {"case_id": "a", "slice": 0, "row": 0, "col": 0},
    ]
    train, hold = store.split(0.1, seed=3)
    assert len(hold) == 100 and len(np.intersect1d(train, hold)) == 0 and len(train) + len(hold) == 1000
    seen = np.concatenate([b.numpy() for b in store.batches(train, 128, seed=1)])
    assert seen.shape == (900, 8)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, vectors[train].tolist()))


def test_train_sae_once_resumes_a_sweep_at_what_it_had_not_finished(tmp_path, monkeypatch):
    """A build cut off part way loads the SAEs it had finished (same options) and trains the others; a folder
    without its report (cut off while saving) or trained with other options is trained again."""
    import SegLensLogic.sae.trainer as trainer
    from SegLensLogic.experiments.sae_sweep import sae_sweep

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 8)).astype(np.float32)
    index = np.stack([np.zeros(2000, int), np.arange(2000) // 16, np.arange(2000) % 4, np.arange(2000) % 4], axis=1)
    store = ActivationStore(write_store(tmp_path / "s", vectors, index, dtype="float32", cases=[{"case_id": "a"}]))
    base = SAETrainingOptions(max_steps=30, batch_size=256, eval_every=10, log_every=10**9)
    grid = [{"k": 2, "expansion": 2}, {"k": 4, "expansion": 2}]
    rows, kept = sae_sweep(store, grid, base=base, keep=True, log=lambda m: None, cache=tmp_path / "sweep")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [
        "k2-expansion2-seed0", "k2-expansion2-seed1", "k4-expansion2-seed0", "k4-expansion2-seed1"]  # fmt: skip

    trained = []
    real_train = trainer.train_sae
    monkeypatch.setattr(trainer, "train_sae", lambda store, options, **kw: trained.append(options) or real_train(store, options, **kw))
    (tmp_path / "sweep" / "k4-expansion2-seed1" / "training_report.json").unlink()  # cut off while saving
    again, kept_again = sae_sweep(store, grid, base=base, keep=True, log=lambda m: None, cache=tmp_path / "sweep")
    assert [(o.k, o.seed) for o in trained] == [(4, 1)]
    assert again[0] == rows[0]
    for key in [(0, 0), (0, 1), (1, 0)]:
        assert torch.equal(kept_again[key][0].W_dec, kept[key][0].W_dec)

    other = dataclasses.replace(base, k=2, expansion=2, seed=0, max_steps=40)
    trainer.train_sae_once(store, other, tmp_path / "sweep" / "k2-expansion2-seed0", log=lambda m: None)
    assert [(o.k, o.max_steps) for o in trained[1:]] == [(2, 40)]
    # The store is made only when training is needed.
    made = []
    trainer.train_sae_once(lambda: made.append(1) or store, other, tmp_path / "sweep" / "k2-expansion2-seed0", log=lambda m: None)
    assert made == [] and len(trained) == 2
    # A report written before an option existed (here resample_every) was trained with its default: still loaded.
    report_path = tmp_path / "sweep" / "k2-expansion2-seed0" / "training_report.json"
    report = json.loads(report_path.read_text())
    del report["options"]["resample_every"]
    report_path.write_text(json.dumps(report))
    trainer.train_sae_once(store, other, tmp_path / "sweep" / "k2-expansion2-seed0", log=lambda m: None)
    assert len(trained) == 2
    trainer.train_sae_once(store, dataclasses.replace(other, resample_every=10), tmp_path / "sweep" / "k2-expansion2-seed0", log=lambda m: None)
    assert len(trained) == 3


def test_sweep_trains_side_by_side_in_worker_processes(tmp_path, monkeypatch):
    """With workers, the sweep's SAEs are trained two at a time in spawned processes into the cache, and the
    sweep reads them back: the same rows and weights as one after another here, nothing trained twice; a worker's
    error reaches the caller whole, naming the file."""
    import SegLensLogic.sae.trainer as trainer
    from SegLensLogic.errors import InputFileError
    from SegLensLogic.experiments.sae_sweep import sae_sweep, train_in_workers

    rng = np.random.default_rng(1)
    store = ActivationStore(write_store(tmp_path / "s", rng.standard_normal((1500, 8)).astype(np.float32), dtype="float32",
                                        cases=[{"case_id": "a"}]))  # fmt: skip
    base = SAETrainingOptions(max_steps=20, batch_size=128, eval_every=10, resample_every=5, log_every=10**9)
    grid = [{"k": 2, "expansion": 2}, {"k": 4, "expansion": 2}]
    messages = []
    rows, kept = sae_sweep(store, grid, base=base, keep=True, log=messages.append, cache=tmp_path / "side", workers=2)
    assert messages[0] == "  training 4 SAEs, 2 at a time (1 thread(s) each)"
    serial, kept_serial = sae_sweep(store, grid, base=base, keep=True, log=lambda m: None, cache=tmp_path / "serial")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == [{k: v for k, v in r.items() if k != "seconds"} for r in serial]
    for key in kept:
        assert torch.equal(kept[key][0].W_enc, kept_serial[key][0].W_enc)
        assert kept[key][1]["resamples"] == kept_serial[key][1]["resamples"]

    trained = []
    monkeypatch.setattr(trainer, "train_sae", lambda *a, **kw: trained.append(1))
    sae_sweep(store, grid, base=base, log=lambda m: None, cache=tmp_path / "side", workers=2)
    assert trained == []
    with pytest.raises(InputFileError, match="missing-store"):
        train_in_workers(tmp_path / "missing-store", [(base, tmp_path / "never")], workers=2, log=lambda m: None)
    assert not (tmp_path / "never").exists()

    # Stopped (Ctrl+C, a terminated build) while a worker trains: the workers are ended at once, and what had
    # finished is kept for the next run.
    short, long = dataclasses.replace(base, max_steps=5), dataclasses.replace(base, max_steps=100_000, eval_every=10**6)

    def stop_after_first(message):
        if message.startswith("    short"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_in_workers(store.folder, [(short, tmp_path / "short"), (long, tmp_path / "long")], workers=2, log=stop_after_first)
    assert trainer.load_trained(tmp_path / "short", short) is not None
    assert not (tmp_path / "long" / "training_report.json").exists()


def test_resampling_puts_dead_latents_where_the_dictionary_misses():
    """Dead latents take the unit residuals of the worst-reconstructed vectors (decoder row, and the encoder column
    at a fifth of the live columns' norm, bias 0); live latents and their Adam moments are untouched, the dead
    ones' moments restart."""
    sae = random_sae(d_in=16, expansion=4, k=2, seed=3)
    optimiser = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(256, 16) * 0.1
    x[:4] += 20 * torch.nn.functional.one_hot(torch.tensor(7), 16).float()  # four vectors along one unexplained axis
    sae(x).pow(2).sum().backward()
    optimiser.step()
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    moments = {name: optimiser.state[p]["exp_avg_sq"].clone() for name, p in sae.named_parameters()}
    with torch.no_grad():
        residual = x - train_forward(sae, x)[0]
    live_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()

    assert resample_dead_latents(sae, optimiser, dead, x, torch.Generator().manual_seed(0)) == 3
    rows = sae.W_dec.detach()[dead]
    assert torch.allclose(rows.norm(dim=1), torch.ones(3), atol=1e-5)
    # Each new row is the residual of one of the four outlying vectors (their error dwarfs the others').
    assert (rows @ torch.nn.functional.normalize(residual[:4], dim=1).t()).max(dim=1).values.min() > 0.999
    assert torch.allclose(sae.W_enc.detach()[:, dead], rows.t() * 0.2 * live_norm, atol=1e-6)
    assert torch.all(sae.b_enc.detach()[dead] == 0)
    for name, p in sae.named_parameters():
        state = optimiser.state[p]["exp_avg_sq"]
        if name in ("W_dec", "b_enc"):
            assert torch.equal(p.detach()[~dead], before[name][~dead]) and torch.equal(state[~dead], moments[name][~dead])
            assert torch.all(state[dead] == 0)
        elif name == "W_enc":
            assert torch.equal(p.detach()[:, ~dead], before[name][:, ~dead]) and torch.all(state[:, dead] == 0)
        else:
            assert torch.equal(p.detach(), before[name])
    # Nothing dead, or everything dead (no live norm to scale by): nothing changes.
    assert resample_dead_latents(sae, optimiser, torch.zeros(sae.d_sae, dtype=torch.bool), x, torch.Generator()) == 0
    assert resample_dead_latents(sae, optimiser, torch.ones(sae.d_sae, dtype=torch.bool), x, torch.Generator()) == 0


def test_resampling_finds_atoms_that_the_aux_loss_leaves_unfound(tmp_path):
    """128 planted atoms used with Zipf frequencies (1/rank: a few common, many rare, like healthy tissue and
    tumour in brain MRI), 3 per vector, an SAE of 128 latents: with dead latents resampled it recovers more of the
    atoms, leaves fewer latents dead and explains more variance; the resampling steps are in the report.
    (Seeds 0-2 all gain 0.04-0.11 of atoms recovered and 0.01-0.03 EV; this checks seed 0.)"""
    rng = np.random.default_rng(5)
    atoms = rng.standard_normal((128, D_IN))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    frequency = 1 / np.arange(1, 129)
    which = np.stack([rng.choice(128, 3, replace=False, p=frequency / frequency.sum()) for _ in range(12_000)])
    x = np.einsum("nk,nkd->nd", rng.uniform(0.5, 1.5, (12_000, 3)), atoms[which]) + 0.02 * rng.standard_normal((12_000, D_IN))
    store = ActivationStore(write_store(tmp_path / "store", x.astype(np.float32)))
    base = SAETrainingOptions(k=3, expansion=2, batch_size=256, max_steps=1500, patience=None, log_every=10**9, seed=0)
    results = {}
    for every in (None, 200):
        sae, report = train_sae(store, dataclasses.replace(base, resample_every=every), device="cpu", log=QUIET)
        decoder = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).double().numpy()
        results[every] = {**report["holdout"], "recovered": float(np.mean((atoms @ decoder.T).max(axis=1) > 0.9)),
                          "resamples": report["resamples"]}  # fmt: skip
        print(f"resample every {every}: {results[every]}")
    off, on = results[None], results[200]
    assert off["resamples"] == [] and [r["step"] for r in on["resamples"]] == [200, 400, 600]
    assert all(r["latents"] > 0 for r in on["resamples"])
    assert on["recovered"] >= off["recovered"] + 0.05
    assert on["dead_fraction"] < off["dead_fraction"]
    assert on["explained_variance"] > off["explained_variance"] + 0.005


# ---------------------------------------------------------------------------------------------------------------
# Real cases


@pytest.fixture(scope="module")
def real(brats2018_dir, tmp_path_factory):
    """A tiny t1c,t2f U-Net, a 2-case real cohort (symlinks), its activation store and the prepared cases."""
    for name in REAL_CASES:
        if not (brats2018_dir / name).is_dir():
            pytest.skip(f"real case {brats2018_dir / name} not found")
    root = tmp_path_factory.mktemp("real")
    model_dir = save_tiny_unet(root / "model", MODALITIES)
    model = load_segmenter(model_dir, device="cpu")
    cohort_dir = root / "cohort"
    cohort_dir.mkdir()
    for name in REAL_CASES:
        os.symlink(brats2018_dir / name, cohort_dir / name)
    cohort = load_cohort(cohort_dir)
    store = extract_activations(model, cohort, root / "store", model_dir=model_dir, log=QUIET)
    prepared = {case.case_id: prepare_for_model(model, case) for case in cohort}
    return {"root": root, "model": model, "model_dir": model_dir, "cohort": cohort, "store": store, "prepared": prepared}


@pytest.fixture(scope="module")
def real_sae(real):
    options = SAETrainingOptions(k=8, expansion=4, batch_size=256, epochs=100, max_steps=300, learning_rate=1e-3,
                                 holdout_fraction=0.2, log_every=100, seed=0)  # fmt: skip
    return train_sae(real["store"], options, device="cpu", log=QUIET)


def test_extracted_store_on_real_cases(real):
    model, store, prepared = real["model"], real["store"], real["prepared"]
    channels, h, w = model.hook_points()[model.config.hook_point]
    assert store.d_in == channels == 32 and (h, w) == (8, 8)
    assert store.hook_point == model.config.hook_point
    manifest = store.manifest
    assert manifest["model_sha256"] and manifest["modalities"] == MODALITIES and manifest["image_size"] == 64
    assert sorted(store.case_ids) == sorted(REAL_CASES)
    assert sorted(p.name for p in store.folder.iterdir()) == ["index_00000.npy", "store.json", "vectors_00000.npy"]
    assert not [p for p in store.folder.parent.iterdir() if p.name.startswith(".store.")]  # no temp folder left

    # len(store) is the number of kept positions: per case, the brain-enough positions of its brain slices.
    total = 0
    for entry in manifest["cases"]:
        case = prepared[entry["case_id"]]
        slices = case.brain_slices()
        assert entry["slices"] == slices.tolist()
        fraction = brain_fraction_on_grid(case, slices, (h, w))
        kept = int((fraction >= 0.5).sum())
        assert entry["vectors"] == kept
        assert 0 < kept < len(slices) * h * w
        total += kept
    assert len(store) == total == manifest["n_vectors"]

    # Provenance: trace() gives the case, a brain slice, and a position of the grid whose patch is mostly brain.
    rng = np.random.default_rng(0)
    picks = np.concatenate([[0, len(store) - 1], rng.choice(len(store), 10, replace=False)])
    traces = store.trace(picks)
    assert {t["case_id"] for t in traces} == set(REAL_CASES)  # the first and last vectors come from different cases
    vectors = store.vectors(picks)
    for t, vector in zip(traces, vectors):
        case = prepared[t["case_id"]]
        assert t["slice"] in set(case.brain_slices().tolist())
        assert 0 <= t["row"] < h and 0 <= t["col"] < w
        assert float(brain_fraction_on_grid(case, np.array([t["slice"]]), (h, w))[0, t["row"], t["col"]]) >= 0.5
        # The stored vector is the activation at that slice/row/col, recomputed directly (float16 storage).
        with torch.no_grad():
            _, activations = model.capture(case.model_input([t["slice"]]), model.config.hook_point)
        expected = activations[0, :, t["row"], t["col"]]
        torch.testing.assert_close(vector, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()) + 1e-4)


def test_extraction_brain_only_off_and_subsample(real):
    model, cohort, prepared, store = real["model"], real["cohort"], real["prepared"], real["store"]
    _, h, w = model.hook_points()[model.config.hook_point]
    options = ExtractionOptions(brain_only=False)
    everything = extract_activations(model, cohort, real["root"] / "all-positions", options, log=QUIET)
    for entry in everything.manifest["cases"]:
        assert entry["vectors"] == len(prepared[entry["case_id"]].brain_slices()) * h * w
    assert len(everything) == sum(len(p.brain_slices()) for p in prepared.values()) * h * w
    # Without the brain restriction, every grid position of every brain slice is there, in order.
    first = prepared[everything.case_ids[0]]
    rows = everything.trace(np.arange(h * w + 1))
    assert [(r["row"], r["col"]) for r in rows[: h * w]] == [(r, c) for r in range(h) for c in range(w)]
    assert rows[0]["slice"] == first.brain_slices()[0] and rows[h * w]["slice"] == first.brain_slices()[1]

    half = extract_activations(model, cohort, real["root"] / "half", ExtractionOptions(subsample=0.5, seed=1), log=QUIET)
    ratio = len(half) / len(store)
    print(f"subsample 0.5 kept {len(half)} of {len(store)} ({ratio:.3f})")
    assert 0.45 < ratio < 0.55
    # The subsampled vectors are a subset of the full store's (same provenance, same values).
    full_keys = {tuple(t.values()) for t in store.trace(np.arange(len(store)))}
    half_keys = [tuple(t.values()) for t in half.trace(np.arange(len(half)))]
    assert set(half_keys) <= full_keys and len(set(half_keys)) == len(half)


def test_extraction_repeats_tumour_positions(real, tmp_path):
    """``tumour_repeat``: every kept position whose patch touches the ground-truth tumour is written that many times,
    as exact copies; the rest once, as without it. A case without a label map is refused by name."""
    model, cohort, prepared, store = real["model"], real["cohort"], real["prepared"], real["store"]
    _, h, w = model.hook_points()[model.config.hook_point]
    repeated = extract_activations(model, cohort, tmp_path / "tumour3", ExtractionOptions(tumour_repeat=3), log=QUIET)
    expected = len(store)
    for entry in store.manifest["cases"]:
        case = prepared[entry["case_id"]]
        slices = case.brain_slices()
        kept = brain_fraction_on_grid(case, slices, (h, w)) >= 0.5
        tumour = mask_fraction_on_grid(case.label > 0, case.geometry, slices, (h, w)) > 0
        expected += 2 * int((kept & tumour).sum())
    assert len(repeated) == expected > len(store)
    keys = [tuple(t.values()) for t in repeated.trace(np.arange(len(repeated)))]
    assert set(keys) == {tuple(t.values()) for t in store.trace(np.arange(len(store)))}  # copies, nothing new
    counts = np.unique(np.array([hash(k) for k in keys]), return_counts=True)[1]
    assert set(counts.tolist()) == {1, 3}
    assert repeated.manifest["options"]["tumour_repeat"] == 3
    unlabelled = tmp_path / "unlabelled"
    write_synthetic_case(unlabelled, "BraTS-SYN-00009-000", seg=False)
    with pytest.raises(SegLensError, match="BraTS-SYN-00009-000.*no label map"):
        extract_activations(model, load_cohort(unlabelled), tmp_path / "none", ExtractionOptions(tumour_repeat=2), log=QUIET)


def test_sae_on_real_activations(real, real_sae):
    store = real["store"]
    sae, report = real_sae
    holdout = report["holdout"]
    print(f"real hold-out: {holdout}")
    assert sae.config.d_in == store.d_in and sae.d_sae == 4 * store.d_in
    assert sae.config.hook_point == store.hook_point and sae.config.model_sha256 == store.manifest["model_sha256"]
    assert report["steps"] == 300
    assert holdout["dead_fraction"] < 0.5
    assert holdout["explained_variance"] > 0
    assert abs(holdout["l0"] - 8) <= 0.25 * 8
    # Better than the best constant: the SAE explains variance the mean does not.
    _, hold_idx = store.split(0.2, seed=0)
    x = store.vectors(hold_idx)
    assert evaluate_reconstruction(sae, x)["mse"] < float((x - x.mean(dim=0)).pow(2).mean())


def test_encode_volume_heatmaps_and_top_latents_on_real_case(real, real_sae):
    model = real["model"]
    case_id = REAL_CASES[0]
    prepared = real["prepared"][case_id]
    sae = copy.deepcopy(real_sae[0])
    sae.save(real["root"] / "real-sae", overwrite=True)
    sae = BatchTopKSAE.load(real["root"] / "real-sae")
    k = sae.config.k
    codes = encode_volume(model, sae, prepared)
    _, h, w = model.hook_points()[model.config.hook_point]
    slices = prepared.brain_slices()
    assert np.array_equal(codes.slices, slices) and codes.grid == (h, w) and codes.d_sae == sae.d_sae
    assert len(codes.offsets) == len(slices) * h * w + 1
    assert codes.offsets[0] == 0 and codes.offsets[-1] == len(codes.latents) == len(codes.values)
    assert np.all(np.diff(codes.offsets) >= 0) and np.all(codes.values > float(sae.threshold))
    l0 = codes.mean_l0()
    # Positions whose patch is mostly brain are those the SAE was trained on; the others (background around the
    # brain on the same slices) get no codes, as extraction leaves them out by default.
    per_position = np.diff(codes.offsets)
    brain = brain_fraction_on_grid(prepared, slices, (h, w)).numpy().reshape(-1) >= 0.5
    l0_brain, l0_background = per_position[brain].mean(), per_position[~brain].mean()
    ratio = codes.nbytes / codes.dense_nbytes
    print(f"encode_volume: mean L0 {l0:.2f} over all {codes.num_positions} positions, {l0_brain:.2f} over brain "
          f"positions, {l0_background:.2f} over background (k {k}); sparse/dense bytes {ratio:.4f} at d_sae {codes.d_sae}")
    assert k / 2 <= l0_brain <= 2 * k
    assert l0_background == 0 and 0 < l0 <= l0_brain
    assert l0 == pytest.approx(per_position.mean())
    assert codes.nbytes == codes.offsets.nbytes + len(codes.latents) * 8 < codes.dense_nbytes

    # The codes are the SAE's thresholded encoding of the model's activations.
    s = len(slices) // 2
    with torch.no_grad():
        _, activations = model.capture(prepared.model_input([slices[s]]), model.config.hook_point)
        expected = sae.encode(feature_map_to_vectors(activations)).numpy()
    expected[~brain.reshape(len(slices), h * w)[s]] = 0
    np.testing.assert_allclose(codes.dense(s), expected, rtol=1e-5, atol=1e-6)
    # dense(s) agrees with latent_map for every latent.
    dense = codes.dense(s)
    maps = np.stack([codes.latent_map(j)[s] for j in range(codes.d_sae)])
    np.testing.assert_array_equal(dense.T.reshape(codes.d_sae, h, w), maps)
    with pytest.raises(ValueError, match="out of range"):
        codes.latent_map(codes.d_sae)

    # Heatmaps: on the input's grid (file order), zero on non-brain slices, max in the latent map's max slice.
    reference_shape = prepared.source.shape
    assert reference_shape == (240, 240, 155)
    frequency = codes.latent_frequency()
    candidates = [j for j in np.argsort(-frequency)[:40] if frequency[j] > 0]

    def margin(j):  # how clearly one slice holds the latent's maximum
        per_slice = np.sort(codes.latent_map(j).max(axis=(1, 2)))[::-1]
        return (per_slice[0] - per_slice[1]) / per_slice[0]

    j = max(candidates, key=margin)
    assert margin(j) > 0.05, margin(j)
    heat = codes.heatmap(j)
    assert heat.shape == reference_shape and heat.dtype == np.float32
    heat_ras = prepared.orientation.apply(heat)
    outside = np.setdiff1d(np.arange(heat_ras.shape[2]), slices)
    assert len(outside) > 0 and not heat_ras[:, :, outside].any()
    latent_map = codes.latent_map(j)
    s_max, r_max, c_max = np.unravel_index(np.argmax(latent_map), latent_map.shape)
    x_max, y_max, z_max = np.unravel_index(np.argmax(heat_ras), heat_ras.shape)
    assert z_max == slices[s_max]
    patch = prepared.geometry.square / h  # voxels per feature-map cell (no padding: the slices are square)
    # Bilinear upsampling peaks at the cell centre: within a quarter cell of it (a flipped axis would be >= 1 cell off).
    assert abs(x_max - (r_max + 0.5) * patch) <= patch / 4 and abs(y_max - (c_max + 0.5) * patch) <= patch / 4
    assert heat_ras.max() <= latent_map.max() * (1 + 1e-5)

    # Every latent's heatmap mass per label region at once equals its heatmap's own sums (the map is linear).
    regions = prepared.label.astype(np.int64)
    mass = codes.heatmap_mass(regions, 4, chunk=7)  # chunks that do not divide the slices
    assert mass.shape == (codes.d_sae, 5)
    for latent in [j, *candidates[:2]]:
        ras = prepared.orientation.apply(codes.heatmap(latent)).astype(np.float64)
        expected = [ras[regions == r].sum() for r in range(4)] + [ras.sum()]
        assert mass[latent] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    silent = np.setdiff1d(np.arange(codes.d_sae), codes.latents)
    assert not mass[silent].any()
    with pytest.raises(ValueError, match="RAS grid"):
        codes.heatmap_mass(regions[:-1], 4)

    # Top latents: over the whole volume the totals are the latent maps' sums; over the tumour, sorted and smaller.
    overall = codes.top_latents(5)
    assert [t for _, t in overall] == sorted((t for _, t in overall), reverse=True)
    for latent, total in overall:
        assert total == pytest.approx(float(codes.latent_map(latent).sum()), rel=1e-4)
    seg_file = real["root"] / "cohort" / case_id / f"{case_id}_seg.nii.gz"
    tumour = np.asanyarray(nib.load(str(seg_file)).dataobj) > 0  # file order, like the heatmaps
    assert tumour.shape == reference_shape and tumour.any()
    in_tumour = codes.top_latents(10, region=tumour)
    assert 0 < len(in_tumour) <= 10
    totals = [t for _, t in in_tumour]
    assert totals == sorted(totals, reverse=True) and all(t > 0 for t in totals)
    everywhere = dict(codes.top_latents(codes.d_sae))
    assert all(total <= everywhere[latent] + 1e-4 for latent, total in in_tumour)
    assert sum(totals) < 0.5 * sum(everywhere[latent] for latent, _ in in_tumour)  # the tumour is a small region
    # Independent reference: each position weighs the tumour fraction of its 30x30-voxel patch (square slices, no
    # padding), summed over the latent's map. SegLens pools the mask after nearest resampling to the model size, so
    # the two agree to ~10% (observed 7% for the top latent), not exactly.
    tumour_ras = prepared.orientation.apply(tumour)[:, :, slices]  # (X, Y, S)
    block = tumour_ras.reshape(h, 240 // h, w, 240 // w, len(slices)).mean(axis=(1, 3)).transpose(2, 0, 1)
    for latent, total in in_tumour[:3]:
        assert total == pytest.approx(float((codes.latent_map(latent) * block).sum()), rel=0.15)
    assert codes.top_latents(5, region=np.zeros_like(tumour)) == []
    whole = codes.top_latents(5, region=np.ones_like(tumour))
    assert [j for j, _ in whole] == [j for j, _ in overall]
    assert [t for _, t in whole] == pytest.approx([t for _, t in overall], rel=1e-5)
    # A slice range keeps only those slices' positions.
    lo, hi = int(slices[10]), int(slices[20])
    ranged = codes.top_latents(3, slice_range=(lo, hi))
    for latent, total in ranged:
        assert total == pytest.approx(float(codes.latent_map(latent)[10:20].sum()), rel=1e-4)
    # A region on the wrong grid is refused.
    with pytest.raises(ValueError, match="grid"):
        codes.top_latents(3, region=np.ones((10, 10, 10), dtype=bool))


def test_sparse_codes_stay_small_at_realistic_sizes(real):
    """At the paper's proportions (d_sae = 128 x 32 latents, k = 32) the sparse codes are a few % of dense."""
    model, store = real["model"], real["store"]
    torch.manual_seed(0)
    sae = BatchTopKSAE(SAEConfig(d_in=store.d_in, expansion=128, k=32, hook_point=store.hook_point))
    estimate_threshold(sae, store.vectors(np.arange(0, len(store), 3)))
    codes = encode_volume(model, sae, real["prepared"][REAL_CASES[0]])
    ratio = codes.nbytes / codes.dense_nbytes
    print(f"d_sae {codes.d_sae}, mean L0 {codes.mean_l0():.1f}: sparse/dense bytes {ratio:.4f}")
    assert ratio <= 0.05


def test_dice_recovered_on_real_case(real, real_sae):
    model = real["model"]
    sae = copy.deepcopy(real_sae[0])
    result = dice_recovered(model, sae, Cohort("one", [real["cohort"][0]]), log=QUIET)
    print(f"dice_recovered: {result}")
    assert {"dice_model", "dice_sae", "dice_recovered", "mask_agreement"} <= set(result)
    assert result["cases"] == 1
    for key in ("dice_model", "dice_sae", "mask_agreement"):
        assert 0.0 <= result[key] <= 1.0, (key, result)
    if result["dice_model"] > 0:
        assert result["dice_recovered"] == pytest.approx(result["dice_sae"] / result["dice_model"])
    # The edit substitutes the SAE's reconstruction and keeps the feature map's shape.
    edit = reconstruction_edit(sae)
    activations = torch.randn(2, store_channels(model), 8, 8)
    edited = edit(activations, np.array([0, 1]))
    assert edited.shape == activations.shape
    torch.testing.assert_close(feature_map_to_vectors(edited), sae(feature_map_to_vectors(activations), use_threshold=True))
    # An SAE from another hook point is refused.
    other = copy.deepcopy(sae)
    other.config.hook_point = "down_2"
    with pytest.raises(SegLensError, match="down_2"):
        dice_recovered(model, other, Cohort("one", [real["cohort"][0]]))


def store_channels(model) -> int:
    return model.hook_points()[model.config.hook_point][0]


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def small_sae_dir(tmp_path) -> Path:
    """A saved, thresholded SAE with d_in 16."""
    sae = random_sae(d_in=16, expansion=2, k=4)
    estimate_threshold(sae, torch.randn(200, 16))
    return sae.save(tmp_path / "sae16")


def test_store_with_other_d_in_is_refused(tmp_path, capsys, small_sae_dir):
    store = write_store(tmp_path / "store8", np.random.default_rng(0).standard_normal((300, 8)))
    code, _, err = seglens(capsys, "evaluate-sae", "--sae", small_sae_dir, "--activations", store)
    line = assert_one_line_error(code, err, store, "8", "16")
    assert "channels" in line
    # The matching store works through the same command.
    ok = write_store(tmp_path / "store16", np.random.default_rng(0).standard_normal((300, 16)))
    code, out, err = seglens(capsys, "evaluate-sae", "--sae", small_sae_dir, "--activations", ok)
    assert code == 0, err
    assert "Reconstruction on 15 vectors:" in out and "explained_variance" in out and "l0" in out  # the 5 % held out
    code, out, err = seglens(capsys, "evaluate-sae", "--sae", small_sae_dir, "--activations", ok, "--sample", 1000)
    assert code == 0 and "Reconstruction on 300 vectors:" in out, err
    code, _, err = seglens(capsys, "evaluate-sae", "--sae", small_sae_dir, "--activations", ok, "--sample", 0)
    assert_one_line_error(code, err, "--sample")


def test_encode_volume_refuses_sae_of_other_d_in(tmp_path, synthetic_case, small_sae_dir):
    model = load_segmenter(save_tiny_unet(tmp_path / "model", MODALITIES), device="cpu")
    case = synthetic_case()
    with pytest.raises(ValueError, match="16-dimensional.*32 channels"):
        encode_volume(model, BatchTopKSAE.load(small_sae_dir), case)


def test_store_errors_name_file_and_problem(tmp_path):
    rng = np.random.default_rng(0)
    # Empty store.
    empty = write_store(tmp_path / "empty", np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(InputFileError, match="empty") as info:
        ActivationStore(empty)
    assert info.value.path == empty
    # A folder without store.json.
    (tmp_path / "bare").mkdir()
    with pytest.raises(InputFileError, match="missing") as info:
        ActivationStore(tmp_path / "bare")
    assert info.value.path == tmp_path / "bare" / "store.json"
    # Not a folder at all.
    with pytest.raises(InputFileError, match="not found"):
        ActivationStore(tmp_path / "nowhere")
    # A shard listed but missing.
    broken = write_store(tmp_path / "broken", rng.standard_normal((500, 8)), shard_size=200)
    (broken / "vectors_00001.npy").unlink()
    with pytest.raises(InputFileError, match="missing") as info:
        ActivationStore(broken)
    assert info.value.path.name == "vectors_00001.npy"
    # A shard of the wrong width.
    wide = write_store(tmp_path / "wide", rng.standard_normal((50, 8)))
    np.save(wide / "vectors_00000.npy", rng.standard_normal((50, 9)).astype(np.float16))
    with pytest.raises(InputFileError, match="shape") as info:
        ActivationStore(wide)
    assert info.value.path.name == "vectors_00000.npy"
    # A shard listed outside the store folder.
    outside = write_store(tmp_path / "outside", rng.standard_normal((50, 8)))
    manifest = json.loads((outside / "store.json").read_text())
    manifest["shards"][0]["vectors"] = "../wide/vectors_00000.npy"
    (outside / "store.json").write_text(json.dumps(manifest))
    with pytest.raises(InputFileError):
        ActivationStore(outside)
    # Invalid JSON.
    bad_json = write_store(tmp_path / "badjson", rng.standard_normal((50, 8)))
    (bad_json / "store.json").write_text("{not json")
    with pytest.raises(InputFileError, match="not valid JSON") as info:
        ActivationStore(bad_json)
    assert info.value.path.name == "store.json"
    # A manifest without d_in.
    no_din = write_store(tmp_path / "nodin", rng.standard_normal((50, 8)))
    manifest = json.loads((no_din / "store.json").read_text())
    del manifest["d_in"]
    (no_din / "store.json").write_text(json.dumps(manifest))
    with pytest.raises(InputFileError, match="d_in"):
        ActivationStore(no_din)


def test_nan_activations_are_refused_when_read(tmp_path, capsys):
    vectors = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    vectors[123, 4] = np.nan
    folder = write_store(tmp_path / "nan", vectors)
    store = ActivationStore(folder)  # opening is lazy
    assert store.vectors(np.arange(100)).shape == (100, 8)
    with pytest.raises(InputFileError, match="NaN") as info:
        store.vectors(np.array([5, 123]))
    assert info.value.path == folder
    inf = vectors.copy()
    inf[123, 4] = np.inf
    with pytest.raises(InputFileError, match="Inf"):
        ActivationStore(write_store(tmp_path / "inf", inf, dtype="float32")).vectors(np.arange(600))
    code, _, err = seglens(capsys, "train-sae", "--activations", folder, "--out", tmp_path / "sae", "--max-steps", 2,
                           "--batch-size", 64, "--k", 2, "--expansion", 2, "--device", "cpu")  # fmt: skip
    assert_one_line_error(code, err, folder, "NaN")
    assert not (tmp_path / "sae").exists()


def test_sae_folder_errors_name_file_and_problem(tmp_path, small_sae_dir, capsys):
    import shutil

    def broken_copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(small_sae_dir, target)
        return target

    with pytest.raises(InputFileError, match="not found"):
        BatchTopKSAE.load(tmp_path / "nowhere")
    no_config = broken_copy("no-config")
    (no_config / SAE_CONFIG_NAME).unlink()
    with pytest.raises(InputFileError, match="missing") as info:
        BatchTopKSAE.load(no_config)
    assert info.value.path == no_config / SAE_CONFIG_NAME
    no_weights = broken_copy("no-weights")
    (no_weights / SAE_WEIGHTS_NAME).unlink()
    with pytest.raises(InputFileError, match="missing") as info:
        BatchTopKSAE.load(no_weights)
    assert info.value.path == no_weights / SAE_WEIGHTS_NAME
    # d_in in the config disagrees with the weights.
    mismatch = broken_copy("mismatch")
    config = json.loads((mismatch / SAE_CONFIG_NAME).read_text())
    config["d_in"] = 24
    (mismatch / SAE_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(InputFileError, match="do not match") as info:
        BatchTopKSAE.load(mismatch)
    assert info.value.path == mismatch / SAE_WEIGHTS_NAME and "24" in str(info.value)
    # Invalid JSON, a non-object, an unknown field, a bad k.
    for name, text, message in (
        ("badjson", "{oops", "not valid JSON"),
        ("list", "[1, 2]", "not a JSON object"),
        ("unknown", json.dumps({**config, "d_in": 16, "colour": "red"}), "unknown SAE config field"),
        ("badk", json.dumps({**config, "d_in": 16, "k": 0}), "'k' must be a positive integer"),
    ):
        folder = broken_copy(name)
        (folder / SAE_CONFIG_NAME).write_text(text)
        with pytest.raises(InputFileError, match=message) as info:
            BatchTopKSAE.load(folder)
        assert info.value.path == folder / SAE_CONFIG_NAME
    # Weights that are not safetensors.
    garbage = broken_copy("garbage")
    (garbage / SAE_WEIGHTS_NAME).write_bytes(b"\x00" * 40)
    with pytest.raises(InputFileError, match="safetensors") as info:
        BatchTopKSAE.load(garbage)
    assert info.value.path == garbage / SAE_WEIGHTS_NAME
    # A threshold in the config that disagrees with the weights.
    theta = broken_copy("theta")
    config = json.loads((theta / SAE_CONFIG_NAME).read_text())
    config["threshold"] = config["threshold"] * 2 + 1
    (theta / SAE_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(InputFileError, match="threshold"):
        BatchTopKSAE.load(theta)
    # Through the command line: one line, naming the file.
    store = write_store(tmp_path / "store16", np.random.default_rng(0).standard_normal((100, 16)))
    code, _, err = seglens(capsys, "evaluate-sae", "--sae", mismatch, "--activations", store)
    assert_one_line_error(code, err, mismatch / SAE_WEIGHTS_NAME, "do not match")
    code, _, err = seglens(capsys, "evaluate-sae", "--sae", no_config, "--activations", store)
    assert_one_line_error(code, err, no_config / SAE_CONFIG_NAME, "missing")


def test_extraction_refuses_existing_output_and_writes_nothing_on_failure(tmp_path):
    model = load_segmenter(save_tiny_unet(tmp_path / "model", MODALITIES), device="cpu")
    cohort_dir = tmp_path / "cohort"
    write_synthetic_case(cohort_dir, "BraTS-SYN-00001-000", seed=1)
    good = load_cohort(cohort_dir)
    out = tmp_path / "stores" / "store"
    store = extract_activations(model, good, out, log=QUIET)
    assert len(store) > 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError) as info:
        extract_activations(model, good, out, log=QUIET)
    assert info.value.path == out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["store"]

    # A second case without FLAIR: the first case is extracted, then the run fails and leaves nothing behind.
    write_synthetic_case(cohort_dir, "BraTS-SYN-00002-000", modalities=("t1n", "t1c", "t2w"), seed=2)
    bad = load_cohort(cohort_dir)
    assert len(bad) == 2
    target = tmp_path / "stores" / "bad-store"
    with pytest.raises(InputFileError, match="t2f") as info:
        extract_activations(model, bad, target, log=QUIET)
    assert "BraTS-SYN-00002-000" in str(info.value)
    assert sorted(p.name for p in target.parent.iterdir()) == ["store"]  # no bad-store, no .bad-store.* temp folder
    # Overwriting with a failing run keeps the old store intact.
    with pytest.raises(InputFileError):
        extract_activations(model, bad, out, overwrite=True, log=QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["store"]
    # Nothing kept (subsample 0) is an error, not an empty store.
    with pytest.raises(SegLensError, match="no activation vectors"):
        extract_activations(model, good, tmp_path / "stores" / "none", ExtractionOptions(subsample=0.0), log=QUIET)
    assert sorted(p.name for p in out.parent.iterdir()) == ["store"]


def test_cli_store_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bare").mkdir()
    out = tmp_path / "sae"
    code, _, err = seglens(capsys, "train-sae", "--activations", tmp_path / "bare", "--out", out, "--device", "cpu")
    assert_one_line_error(code, err, tmp_path / "bare" / "store.json", "missing")
    code, _, err = seglens(capsys, "train-sae", "--activations", tmp_path / "nowhere", "--out", out, "--device", "cpu")
    assert_one_line_error(code, err, tmp_path / "nowhere", "not found")
    assert not (tmp_path / "sae").exists()


# ---------------------------------------------------------------------------------------------------------------
# Command line, end to end


def test_cli_extract_train_latents(tmp_path, capsys):
    model_dir = save_tiny_unet(tmp_path / "model", MODALITIES)
    cohort = tmp_path / "cohort"
    for number in range(3):
        write_synthetic_case(cohort, f"BraTS-SYN-0000{number}-000", seed=number)
    store_dir, sae_dir, heat_dir = tmp_path / "store", tmp_path / "sae", tmp_path / "heatmaps"

    extract = ("extract", "--model", model_dir, "--cohort", cohort, "--out", store_dir, "--device", "cpu")
    code, out, err = seglens(capsys, *extract)
    assert code == 0, err
    store = ActivationStore(store_dir)
    assert f"Wrote {len(store)} vectors of dimension 32" in out
    assert len(store.case_ids) == 3 and store.d_in == 32
    code, _, err = seglens(capsys, *extract)
    assert_one_line_error(code, err, store_dir, "already exists")

    code, out, err = seglens(capsys, "train-sae", "--activations", store_dir, "--out", sae_dir, "--max-steps", 20,
                             "--batch-size", 512, "--k", 8, "--expansion", 4, "--epochs", 100, "--device", "cpu",
                             "--resample-every", 5)  # fmt: skip
    assert code == 0, err
    assert "step      5  resampled" in out and "step     10  resampled" in out and "step     15  resampled" not in out
    assert sorted(p.name for p in sae_dir.iterdir()) == sorted([SAE_CONFIG_NAME, SAE_WEIGHTS_NAME, "training_report.json"])
    sae = BatchTopKSAE.load(sae_dir)
    assert sae.config.d_in == 32 and sae.d_sae == 128 and sae.config.k == 8 and sae.config.threshold is not None
    assert sae.config.hook_point == "down_3" and sae.config.training["steps"] == 20
    report = json.loads((sae_dir / "training_report.json").read_text())
    assert report["steps"] == 20 and report["history"][-1]["step"] == 20
    code, _, err = seglens(capsys, "train-sae", "--activations", store_dir, "--out", sae_dir, "--max-steps", 1)
    assert_one_line_error(code, err, sae_dir / SAE_CONFIG_NAME, "already exists")

    code, out, err = seglens(capsys, "evaluate-sae", "--sae", sae_dir, "--activations", store_dir, "--model", model_dir,
                             "--cohort", cohort, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "Reconstruction on " in out and "Dice recovered:" in out

    case = cohort / "BraTS-SYN-00001-000"
    code, out, err = seglens(capsys, "latents", "--model", model_dir, "--sae", sae_dir, "--case", case, "--top", 3,
                             "--device", "cpu")  # fmt: skip
    assert code == 0, err
    top = [int(line.split()[1]) for line in out.splitlines() if line.strip().startswith("latent ")]
    assert 1 <= len(top) <= 3
    latent = top[0]
    code, out, err = seglens(capsys, "latents", "--model", model_dir, "--sae", sae_dir, "--case", case,
                             "--heatmap", latent, "--out-dir", heat_dir, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    path = heat_dir / f"BraTS-SYN-00001-000-latent{latent:05d}.nii.gz"
    assert path.is_file() and f"Wrote {path}" in out
    heat, reference = nib.load(str(path)), nib.load(str(case / "BraTS-SYN-00001-000-t1c.nii.gz"))
    assert heat.shape == reference.shape
    np.testing.assert_allclose(heat.affine, reference.affine, atol=1e-5)
    data = np.asanyarray(heat.dataobj)
    assert data.dtype == np.float32 and data.max() > 0
    # Its values are the codes' heatmap.
    model = load_segmenter(model_dir, device="cpu")
    expected = encode_volume(model, sae, case).heatmap(latent)
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-6)
    # Not overwritten without --overwrite.
    code, _, err = seglens(capsys, "latents", "--model", model_dir, "--sae", sae_dir, "--case", case,
                           "--heatmap", latent, "--out-dir", heat_dir, "--device", "cpu")  # fmt: skip
    assert_one_line_error(code, err, path, "already exists")


@pytest.mark.parametrize("spatial", [(6, 5), (3, 6, 5)])
def test_feature_maps_of_2d_and_3d_models_flatten_to_one_vector_per_position(spatial):
    from SegLensLogic.sae import feature_map_to_vectors, vectors_to_feature_map

    maps = torch.randn(2, 7, *spatial)
    vectors = feature_map_to_vectors(maps)
    positions = int(np.prod(spatial))
    assert vectors.shape == (2 * positions, 7)
    # Row-major positions within each sample: the last spatial index varies fastest.
    last = tuple(s - 1 for s in spatial)
    assert torch.equal(vectors[positions - 1], maps[0][(slice(None), *last)])
    assert torch.equal(vectors[positions], maps[1][(slice(None),) + (0,) * len(spatial)])
    assert torch.equal(vectors_to_feature_map(vectors, 2, spatial), maps)


def test_default_training_finds_a_planted_dictionary_from_any_seed(tmp_path):
    """With the default recipe (data initialisation, normalised aux loss, warm-up, stopping rule), an SAE with as
    many latents as planted atoms recovers them, leaves few latents dead, and two seeds find the same latents
    (both share at least half of their latents at tau 0.8 by the diffing rule): the dictionary is identifiable."""
    from SegLensLogic.alignment.latent_alignment import align_saes

    atoms = random_dictionary(seed=3)
    store = ActivationStore(write_store(tmp_path / "store", dictionary_vectors(atoms, 20_000, seed=4)))
    saes = []
    for seed in (0, 1):
        options = SAETrainingOptions(k=ATOMS_PER_VECTOR, expansion=N_ATOMS // D_IN, batch_size=512, seed=seed)
        sae, report = train_sae(store, options, device="cpu", log=QUIET)
        decoder = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).double().numpy()
        recovered = float(np.mean((atoms @ decoder.T).max(axis=1) > 0.9))
        print(f"seed {seed}: {report['steps']} steps, recovered {recovered:.3f}, dead {report['holdout']['dead_fraction']:.3f}")
        assert recovered >= 0.9
        assert report["holdout"]["dead_fraction"] <= 0.1
        saes.append(sae)
    alignment = align_saes(saes[0], saes[1], tau=0.8)
    print(f"shared across seeds at tau 0.8: {alignment.shared_fraction():.3f}")
    assert alignment.shared_fraction() >= 0.5


def test_the_sae_owns_its_encoding_rule_and_brain_fraction(real, real_sae, tmp_path):
    sae = copy.deepcopy(real_sae[0])
    # The store's extraction rule is recorded with the SAE trained on it, saved and loaded with it.
    assert sae.config.min_brain_fraction == real["store"].manifest["options"]["min_brain_fraction"] == 0.5
    # latent_codes is encode's rule on chosen latents: the same numbers as those columns of encode().
    x = real["store"].vectors(np.arange(500))
    chosen = [5, 0, 17, 3]
    with torch.no_grad():  # (a subset's matrix product rounds like the full one's, to float32 precision)
        torch.testing.assert_close(sae.latent_codes(x, chosen), sae.encode(x)[:, chosen], atol=1e-5, rtol=1e-5)
    assert sae.inference_threshold() == float(sae.threshold)
    # A folder written before the rule was stored loads with today's value.
    folder = sae.save(tmp_path / "old")
    config = json.loads((folder / SAE_CONFIG_NAME).read_text())
    del config["min_brain_fraction"]
    (folder / SAE_CONFIG_NAME).write_text(json.dumps(config))
    assert BatchTopKSAE.load(folder).config.min_brain_fraction == 0.5
    config["min_brain_fraction"] = 1.5
    (folder / SAE_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(InputFileError, match="min_brain_fraction"):
        BatchTopKSAE.load(folder)
    # Encoding follows the SAE's own rule: a stricter SAE encodes fewer positions of the same case.
    prepared = real["prepared"][REAL_CASES[0]]
    loose = encode_volume(real["model"], sae, prepared)
    sae.config.min_brain_fraction = 0.95
    strict = encode_volume(real["model"], sae, prepared)
    assert 0 < (np.diff(strict.offsets) > 0).sum() < (np.diff(loose.offsets) > 0).sum()
