#!/usr/bin/env python
"""Benchmark: aligning two SAEs with every metric and baseline, SegLens's shared computation against a plain
per-method loop.

What it measures
----------------
The wall time of a full model-diffing report for one pair of SAEs of ``n`` latents each (default 2,048 and
4,096; ``d_in`` 128): the paper's alignment (encoder and decoder cosines, Hungarian on each, the shared rule),
its tau sweep, and the baselines table (greedy, Sinkhorn, encoder-only Hungarian, ours) with agreement,
bootstrap stability (``--trials`` resamples), collision and predictability. Two implementations, same process,
same inputs, same results:

* **baseline** -- a plain per-method loop, the way one would first write it: for each method, compute the cosine
  matrices from the weights, run the method in its own space and in the other space, then rerun it on every
  bootstrap resample (cutting the resampled rows and columns out of freshly computed matrices). Nothing is
  shared between methods, so ``ours`` and ``enc-only`` each solve the same Hungarian problems again.
* **SegLens** -- :func:`SegLensLogic.alignment.align_vectors`, :func:`tau_sweep` and
  :func:`baselines_table`: cosine matrices once (float32), every matching computed once per (matcher, space)
  and per resample and shared by all methods (``ours`` reuses the alignment's own Hungarian solutions).

Both use the same matchers (SciPy's ``linear_sum_assignment``, the round-based greedy matcher and Sinkhorn with
matrix-vector scaling), so the tables must agree; the script checks that they do.

Dictionaries: SAE-like synthetic pairs. A has random unit decoder rows and random encoder columns; B keeps
``--shared`` of A's latents as noisy copies (noise drawn per latent, so some pass tau and some do not), replaces
the rest with fresh random latents and permutes them all.

Timing: one warm-up of each path at the smallest size, then ``--repeats`` runs per size alternating the two
paths; the median is reported. Speed-up = baseline / SegLens. Goal: 2,048 latents in at most 30 s on 2 CPU cores.

Usage (from the repository root)::

    python benchmarks/alignment.py --quick       # 2,048 latents, 3 bootstrap trials, 1 repeat
    python benchmarks/alignment.py               # 2,048 and 4,096 latents, 5 trials
    python benchmarks/alignment.py --sizes 8192 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import environment, load_average, print_environment, write_json  # noqa: E402

from SegLensLogic.alignment import align_vectors, baselines_table, format_table, tau_sweep  # noqa: E402
from SegLensLogic.alignment.matching import match  # noqa: E402
from SegLensLogic.alignment.quality import METHODS, TABLE_METHODS, bootstrap_draws, collision_rate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="latents per SAE (default 2048 4096; 2048 with --quick)")
    parser.add_argument("--d-in", type=int, default=128, help="activation channels (default 128)")
    parser.add_argument("--shared", type=float, default=0.6, help="fraction of B's latents that are noisy copies of A's (default 0.6)")
    parser.add_argument("--trials", type=int, default=None, help="bootstrap trials for stability (default 5; 3 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per path and size, median reported (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2,048 latents, 3 trials")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([2048] if args.quick else [2048, 4096])
    args.trials = args.trials if args.trials is not None else (3 if args.quick else 5)
    args.repeats = args.repeats or 1
    return args


def synthetic_pair(n: int, d: int, shared: float, seed: int) -> tuple[dict, dict]:
    """Encoder and decoder vectors ``(n, d)`` of two SAE-like dictionaries (see the module docstring)."""
    rng = np.random.default_rng(seed)
    dec_a = rng.normal(size=(n, d))
    dec_a /= np.linalg.norm(dec_a, axis=1, keepdims=True)
    enc_a = dec_a + 0.5 * rng.normal(size=(n, d)) / np.sqrt(d)
    k = int(shared * n)
    noise = rng.uniform(0.1, 1.2, size=(k, 1))
    dec_b, enc_b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    dec_b[:k] = dec_a[:k] + noise * rng.normal(size=(k, d)) / np.sqrt(d)
    enc_b[:k] = enc_a[:k] + noise * rng.normal(size=(k, d)) / np.sqrt(d)
    perm = rng.permutation(n)
    return {"enc": enc_a.astype(np.float32), "dec": dec_a.astype(np.float32)}, {"enc": enc_b[perm].astype(np.float32), "dec": dec_b[perm].astype(np.float32)}


# -- the baseline: a plain per-method loop ------------------------------------------------------------------
def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a @ b.T).astype(np.float32)


def _run(method, sims: dict, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    own = match(sims[method.own], method.matcher)
    partner, accepted = own.partner, own.partner >= 0
    if method.accept_shared:
        other = match(sims[method.other], method.matcher).partner
        accepted = accepted & (other == partner)
        for space in sims:
            s = np.full(len(partner), -np.inf)
            s[accepted] = sims[space][np.flatnonzero(accepted), partner[accepted]]
            accepted &= s >= tau
    return partner, accepted, own.proposal


def baseline_report(vec_a: dict, vec_b: dict, tau: float, trials: int, seed: int, shuffles: int = 10) -> list[dict]:
    n_a, n_b = len(vec_a["dec"]), len(vec_b["dec"])
    draws = bootstrap_draws(n_a, n_b, trials, seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for name in TABLE_METHODS:
        method = METHODS[name]
        sims = {space: _cos(vec_a[space], vec_b[space]) for space in ("enc", "dec")}
        partner, accepted, proposal = _run(method, sims, tau)
        a = np.flatnonzero(accepted)
        b = partner[a]
        other = match(sims[method.other], method.matcher).partner
        row = {"method": name, "accepted": int(len(a)), "coverage": 100.0 * len(a) / n_a}
        row["agreement"] = 100.0 * float(np.mean(other[a] == b)) if len(a) else float("nan")
        if method.accept_shared:
            matched = np.flatnonzero(partner >= 0)
            row["agreement_all"] = 100.0 * float(np.mean(other[matched] == partner[matched]))
        stable = np.ones(n_a, dtype=bool)
        seen = np.zeros(n_a, dtype=int)
        events = hits = 0
        for ia, ib in draws:
            sub = {space: _cos(vec_a[space], vec_b[space])[np.ix_(ia, ib)] for space in ("enc", "dec")}
            sub_partner, sub_accepted, _ = _run(method, sub, tau)
            where_a = {int(x): i for i, x in enumerate(ia)}
            where_b = {int(x): i for i, x in enumerate(ib)}
            for i, j in zip(a, b):
                if int(i) in where_a and int(j) in where_b:
                    pa = where_a[int(i)]
                    same = bool(sub_accepted[pa] and sub_partner[pa] == where_b[int(j)])
                    stable[i] &= same
                    seen[i] += 1
                    events += 1
                    hits += same
        considered = seen[a] > 0
        row["stability"] = 100.0 * float(stable[a][considered].mean()) if considered.any() else float("nan")
        row["stability_events"] = 100.0 * hits / events if events else float("nan")
        row["collision"] = collision_rate(proposal)
        mean_sim = lambda rows_, cols_: np.mean([sims[s][rows_, cols_] for s in sims], axis=0)  # noqa: E731
        matched_sim = float(mean_sim(a, b).mean())
        shuffled_sim = float(np.mean([mean_sim(a, rng.permutation(n_b)[: len(a)]).mean() for _ in range(shuffles)]))
        row.update(matched_similarity=matched_sim, shuffled_similarity=shuffled_sim, predictability=100.0 * (matched_sim - shuffled_sim))
        rows.append(row)
    return rows


def seglens_report(vec_a: dict, vec_b: dict, tau: float, trials: int, seed: int) -> tuple[list[dict], list[dict], float]:
    alignment = align_vectors(vec_a, vec_b, tau)
    sweep = tau_sweep(alignment)
    rows = baselines_table(alignment, trials=trials, seed=seed)
    return rows, sweep, alignment.shared_fraction()


def same_rows(x: list[dict], y: list[dict]) -> bool:
    keys = ("method", "accepted", "agreement", "stability", "stability_events", "collision")
    if any(r[k] != s[k] and not (r[k] != r[k] and s[k] != s[k]) for r, s in zip(x, y) for k in keys):
        return False
    return all(abs(r["predictability"] - s["predictability"]) < 1e-3 for r, s in zip(x, y))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = load_average()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = environment(device, load)
    print("# Alignment benchmark: full model-diffing report of two SAEs (all metrics and baselines)")
    print_environment(env, device)
    print(f"- d_in {args.d_in}, {100 * args.shared:.0f}% of latents noisy copies, {args.trials} bootstrap trials, tau 0.8, "
          f"{args.repeats} repeat(s)")  # fmt: skip
    warm_a, warm_b = synthetic_pair(256, args.d_in, args.shared, args.seed)
    seglens_report(warm_a, warm_b, 0.8, 1, args.seed)
    baseline_report(warm_a, warm_b, 0.8, 1, args.seed)
    results = []
    for n in args.sizes:
        vec_a, vec_b = synthetic_pair(n, args.d_in, args.shared, args.seed)
        times = {"baseline": [], "seglens": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            base_rows = baseline_report(vec_a, vec_b, 0.8, args.trials, args.seed)
            times["baseline"].append(time.perf_counter() - start)
            start = time.perf_counter()
            rows, sweep, fraction = seglens_report(vec_a, vec_b, 0.8, args.trials, args.seed)
            times["seglens"].append(time.perf_counter() - start)
        base, ours = statistics.median(times["baseline"]), statistics.median(times["seglens"])
        agree = same_rows(rows, base_rows)
        print(f"\n## {n} latents")
        print(f"- baseline (per-method loop): {base:.2f} s")
        print(f"- SegLens: {ours:.2f} s  ->  speed-up {base / ours:.2f}x;  goal for 2,048: <= 30 s: "
              f"{'met' if ours <= 30 else 'NOT met'}" if n == 2048 else f"- SegLens: {ours:.2f} s  ->  speed-up {base / ours:.2f}x")  # fmt: skip
        print(f"- shared latents at tau 0.8: {100 * fraction:.1f}% (planted copies: {100 * args.shared:.0f}%, some too noisy to pass)")
        print(f"- tables identical: {agree}")
        print(format_table(rows))
        results.append({"latents": n, "baseline_s": base, "seglens_s": ours, "speedup": base / ours, "tables_identical": agree,
                        "rows": rows, "tau_sweep": sweep, "times": times})  # fmt: skip
    if args.json:
        write_json(args.json, {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return 0 if all(r["tables_identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
