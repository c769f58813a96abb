#!/usr/bin/env python
"""Benchmark: cohort scale on Ray -- vectors per second with 1 and 2 workers, and memory against store size.

What it measures
----------------
Three parts, in one run (``--parts`` picks some):

* **extract** -- ``seglens extract`` throughput on real BraTS cases (default: 4 cases of
  ``../shared/data/brats2018``) with a randomly initialised U-Net (MONAI ``BasicUNet``, default features, hook
  ``down_3``; 256 px, 128 with ``--quick``): the single-process :func:`extract_activations` (1 torch thread), then
  :func:`extract_activations_ray` with 1 and 2 workers of 1 CPU each on a local Ray cluster of 2 CPUs started once
  before the timings. Vectors/s = vectors in the store / wall seconds of the whole call (for Ray: actors starting,
  models loading, shards moved into place, all included). Also the mean seconds a case took on its worker (from
  the driver's log lines; single process: between log lines), which shows when workers compete for busy cores.
  The script checks that every store holds the same vectors.
* **train** -- SAE training throughput on a synthetic store (``--train-vectors``, default 1M vectors of ``d_in``
  64, float16): single-process :func:`train_sae` streaming (1 torch thread), then :func:`train_sae_ray` (Ray Train,
  DDP, gloo on the CPU) with 1 and 2 workers of 1 CPU each; the same step budget, batch 4096 vectors per step (each
  of 2 workers takes 2048), expansion 8, k 32, no held-out evaluation during the run. Vectors/s is measured inside
  the training loop: the median over sliding windows of 25 steps of vectors per second (Ray Train's start-up, about
  20 s here, shows in the whole call's wall time, reported apart).
* **memory** -- peak resident memory (``VmHWM``) of a fresh process per store size (default 1M, 5M and 20M vectors
  of ``d_in`` 32 in float16, shards of 262,144; 0.5M and 2M with ``--quick``), for three jobs: one full epoch of the
  streaming order (:meth:`ActivationStore.shard_split` ``.batches``: every shard read, batches of 4096 float32),
  ``train_sae(stream=True)`` for 100 steps (initialisation sample, 65,536 held-out vectors, threshold, evaluation),
  and the default global-order ``train_sae`` for 100 steps (its exact split and shuffle keep two index arrays of 8
  bytes per vector). A process that only imports SegLens gives the baseline. Stores are written into a temporary
  folder (``--tmp``) and deleted at the end.

Ratios are within this run: 2 workers / 1 worker, and each against the single-process path; with ``--repeats R``
each path runs R times and the best is kept. On a machine with other jobs running the numbers are noisy (the
1-minute load average at the start is printed).

Usage (from the repository root; needs ``pip install -e ".[ray]"`` for the Ray parts)::

    python benchmarks/scale.py --quick          # 128 px, 2 cases, smaller stores: a few minutes on 2 CPU cores
    python benchmarks/scale.py                  # 256 px, 4 cases, stores of 1M / 5M / 20M vectors
    python benchmarks/scale.py --parts memory --sizes 1e6 2e7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from common import load_average, write_json  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "brats2018"
DEFAULT_CASES = ("Brats18_CBICA_ABM_1", "Brats18_2013_11_1", "Brats18_TCIA01_201_1", "Brats18_TCIA02_135_1")
MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
CLASS_NAMES = ["background", "necrotic core", "edema", "enhancing tumour"]
QUIET = lambda message: None  # noqa: E731


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("extract", "train", "memory"), default=["extract", "train", "memory"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of BraTS 2018 cases (default: %(default)s)")
    parser.add_argument("--cases", type=int, default=None, help="real cases to extract (default 4; 2 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="U-Net input side (default 256; 128 with --quick)")
    parser.add_argument("--train-vectors", type=float, default=1e6, help="vectors in the training store (default 1e6)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 150; 60 with --quick)")
    parser.add_argument("--sizes", type=float, nargs="+", default=None, help="store sizes of the memory part (default 1e6 5e6 2e7; 5e5 2e6 with --quick)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the synthetic stores are written (default: the system's temporary folder)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each extraction and training path; the best is kept (default 1)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes on 2 CPU cores")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--child", nargs=2, metavar=("JOB", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = args.cases or (2 if args.quick else 4)
    args.image_size = args.image_size or (128 if args.quick else 256)
    args.steps = args.steps or (60 if args.quick else 150)
    args.sizes = [int(s) for s in (args.sizes or ([5e5, 2e6] if args.quick else [1e6, 5e6, 2e7]))]
    return args


def write_synthetic_store(folder: Path, n: int, d_in: int, shard_size: int = 1 << 18, seed: int = 0) -> Path:
    """A store of ``n`` float16 vectors (sparse non-negative mixtures of 4 * d_in directions plus noise), written
    shard by shard in the format :func:`extract_activations` writes."""
    from SegLensLogic.data.io import atomic_write_text

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    atoms = rng.standard_normal((4 * d_in, d_in)).astype(np.float32)
    shards = []
    for number, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        codes = rng.random((m, 4 * d_in), dtype=np.float32)
        codes *= codes > 0.95
        vectors = (codes @ atoms + 0.1 * rng.standard_normal((m, d_in), dtype=np.float32)).astype(np.float16)
        index = np.zeros((m, 4), dtype=np.int32)
        index[:, 1] = (start + np.arange(m)) // 1024
        np.save(folder / f"vectors_{number:05d}.npy", vectors)
        np.save(folder / f"index_{number:05d}.npy", index)
        shards.append({"vectors": f"vectors_{number:05d}.npy", "index": f"index_{number:05d}.npy", "n": int(m)})
    manifest = {"format_version": 1, "d_in": d_in, "dtype": "float16", "hook_point": "synthetic", "feature_map": [32, 32],
                "cohort": "synthetic", "cases": [], "n_vectors": int(n), "shards": shards, "options": {}}  # fmt: skip
    atomic_write_text(folder / "store.json", json.dumps(manifest) + "\n")
    return folder


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (``VmHWM``; ``getrusage`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(job: str, store_path: str) -> None:
    """One memory job in this (fresh) process; prints ``{"peak_rss_mb", "seconds", ...}`` as JSON."""
    import torch

    torch.set_num_threads(1)
    from SegLensLogic.sae import ActivationStore, SAETrainingOptions, train_sae

    start = time.perf_counter()
    result: dict = {}
    if job != "import":
        store = ActivationStore(store_path)
        if job == "stream-epoch":
            split = store.shard_split(0.05, seed=0)
            stream = split.batches(4096)
            batches = split.n_train // 4096
            total = 0.0
            for _ in range(batches):
                total += float(next(stream)[:, 0].sum())  # touch the data
            result = {"batches": batches, "open_shards_max": store.open_shards}
        else:
            options = SAETrainingOptions(k=32, expansion=8, batch_size=4096, max_steps=100, eval_every=10**9, patience=None, log_every=10**9, seed=0)
            _, report = train_sae(store, options, device="cpu", log=QUIET, stream=job == "train-stream")
            result = {"steps": report["steps"], "heldout_ev": report["holdout"]["explained_variance"]}
    result.update({"peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(time.perf_counter() - start, 1)})
    print(json.dumps(result))


def run_child(job: str, store: Path | str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", job, str(store)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{job} on {store} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_memory(args, tmp: Path) -> dict:
    print("\n## Peak resident memory against store size (fresh process per job; d_in 32, float16, shards of 262,144)\n")
    baseline = run_child("import", "-")
    print(f"- baseline (a process that imports SegLens and torch): {baseline['peak_rss_mb']:.0f} MB\n")
    print("| vectors | on disk | stream one epoch | train_sae(stream=True), 100 steps | train_sae (global order), 100 steps |")
    print("|---|---|---|---|---|")
    rows = []
    for n in args.sizes:
        folder = write_synthetic_store(tmp / f"store-{n}", n, 32)
        disk = sum(p.stat().st_size for p in folder.iterdir()) / 1e9
        row = {"vectors": n, "disk_gb": round(disk, 2)}
        for job in ("stream-epoch", "train-stream", "train-global"):
            row[job] = run_child(job, folder)
        rows.append(row)
        cells = [f"{row[j]['peak_rss_mb']:.0f} MB ({row[j]['seconds']:.0f} s)" for j in ("stream-epoch", "train-stream", "train-global")]
        print(f"| {n:,} | {disk:.2f} GB | " + " | ".join(cells) + " |", flush=True)
        shutil.rmtree(folder)
    return {"baseline": baseline, "rows": rows}


def part_extract(args, ray, tmp: Path) -> dict:
    import torch

    from SegLensLogic.data.cohort import load_cohort
    from SegLensLogic.networks import SegmenterConfig, build_segmenter, load_segmenter
    from SegLensLogic.sae import ActivationStore, ExtractionOptions, extract_activations
    from SegLensLogic.sae.distributed import extract_activations_ray

    names = [name for name in DEFAULT_CASES if (args.data / name).is_dir()][: args.cases]
    if len(names) < args.cases:
        raise SystemExit(f"benchmark: {args.cases} cases wanted, {len(names)} found in {args.data}")
    cohort_dir = tmp / "cohort"
    cohort_dir.mkdir()
    for name in names:
        os.symlink(args.data / name, cohort_dir / name)
    cohort = load_cohort(cohort_dir)
    torch.manual_seed(0)
    config = SegmenterConfig(arch="unet", modalities=MODALITIES, class_names=CLASS_NAMES, image_size=args.image_size)
    model_dir = build_segmenter(config).save_pretrained(tmp / "model")
    model = load_segmenter(model_dir, device="cpu")
    hook = model.config.hook_point
    print(f"\n## Extraction: {len(names)} real cases, random U-Net at {args.image_size} px, hook {hook} {model.hook_points()[hook]}\n")
    torch.set_num_threads(1)
    runs: dict[str, dict] = {}
    for repeat in range(args.repeats):
        stamps = [time.perf_counter()]
        extract_activations(model, cohort, tmp / "single", ExtractionOptions(), model_dir=model_dir, overwrite=True,
                            log=lambda line: stamps.append(time.perf_counter()) if line.startswith("  ") else None)  # fmt: skip
        per_case = float(np.mean(np.diff(stamps)))
        record(runs, "single process (1 thread)", stamps[-1] - stamps[0], per_case)
        for workers in (1, 2):
            lines: list[str] = []
            start = time.perf_counter()
            extract_activations_ray(model_dir, cohort, tmp / f"ray-{workers}", ExtractionOptions(), workers=workers, device="cpu",
                                    overwrite=True, log=lines.append)  # fmt: skip
            seconds = time.perf_counter() - start
            per_case = float(np.mean([float(re.search(r"\(([0-9.]+) s on a worker\)", line).group(1)) for line in lines if "on a worker" in line]))
            record(runs, f"Ray, {workers} worker{'s' if workers > 1 else ''} (1 CPU each)", seconds, per_case)
    n = len(ActivationStore(tmp / "single"))
    reference = ActivationStore(tmp / "single").vectors(np.arange(n))
    same = all(bool((ActivationStore(tmp / f"ray-{w}").vectors(np.arange(n)) == reference).all()) for w in (1, 2))
    one = runs["Ray, 1 worker (1 CPU each)"]["seconds"]
    print("| path | seconds | vectors/s | vs 1 Ray worker | seconds per case, on its worker |\n|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['seconds']:.1f} | {n / run['seconds']:,.0f} | {one / run['seconds']:.2f}x | {run['per_case']:.1f} |")
    print(f"\n- {n:,} vectors; the three stores hold the same vectors: {same}; best of {args.repeats} run(s)")
    return {"cases": names, "image_size": args.image_size, "vectors": n, "runs": runs, "same_vectors": same}


def record(runs: dict, name: str, seconds: float, per_case: float) -> None:
    """Keep the fastest of the repeats."""
    if name not in runs or seconds < runs[name]["seconds"]:
        runs[name] = {"seconds": seconds, "per_case": per_case}


def part_train(args, ray, tmp: Path) -> dict:
    import torch

    from SegLensLogic.sae import ActivationStore, SAETrainingOptions, train_sae
    from SegLensLogic.sae.distributed import train_sae_ray

    store = ActivationStore(write_synthetic_store(tmp / "train-store", int(args.train_vectors), 64))
    options = SAETrainingOptions(k=32, expansion=8, batch_size=4096, max_steps=args.steps, eval_every=10**9, patience=None,
                                 log_every=5, seed=0)  # fmt: skip
    print(f"\n## SAE training: {len(store):,} vectors of d_in 64, {64 * 8} latents, k 32, batch 4096, {args.steps} steps\n")

    def loop_rate(report: dict) -> float:
        """Median, over sliding windows of 25 steps (history every 5 steps, times to 0.1 s), of vectors trained per
        second: robust to the pauses that other jobs on the machine cause."""
        history = report["history"][1:]  # from step 5 on: past the first steps' allocations
        rates = [(b["step"] - a["step"]) * options.batch_size / (b["seconds"] - a["seconds"])
                 for a, b in zip(history, history[5:]) if b["seconds"] > a["seconds"]]  # fmt: skip
        return float(np.median(rates))

    runs: dict[str, dict] = {}
    torch.set_num_threads(1)
    for repeat in range(args.repeats):
        start = time.perf_counter()
        _, report = train_sae(store, options, device="cpu", log=QUIET, stream=True)
        keep_best(runs, "single process, streaming (1 thread)", loop_rate(report), time.perf_counter() - start)
        for workers in (1, 2):
            start = time.perf_counter()
            _, report = train_sae_ray(store, options, workers=workers, device="cpu", log=QUIET)
            keep_best(runs, f"Ray Train, {workers} worker{'s' if workers > 1 else ''} (1 CPU each)", loop_rate(report), time.perf_counter() - start)
    one = runs["Ray Train, 1 worker (1 CPU each)"]["vectors_per_s"]
    print("| path | vectors/s in the loop | vs 1 Ray worker | whole call (s) |\n|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['vectors_per_s']:,.0f} | {run['vectors_per_s'] / one:.2f}x | {run['wall_s']:.1f} |")
    print(f"\n- best of {args.repeats} run(s)")
    shutil.rmtree(store.folder)
    return runs


def keep_best(runs: dict, name: str, rate: float, wall: float) -> None:
    if name not in runs or rate > runs[name]["vectors_per_s"]:
        runs[name] = {"vectors_per_s": rate, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    load = load_average()
    print("# Cohort scale on Ray")
    print(f"- {os.cpu_count()} CPUs, 1-minute load average {load:.2f} at the start" if load is not None else f"- {os.cpu_count()} CPUs")
    results: dict = {"load_average_1min_at_start": load, "cpu_count": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="seglens-scale-", dir=args.tmp))
    ray = None
    try:
        if {"extract", "train"} & set(args.parts):
            from SegLensLogic.sae.distributed import require_ray

            ray = require_ray(train=True)
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        if "extract" in args.parts:
            results["extract"] = part_extract(args, ray, tmp)
        if "train" in args.parts:
            results["train"] = part_train(args, ray, tmp)
        if ray is not None:
            ray.shutdown()
        if "memory" in args.parts:
            results["memory"] = part_memory(args, tmp)
    finally:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
