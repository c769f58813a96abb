#!/usr/bin/env python
"""Benchmark: wall time of an SAE settings sweep on the CPU, one SAE at a time against several side by side.

What it measures
----------------
The same sweep (:func:`SegLensLogic.experiments.sae_sweep.sae_sweep`: every setting of ``--grid``, seeds 0 and
1, ``--steps`` steps each, dead-latent resampling as the reference build does) run three times in one process, on the
same activation store, each into its own empty cache folder:

* **baseline**: ``workers=1``, the SAEs one after another on all ``--threads`` PyTorch threads (how the reference
  build trained its sweep before);
* **one thread**: ``workers=1`` on one thread (how the build now trains an SAE alone: the resampling replica and
  the population SAEs);
* **SegLens**: ``workers=--threads``, that many SAEs at a time, each in its own spawned process on one thread.

Speed-up = baseline seconds / a path's seconds, over the whole sweep (process start-up and store loading in the
workers included). Every path's rows are printed: explained variance and dead fraction should agree (a different
thread count may sum in another order; on the B1 store they were identical).

Data: an activation store (``--store DIR``, e.g. a reference build's ``sae/store``), or by default 60,000
synthetic vectors of 128 channels (``scale.py``'s sparse mixtures), written to a temporary store.

Usage (from the repository root)::

    python benchmarks/sae_sweep_workers.py --quick         # 2 settings, 150 steps: about a minute on 2 cores
    python benchmarks/sae_sweep_workers.py --store BUILD/sae/store --steps 400
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, load_average, print_environment, write_json  # noqa: E402
from scale import write_synthetic_store  # noqa: E402

from SegLensLogic.experiments.sae_sweep import sae_sweep  # noqa: E402
from SegLensLogic.sae import ActivationStore, SAETrainingOptions  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, help="activation store (default: synthetic vectors)")
    parser.add_argument("--grid", default="8x4,16x8", help="settings k x expansion, comma-separated (default 8x4,16x8)")
    parser.add_argument("--steps", type=int, default=400, help="steps per SAE (default 400)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads of the baseline = workers of SegLens (default 2)")
    parser.add_argument("--quick", action="store_true", help="150 steps")
    parser.add_argument("--json", type=Path, help="write the full result here")
    args = parser.parse_args(argv)
    load = load_average()
    torch.set_num_threads(args.threads)
    steps = 150 if args.quick else args.steps
    grid = [{"k": int(k), "expansion": int(e)} for k, e in (item.split("x") for item in args.grid.split(","))]
    # Resampling inside the steps run here, the stopping rule out of the way: every SAE runs all its steps.
    base = SAETrainingOptions(max_steps=steps, eval_every=10**9, resample_every=max(steps // 4, 1), log_every=10**9)
    device = torch.device("cpu")
    env = environment(device, load)
    print(f"# SAE sweep on the CPU: {len(grid)} settings x 2 seeds, {steps} steps each\n")
    print_environment(env, device)
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore(args.store if args.store else write_synthetic_store(Path(tmp) / "store", 60_000, 128))
        print(f"- store: {store.folder if args.store else 'synthetic vectors'} ({len(store):,} vectors of {store.d_in} channels)\n")
        results = {}
        # (path, SAEs at a time, threads of this process): the workers split this process's threads.
        for name, workers, threads in (("baseline", 1, args.threads), ("one thread", 1, 1), ("SegLens", args.threads, args.threads)):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            rows, _ = sae_sweep(store, grid, base=base, log=lambda m: None, cache=Path(tmp) / name, workers=workers)
            results[name] = {"workers": workers, "threads_each": max(1, threads // workers), "seconds": time.perf_counter() - start, "rows": rows}
    print("| path | SAEs at a time | threads each | seconds | speed-up | EV per setting | dead per setting |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ev = " / ".join(f"{row['explained_variance']:.3f}" for row in r["rows"])
        dead = " / ".join(f"{row['dead_fraction']:.3f}" for row in r["rows"])
        print(f"| {name} | {r['workers']} | {r['threads_each']} | {r['seconds']:.1f} | {results['baseline']['seconds'] / r['seconds']:.2f}x | {ev} | {dead} |")
    speedup = results["baseline"]["seconds"] / results["SegLens"]["seconds"]
    print(f"\nspeed-up (baseline seconds / SegLens seconds): {speedup:.2f}x")
    if args.json:
        write_json(args.json, {"environment": env, "steps": steps, "grid": grid, "results": results, "speedup": speedup})
    return 0


if __name__ == "__main__":
    sys.exit(main())
