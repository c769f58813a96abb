"""Tests of cohort scale: the streaming activation store, and extraction and SAE training on Ray.

Without Ray (always run):

- opening a store reads headers only and reading keeps at most a few shards mapped;
- the shard-by-shard split: disjoint parts, every training vector once per epoch over the workers, workers balanced,
  a resumed stream continues exactly, samples are uniform;
- the subsampling stream can start at any case's offset (what lets a Ray worker reproduce a case's draws);
- streaming training converges like the global-order training it stands in for;
- ``--ray``/``--workers`` without Ray installed: one line naming the extra.

With a local Ray cluster (``ray.init(num_cpus=2)``; skipped, with the reason, when Ray is not installed; marked
slow; ``.ci/run`` installs the ``ray`` extra and runs them with ``SEGLENS_REQUIRE_RAY=1``, which turns the skip into
a failure):

- ``seglens extract --workers 2`` on 3 real BraTS cases writes the single-process store: the same manifest, the same
  vectors and index in the same order; only shard boundaries differ (each case its own shards); with subsampling too;
- a worker killed mid-case (after writing a shard) is restarted, its case redone, the half-written attempt never
  used: the store is complete and equal to the single-process one;
- ``seglens train-sae --workers 2`` (Ray Train, DDP, streaming) writes the same SAE folder format and converges
  within tolerance of single-process training (explained variance on every vector of the store within 0.02);
- a training worker killed mid-run: the run restarts from its last checkpoint and ends with the same weights, bit
  for bit, as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, save_tiny_unet, seglens
from SegLensLogic.data.cohort import load_cohort
from SegLensLogic.networks import load_segmenter
from SegLensLogic.sae import ActivationStore, BatchTopKSAE, ExtractionOptions, SAETrainingOptions, extract_activations, train_sae
from SegLensLogic.sae.activations import subsample_generator
from SegLensLogic.sae.trainer import evaluate_reconstruction
from test_sae import write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = lambda message: None  # noqa: E731
REAL_CASES = ("Brats18_CBICA_ABM_1", "Brats18_2013_11_1", "Brats18_TCIA01_201_1")
MODALITIES = ["t1c", "t2f"]
# Ray training against single-process training: explained variance on every vector of the store.
EV_TOLERANCE = 0.02


def planted_store(folder: Path, n: int = 20000, shard_size: int = 3000, seed: int = 3) -> Path:
    """Vectors built from a random dictionary of 64 atoms (d_in 16), sparse codes, noise, an offset."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((64, 16))
    codes = rng.random((n, 64)) * (rng.random((n, 64)) < 0.08)
    vectors = codes @ atoms + 0.05 * rng.standard_normal((n, 16)) + 2.0
    return write_store(folder, vectors, shard_size=shard_size)


def shard_arrays(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every shard's vectors and index as files hold them (``np.load``, no pickle)."""
    manifest = json.loads((folder / "store.json").read_text())
    vectors = [np.load(folder / shard["vectors"], allow_pickle=False) for shard in manifest["shards"]]
    index = [np.load(folder / shard["index"], allow_pickle=False) for shard in manifest["shards"]]
    return vectors, index


def assert_same_store(single: Path, distributed: Path) -> None:
    """The same store up to shard boundaries: manifest, vectors and index (in global order) identical; every
    shard of the distributed store holds one case."""
    a, b = json.loads((single / "store.json").read_text()), json.loads((distributed / "store.json").read_text())
    assert {k: v for k, v in a.items() if k != "shards"} == {k: v for k, v in b.items() if k != "shards"}
    (va, ia), (vb, ib) = shard_arrays(single), shard_arrays(distributed)
    np.testing.assert_array_equal(np.concatenate(va), np.concatenate(vb))
    np.testing.assert_array_equal(np.concatenate(ia), np.concatenate(ib))
    assert all(len(np.unique(index[:, 0])) == 1 for index in ib)
    counts = {case: sum(len(index) for index in ib if index[0, 0] == case) for case in range(len(b["cases"]))}
    assert counts == {number: entry["vectors"] for number, entry in enumerate(b["cases"])}
    assert not [p for p in distributed.parent.iterdir() if p.name.startswith(f".{distributed.name}.")]  # no staging left


# ---------------------------------------------------------------------------------------------------------------
# The streaming store (no Ray)


def test_store_opens_lazily_and_keeps_few_shards_mapped(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5000, 8)).astype(np.float32)
    store = ActivationStore(write_store(tmp_path / "s", vectors, dtype="float32", shard_size=250))
    assert len(store.manifest["shards"]) == 20 and store.open_shards == 4
    assert not store._open  # opening read headers only
    everything = np.arange(len(store))
    np.testing.assert_array_equal(store.vectors(everything[::-1]).numpy(), vectors[::-1])
    assert len(store._open) <= store.open_shards
    batches = np.concatenate([b.numpy() for b in store.batches(everything, 512, seed=0)])
    assert sorted(map(tuple, batches.tolist())) == sorted(map(tuple, vectors.tolist()))
    assert len(store._open) <= store.open_shards
    # A truncated shard is refused on open, naming the file, as before (np.load would have failed on the mmap).
    broken = write_store(tmp_path / "broken", vectors[:100], dtype="float32")
    data = (broken / "vectors_00000.npy").read_bytes()
    (broken / "vectors_00000.npy").write_bytes(data[:-100])
    from SegLensLogic.errors import InputFileError

    with pytest.raises(InputFileError, match="shorter") as info:
        ActivationStore(broken)
    assert info.value.path.name == "vectors_00000.npy"


def test_shard_split_streams_every_training_vector_once_per_epoch(tmp_path):
    rng = np.random.default_rng(1)
    n = 7300  # shards of 1000 and a last one of 300: workers must still get equal shares
    vectors = np.column_stack([np.arange(n), rng.standard_normal((n, 3))]).astype(np.float32)
    store = ActivationStore(write_store(tmp_path / "s", vectors, dtype="float32", shard_size=1000))
    split = store.shard_split(0.1, seed=5)
    train_ids = np.concatenate([store.shard_offsets[s] + split.rows(s, "train") for s in range(8)])
    hold_ids = np.concatenate([store.shard_offsets[s] + split.rows(s, "holdout") for s in range(8)])
    assert len(np.intersect1d(train_ids, hold_ids)) == 0 and len(train_ids) + len(hold_ids) == n
    assert split.n_holdout == len(hold_ids) == 730

    # Two workers: each its own pieces per epoch, balanced, together every training vector once.
    for epoch in range(3):
        shares = split.assignment(epoch, 2)
        pieces = shares[0] + shares[1]
        assert len(pieces) == len(set(pieces))
        sizes = [sum(stop - start for _, start, stop in share) for share in shares]
        assert sum(sizes) == split.n_train and abs(sizes[0] - sizes[1]) <= max(stop - start for _, start, stop in pieces)
    per_worker = 256
    seen = []
    for rank in range(2):
        stream = split.batches(per_worker, rank=rank, world=2)
        share = sum(stop - start for _, start, stop in split.assignment(0, 2)[rank])
        batches = [next(stream) for _ in range(share // per_worker)]
        seen.append(np.concatenate(batches)[:, 0].astype(np.int64))
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen)  # nothing twice within the epoch
    assert set(seen.tolist()) <= set(train_ids.tolist()) and len(seen) > 0.9 * split.n_train
    # Batches are full and mix shards (a buffer of several shards is shuffled together).
    first = next(split.batches(per_worker))
    assert first.shape == (per_worker, 4) and len(np.unique(first[:, 0].numpy() // 1000)) > 1

    # A stream resumed after k batches continues exactly where it was, without reading what it skips.
    plain, resumed = split.batches(100, rank=1, world=2), split.batches(100, rank=1, world=2, skip=57)
    for _ in range(57):
        next(plain)
    for _ in range(40):
        assert torch.equal(next(plain), next(resumed))

    # Samples: uniform over the part, without replacement, never crossing the split.
    sample = split.sample(2000, np.random.default_rng(0), "train")[:, 0].numpy().astype(np.int64)
    assert len(np.unique(sample)) == 2000 and set(sample.tolist()) <= set(train_ids.tolist())
    per_shard = np.bincount(sample // 1000, minlength=8)
    expected = 2000 * split.train_counts / split.n_train
    assert np.all(np.abs(per_shard - expected) < 5 * np.sqrt(expected) + 5)
    held = split.sample(10**6, np.random.default_rng(0), "holdout")[:, 0].numpy().astype(np.int64)
    assert sorted(held.tolist()) == sorted(hold_ids.tolist())


def test_subsampling_stream_can_start_at_any_case():
    whole = subsample_generator(7)
    draws = [whole.random((n, 9)) for n in (5, 3, 4)]  # three cases of 5, 3 and 4 slices, 9 positions each
    reference = np.random.default_rng(7)  # what single-process extraction always drew from
    np.testing.assert_array_equal(np.concatenate(draws), reference.random((12, 9)))
    np.testing.assert_array_equal(subsample_generator(7, offset=(5 + 3) * 9).random((4, 9)), draws[2])


def test_streaming_training_converges_like_global_order(tmp_path):
    store = ActivationStore(planted_store(tmp_path / "s"))
    options = SAETrainingOptions(k=4, expansion=4, batch_size=256, max_steps=400, eval_every=50, log_every=1000, seed=1)
    everything = store.vectors(np.arange(len(store)))
    results = {}
    for stream in (False, True):
        sae, report = train_sae(store, options, device="cpu", log=QUIET, stream=stream)
        results[stream] = evaluate_reconstruction(sae, everything)["explained_variance"]
        assert report["steps"] == 400 and (report.get("order") == "shards") == stream
    print(f"EV on all vectors: global order {results[False]:.4f}, streaming {results[True]:.4f}")
    assert results[False] > 0.6 and abs(results[True] - results[False]) < EV_TOLERANCE


def test_ray_options_without_ray_name_the_extra(tmp_path, capsys, monkeypatch):
    store = planted_store(tmp_path / "s", n=600, shard_size=600)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, err = seglens(capsys, "train-sae", "--activations", store, "--out", tmp_path / "sae", "--workers", 2, "--device", "cpu")
    assert_one_line_error(code, err, "Ray is not installed", 'pip install -e ".[ray]"')
    assert not (tmp_path / "sae").exists()
    model_dir = save_tiny_unet(tmp_path / "model", MODALITIES)
    code, _, err = seglens(capsys, "extract", "--model", model_dir, "--cohort", tmp_path, "--out", tmp_path / "acts", "--ray")
    assert_one_line_error(code, err, "Ray is not installed", 'pip install -e ".[ray]"')
    code, _, err = seglens(capsys, "extract", "--model", model_dir, "--cohort", tmp_path, "--out", tmp_path / "acts", "--workers", 0)
    assert_one_line_error(code, err, "--workers must be at least 1")
    assert not (tmp_path / "acts").exists()
    code, _, err = seglens(capsys, "train-sae", "--activations", store, "--out", tmp_path / "sae", "--workers", 3, "--batch-size", 1000)
    assert_one_line_error(code, err, "--batch-size 1000 is not a multiple of --workers 3")


# ---------------------------------------------------------------------------------------------------------------
# On a local Ray cluster


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster of 2 CPUs for this module, shut down afterwards."""
    try:
        import ray
        import ray.train  # noqa: F401
    except ImportError:
        if os.environ.get("SEGLENS_REQUIRE_RAY"):  # CI installs the extra: a missing Ray is a failure there
            pytest.fail('SEGLENS_REQUIRE_RAY is set but Ray is not installed (pip install -e ".[ray]")')
        pytest.skip('Ray is not installed: pip install -e ".[ray]" (ray[data,train]) to run the Ray tests')
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def real_cohort(brats2018_dir, tmp_path_factory):
    """3 real BraTS 2018 cases (as symlinks) and a tiny random U-Net (hook: 32 channels on an 8x8 grid)."""
    root = tmp_path_factory.mktemp("scale")
    for name in REAL_CASES:
        if not (brats2018_dir / name).is_dir():
            pytest.skip(f"real case {brats2018_dir / name} not found")
        (root / "cohort").mkdir(exist_ok=True)
        os.symlink(brats2018_dir / name, root / "cohort" / name)
    model_dir = save_tiny_unet(root / "model", MODALITIES)
    return {"root": root, "cohort_dir": root / "cohort", "model_dir": model_dir}


@pytest.mark.slow
def test_ray_extraction_writes_the_single_process_store(ray_local, real_cohort, capsys):
    root, cohort_dir, model_dir = real_cohort["root"], real_cohort["cohort_dir"], real_cohort["model_dir"]
    # The command line, 2 workers on the test's Ray cluster, against the single-process command.
    code, _, err = seglens(capsys, "extract", "--model", model_dir, "--cohort", cohort_dir, "--out", root / "single", "--device", "cpu")
    assert code == 0, err
    code, out, err = seglens(capsys, "extract", "--model", model_dir, "--cohort", cohort_dir, "--out", root / "ray", "--workers", 2, "--device", "cpu")
    assert code == 0, err
    assert "2 Ray worker(s)" in out and all(name in out for name in REAL_CASES)
    assert_same_store(root / "single", root / "ray")
    single, distributed = ActivationStore(root / "single"), ActivationStore(root / "ray")
    assert len(distributed.manifest["shards"]) == 3 > len(single.manifest["shards"])  # each case starts a shard
    picks = np.random.default_rng(0).choice(len(single), 50, replace=False)
    assert single.trace(picks) == distributed.trace(picks)
    # Anything built on the store sees the same store: training gives the same SAE bit for bit.
    options = SAETrainingOptions(k=4, expansion=2, batch_size=256, max_steps=20, log_every=1000, seed=0)
    a, _ = train_sae(single, options, device="cpu", log=QUIET)
    b, _ = train_sae(distributed, options, device="cpu", log=QUIET)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

    # Subsampling: each case's draws start where the single-process stream is, so the same positions are kept.
    model, cohort = load_segmenter(model_dir, device="cpu"), load_cohort(cohort_dir)
    from SegLensLogic.sae.distributed import extract_activations_ray

    options = ExtractionOptions(subsample=0.5, seed=3, shard_size=600)
    extract_activations(model, cohort, root / "single-half", options, model_dir=model_dir, log=QUIET)
    extract_activations_ray(model_dir, cohort, root / "ray-half", options, workers=2, device="cpu", log=QUIET)
    assert_same_store(root / "single-half", root / "ray-half")
    assert 0.4 < len(ActivationStore(root / "ray-half")) / len(single) < 0.6


@pytest.mark.slow
def test_ray_extraction_errors_are_one_line_and_leave_nothing(ray_local, real_cohort, tmp_path, capsys):
    import shutil

    cohort_dir = tmp_path / "cohort"
    shutil.copytree(real_cohort["cohort_dir"], cohort_dir, symlinks=True)
    broken = cohort_dir / "Brats18_Broken_1"
    broken.mkdir()
    for source in sorted((cohort_dir / REAL_CASES[0]).iterdir()):
        (broken / source.name.replace(REAL_CASES[0], broken.name)).write_bytes(b"not an image")
    code, _, err = seglens(capsys, "extract", "--model", real_cohort["model_dir"], "--cohort", cohort_dir, "--out", tmp_path / "acts",
                           "--workers", 2, "--device", "cpu")  # fmt: skip
    assert_one_line_error(code, err, "Brats18_Broken_1")
    assert not (tmp_path / "acts").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".acts.")]
    # A cluster without what is asked for is an error, not a wait.
    code, _, err = seglens(capsys, "extract", "--model", real_cohort["model_dir"], "--cohort", real_cohort["cohort_dir"],
                           "--out", tmp_path / "acts", "--workers", 3, "--device", "cpu")  # fmt: skip
    assert_one_line_error(code, err, "3 workers of 1 CPU(s) each", "has 2 CPU(s)")
    code, _, err = seglens(capsys, "extract", "--model", real_cohort["model_dir"], "--cohort", real_cohort["cohort_dir"],
                           "--out", tmp_path / "acts", "--ray", "--device", "cuda")  # fmt: skip
    assert_one_line_error(code, err, "no GPU")


@pytest.mark.slow
def test_killed_extraction_worker_redoes_its_case(ray_local, real_cohort):
    from SegLensLogic.sae.distributed import extract_activations_ray

    root, cohort_dir, model_dir = real_cohort["root"], real_cohort["cohort_dir"], real_cohort["model_dir"]
    model, cohort = load_segmenter(model_dir, device="cpu"), load_cohort(cohort_dir)
    options = ExtractionOptions(shard_size=500)  # about 3 shards per case
    marker = root / "killed.json"
    lines = []
    extract_activations_ray(model_dir, cohort, root / "ray-killed", options, workers=2, device="cpu", log=lines.append,
                            _kill_once={"case": 1, "after_shards": 1, "marker": str(marker)})  # fmt: skip
    # The worker really died mid-case: its attempt held a shard of the case, not the whole case.
    killed = json.loads(marker.read_text())
    assert "vectors_00000.npy" in killed["files"] and "case.json" not in killed["files"]
    assert not Path(killed["attempt"]).exists()  # the half-written attempt was never used
    store = ActivationStore(root / "ray-killed")  # complete and consistent: every listed shard opens, sizes agree
    assert sum(shard["n"] for shard in store.manifest["shards"]) == len(store) == sum(c["vectors"] for c in store.manifest["cases"])
    assert sum(REAL_CASES[1] in line for line in lines) == 1  # logged once, when its redo finished
    extract_activations(model, cohort, root / "single-killed", options, model_dir=model_dir, log=QUIET)
    assert_same_store(root / "single-killed", root / "ray-killed")


@pytest.fixture(scope="module")
def ray_trained(ray_local, tmp_path_factory):
    """A planted store; SAEs trained on it by ``seglens train-sae`` alone and with 2 Ray Train workers."""
    root = tmp_path_factory.mktemp("scale-train")
    store = planted_store(root / "store")
    common = ["--activations", store, "--k", 4, "--expansion", 4, "--batch-size", 256, "--max-steps", 600, "--seed", 1, "--device", "cpu",
              "--resample-every", 100]  # fmt: skip
    from SegLensLogic.app import cli

    assert cli.main([str(a) for a in ["train-sae", "--out", root / "single", *common]]) == 0
    assert cli.main([str(a) for a in ["train-sae", "--out", root / "ray", "--workers", 2, *common]]) == 0
    return {"root": root, "store": store}


@pytest.mark.slow
def test_ray_training_matches_single_process(ray_trained):
    root = ray_trained["root"]
    # The same SAE folder: the same files, the same config apart from the training record.
    assert sorted(p.name for p in (root / "ray").iterdir()) == sorted(p.name for p in (root / "single").iterdir())
    single, distributed = BatchTopKSAE.load(root / "single"), BatchTopKSAE.load(root / "ray")
    a, b = single.config.to_dict(), distributed.config.to_dict()
    assert {k: v for k, v in a.items() if k not in ("training", "threshold")} == {k: v for k, v in b.items() if k not in ("training", "threshold")}
    report = json.loads((root / "ray" / "training_report.json").read_text())
    assert report["workers"] == 2 and report["order"] == "shards" and report["steps"] == 600 and len(report["evaluations"]) == 2
    # Dead latents were resampled on both workers alike (the same seeded draw), in the first half of training.
    assert [r["step"] for r in report["resamples"]] == [100, 200, 300]
    assert not [p for p in root.iterdir() if p.name.endswith(".ray-checkpoints")]  # Ray Train's checkpoints removed
    # Converged within tolerance of single-process training, measured on every vector of the store.
    store = ActivationStore(ray_trained["store"])
    everything = store.vectors(np.arange(len(store)))
    ev = {name: evaluate_reconstruction(sae, everything) for name, sae in (("single", single), ("ray", distributed))}
    print({name: {k: round(v, 4) for k, v in metrics.items()} for name, metrics in ev.items()})
    assert ev["single"]["explained_variance"] > 0.6
    assert abs(ev["ray"]["explained_variance"] - ev["single"]["explained_variance"]) < EV_TOLERANCE
    assert abs(ev["ray"]["l0"] - 4) < 1


@pytest.mark.slow
def test_killed_training_worker_resumes_from_its_checkpoint(ray_trained, tmp_path):
    from SegLensLogic.sae.distributed import train_sae_ray

    # The options of the fixture's `seglens train-sae --workers 2` run: checkpoints at steps 250 and 500.
    options = SAETrainingOptions(k=4, expansion=4, batch_size=256, max_steps=600, seed=1, resample_every=100)
    marker = tmp_path / "killed"
    resumed, report = train_sae_ray(ray_trained["store"], options, workers=2, device="cpu", log=QUIET,
                                    _kill_once={"rank": 1, "step": 500, "marker": str(marker)})  # fmt: skip
    assert marker.read_text() == "500"  # rank 1 died at step 500, before its checkpoint
    assert report["steps"] == 600 and 0 < report["resumed_at_step"] < 500
    # ... resampling rounds included (the round after the checkpoint replayed with the same draw)
    plain_report = json.loads((ray_trained["root"] / "ray" / "training_report.json").read_text())
    assert report["resamples"] == plain_report["resamples"]
    # The restarted run picked up weights, Adam moments, dead-latent counters, schedule and data position: it ends
    # where the uninterrupted run ended, bit for bit.
    plain = BatchTopKSAE.load(ray_trained["root"] / "ray")
    for name, value in plain.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
