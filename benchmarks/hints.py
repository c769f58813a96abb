#!/usr/bin/env python
"""Benchmark: the time of a hint fix (fit + whole-volume re-segmentation) on the shipped reference model.

What it measures
----------------
On one real BraTS case (a held-back test case of the shipped bundle, SSA-degraded at strength 2 so that the mask has
errors to click on), in one process, with the shipped model and SAE:

* **baseline** -- opening the case (:meth:`SteeringSession.segment`: the whole network over every brain slice, once;
  what any fix has to pay before it can start) and a whole-volume re-segmentation of an edit on every slice;
* **fix** -- :meth:`SteeringSession.fix` from 1, 3 and 5 simulated clicks (the hint benchmark's protocol: the
  interior of the largest error of the current mask), then :meth:`SteeringSession.apply` of its edits: fit and
  re-segmentation apart, and their sum (the goal: under 10 s on 2 CPU cores).

The ratios printed are the fix's time over the baseline's, in the same process. Timings are medians of
``--repeats`` runs after one warm-up.

Usage (from the repository root)::

    python benchmarks/hints.py --data ../shared/data
    python benchmarks/hints.py --data ../shared/data --bundle BUNDLE --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import environment, load_average, print_environment, write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"), help="the real cases (brats2018/)")
    parser.add_argument("--bundle", help="bundle folder (default: the shipped reference bundle)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads (default 2)")
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args()
    load = load_average()
    torch.set_num_threads(args.threads)

    from SegLensLogic.bundle import load_bundle
    from SegLensLogic.data.cases import read_case
    from SegLensLogic.data.cohort import load_cohort
    from SegLensLogic.data.phantoms import degrade_case
    from SegLensLogic.experiments.clicks import click_hint, next_click
    from SegLensLogic.resources import reference_bundle_path
    from SegLensLogic.steering import LatentEdit, SteeringSession
    from SegLensLogic.steering.guided import _ras_spacing

    bundle = load_bundle(args.bundle or reference_bundle_path())
    test_ids = bundle.figures.get("training", {}).get("test_cases", [])
    cases = {c.case_id: c for c in load_cohort(Path(args.data) / "brats2018")}
    source = cases[next(i for i in test_ids if i in cases)]
    work = Path(tempfile.mkdtemp(prefix="seglens-hints-bench-"))
    degraded = degrade_case(Path(next(iter(source.images.values()))).parent, work, preset="ssa", seed=0, strength=2.0)
    case = read_case(load_cohort(degraded)[0], modalities=bundle.modalities, allow_missing=True)
    device = torch.device("cpu")
    env = environment(device, load)
    print(f"# Hint fix on {case.case_id} (SSA-like x2) with {bundle.name} (hook {bundle.hook_point})\n")
    print_environment(env, device)

    def median(function, repeats=args.repeats):
        function()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    model, sae = bundle.load_model(device="cpu"), bundle.load_sae(device="cpu")
    open_seconds = median(lambda: SteeringSession(model, sae, case).segment(), repeats=1)
    session = SteeringSession(model, sae, case)
    session.segment()
    latent = session.top_latents(1)[0][0]
    every_slice = LatentEdit((latent,), "add", 1.0, where="everywhere")

    def resegment_all():
        session.reset()
        session.apply(every_slice)

    resegment_seconds = median(resegment_all)
    prepared = session.prepared
    truth = prepared.orientation.apply(case.label)
    spacing = _ras_spacing(prepared)
    rows, hints = [], []
    current = prepared.orientation.apply(session.base_labels)
    for n in range(1, 6):
        click = next_click(current, truth, spacing)
        if click is None:
            break
        hints.append(click_hint(click, prepared))
        session.reset()
        fit_seconds = median(lambda: session.fix(hints))
        fix = session.fix(hints)

        def apply_fix():
            session.reset()
            session.apply(fix.edits)

        apply_seconds = median(apply_fix) if fix.edits else 0.0
        current = prepared.orientation.apply(session.labels)
        if n in (1, 3, 5):
            rows.append({"clicks": n, "edits": len(fix.edits), "fit_s": fit_seconds, "apply_s": apply_seconds,
                         "total_s": fit_seconds + apply_seconds})  # fmt: skip
    print(f"\n- baseline: opening the case {open_seconds:.2f} s; a whole-volume re-segmentation (an edit on every slice) "
          f"{resegment_seconds:.2f} s\n")  # fmt: skip
    print("| clicks | edits | fit | re-segmentation | fix in all | vs opening the case | vs a whole-volume re-segmentation |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clicks']} | {r['edits']} | {r['fit_s']:.2f} s | {r['apply_s']:.2f} s | {r['total_s']:.2f} s | "
              f"{r['total_s'] / open_seconds:.2f}x | {r['total_s'] / resegment_seconds:.2f}x |")
    worst = max(r["total_s"] for r in rows) if rows else float("nan")
    print(f"\nGoal: a fix under 10 s on 2 CPU cores: {'met' if worst < 10 else 'not met'} (slowest {worst:.2f} s)")
    if args.json:
        write_json(Path(args.json), {"environment": env, "case": case.case_id, "open_s": open_seconds,
                                     "resegment_every_slice_s": resegment_seconds, "fixes": rows})  # fmt: skip
    return 0 if np.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
