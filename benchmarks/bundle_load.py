#!/usr/bin/env python
"""Benchmark: opening the shipped reference bundle, and a case's way to its first heatmap.

What it measures (one process, CPU unless CUDA is present)
----------------------------------------------------------
* **baseline**: reading the bundle's two weight files with ``safetensors.torch.load_file`` (the least any loader
  must do);
* **bundle**: ``load_bundle`` (manifest, schema checks, a SHA-256 of every file), then its model, SAE, latent
  labels, alignments and suggestions, each loaded and checked as the Slicer module and ``seglens steer`` do.
  Goal: under 5 s on 2 CPU cores. The ratio bundle / baseline says what the checks cost on top of reading.
* **first heatmap** (with ``--case``, default a BraTS 2018 case from ``../shared/data``): a steering session on
  the case from the bundle, its segmentation (read, preprocess, encoder once, codes, decoder) and the heatmap of
  its most active latent, timed in those three parts.

Medians of ``--repeats`` runs after one warm-up.

Usage (from the repository root)::

    python benchmarks/bundle_load.py
    python benchmarks/bundle_load.py --bundle Resources/adult-glioma-segformer --case DIR --json out.json
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
from safetensors.torch import load_file  # noqa: E402

from common import environment, load_average, print_environment, write_json  # noqa: E402

from SegLensLogic.bundle import load_bundle  # noqa: E402
from SegLensLogic.resources import reference_bundle_path  # noqa: E402

DEFAULT_CASE = REPO_ROOT.parent / "shared" / "data" / "brats2018" / "Brats18_CBICA_ALU_1"


def timed(function, repeats: int) -> tuple[float, object]:
    function()  # warm-up (file cache, lazy imports)
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def open_everything(folder: Path):
    bundle = load_bundle(folder)
    return bundle, bundle.load_model(device="cpu"), bundle.load_sae(device="cpu"), bundle.load_labels(), bundle.load_alignments(), bundle.load_suggestions()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped reference bundle)")
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder for the first-heatmap timing ('' to skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = environment(device, load_average())
    print_environment(env, device)
    folder = args.bundle or reference_bundle_path()

    bundle = load_bundle(folder)
    weights = [bundle.model_dir / "model.safetensors", bundle.sae_dir / "sae.safetensors"]
    size_mb = sum(p.stat().st_size for p in bundle.root.rglob("*") if p.is_file()) / 1e6
    baseline, _ = timed(lambda: [load_file(str(p)) for p in weights], args.repeats)
    full, _ = timed(lambda: open_everything(folder), args.repeats)
    print(f"bundle {folder} ({size_mb:.1f} MB)")
    print(f"  baseline (safetensors.load_file of the weights): {baseline * 1000:8.1f} ms")
    print(f"  load_bundle + model + SAE + labels + alignments + suggestions: {full * 1000:8.1f} ms  "
          f"({full / baseline:.1f}x the baseline; goal < 5 s: {'met' if full < 5 else 'NOT met'})")  # fmt: skip
    result = {"environment": env, "bundle": str(folder), "size_mb": size_mb, "baseline_s": baseline, "bundle_s": full}

    if args.case and str(args.case) and Path(args.case).is_dir():
        parts: dict[str, list[float]] = {"open": [], "segment": [], "heatmap": []}
        for run in range(args.repeats + 1):
            t0 = time.perf_counter()
            session = bundle.open_session(args.case, device=device)
            t1 = time.perf_counter()
            session.segment()
            t2 = time.perf_counter()
            latent = int(np.bincount(session.codes.latents, minlength=session.d_sae).argmax())
            session.heatmap(latent)
            t3 = time.perf_counter()
            if run:  # the first run is the warm-up
                for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                    parts[key].append(value)
        median = {key: statistics.median(values) for key, values in parts.items()}
        total = sum(median.values())
        print(f"case {Path(args.case).name}: to the first heatmap {total:.2f} s = session {median['open']:.2f} s + "
              f"segmentation {median['segment']:.2f} s + heatmap {median['heatmap']:.2f} s")  # fmt: skip
        result["first_heatmap"] = {"case": str(args.case), "total_s": total, **{f"{k}_s": v for k, v in median.items()}}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
