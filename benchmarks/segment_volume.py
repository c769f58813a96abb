#!/usr/bin/env python
"""Benchmark: slices per second of whole-volume prediction (SegFormer-B0 and U-Net) on one real case.

What it measures
----------------
The wall time of :func:`SegLensLogic.segmentation.inference.predict_volume` on one already-preprocessed case (a real
BraTS 2018 volume by default, 240 x 240 x 155), for each architecture, in one process:

* **baseline** -- the plain per-slice loop: every axial slice of the volume, one slice per forward pass
  (``predict_volume(model, prepared, batch_size=1, skip_empty=False)``);
* **SegLens** -- the path SegLens uses: only the axial slices that contain brain, ``--batch-size`` slices per
  forward pass (``predict_volume(model, prepared, batch_size=B, skip_empty=True)``, B = SegLens's default: 16 on a GPU; on the CPU 1 for U-Net, 4 for SegFormer).

Both timings include everything ``predict_volume`` does after preprocessing (slices resized to the model,
the forward passes, logits resized back, argmax, labels put back on the input file's voxel grid). Reading the
case and preprocessing it (``prepare_for_model``: reorientation, brain mask, z-scoring) is done once, outside
the timed part, and reported on its own line.

Slices per second are counted over ALL axial slices of the volume for both paths, so that they measure the
same job (a whole volume segmented): slices the SegLens path skips because they hold no brain count as done,
i.e. skipping empty slices counts as speed. The number of slices each path actually ran is printed too.

Each path is run once to warm up (those outputs are also used for the agreement check), then ``--repeats``
times, alternating baseline and SegLens; the median is reported. On CUDA the device is synchronised before
and after each timed call. Models are randomly initialised (``build_segmenter``), or a trained one is loaded
with ``--model DIR`` (``load_segmenter``); they run on ``default_device()`` (CUDA when available).

The agreement check compares the two label maps voxel by voxel: they should be identical (voxels outside the
brain are background in both, and a slice's logits do not depend on the other slices in its batch); the
fraction of agreeing voxels is printed over the brain and over the whole volume.

Usage (from the repository root)::

    python benchmarks/segment_volume.py --quick            # 128 px, 1 repeat: about a minute on 2 CPU cores
    python benchmarks/segment_volume.py                    # 256 px, 3 repeats
    python benchmarks/segment_volume.py --model path/to/model --json out.json
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

import torch  # noqa: E402

from common import environment, load_average, print_environment, sync, write_json  # noqa: E402

from SegLensLogic.data.cases import MODALITIES as CASE_MODALITIES, find_case, read_case  # noqa: E402
from SegLensLogic.data.preprocessing import prepare_case  # noqa: E402
from SegLensLogic.segmentation.inference import default_batch_size, predict_volume  # noqa: E402
from SegLensLogic.networks import SegmenterConfig, build_segmenter, default_device, load_segmenter  # noqa: E402

DEFAULT_CASE = REPO_ROOT.parent / "shared" / "data" / "brats2018" / "Brats18_CBICA_ABM_1"
DEFAULT_ARCHS = ("segformer-b0", "unet")
MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
CLASS_NAMES = ["background", "necrotic core", "edema", "enhancing tumour"]
LABELS = {"segformer-b0": "SegFormer-B0", "unet": "U-Net (BasicUNet)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="model input side in pixels (default 256; 128 with --quick)")
    parser.add_argument("--batch-size", type=int, help="slices per forward pass on the SegLens path (default: SegLens's own, 16 on a GPU; on the CPU 1 for U-Net, 4 for SegFormer)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per path, median reported (default 3; 1 with --quick)")
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), help="architectures to build (default: %(default)s)")
    parser.add_argument("--model", type=Path, action="append", default=None,
                        help="a trained model folder to load instead of random models (repeatable; --archs and --image-size are then ignored)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random initialisation (default 0)")
    parser.add_argument("--quick", action="store_true", help="image size 128 and 1 repeat (a quick check on a CPU)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 128 if args.quick else 256
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--repeats and --batch-size must be at least 1")
    return args


def spread(path: dict) -> str:
    return f"{min(path['all_seconds']):.2f}-{max(path['all_seconds']):.2f}"


def timed_prediction(model, prepared, device, **kwargs):
    """One ``predict_volume`` call: (seconds, prediction), CUDA synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    prediction = predict_volume(model, prepared, **kwargs)
    sync(device)
    return time.perf_counter() - start, prediction


def benchmark_model(model, prepared, device, batch_size: int, repeats: int) -> dict:
    batch_size = batch_size or default_batch_size(model)
    baseline_kwargs = {"batch_size": 1, "skip_empty": False}
    seglens_kwargs = {"batch_size": batch_size, "skip_empty": True}
    # Warm-up (one run of each path); its outputs serve for the agreement check.
    _, base_pred = timed_prediction(model, prepared, device, **baseline_kwargs)
    _, fast_pred = timed_prediction(model, prepared, device, **seglens_kwargs)
    base_times, fast_times = [], []
    for _ in range(repeats):
        base_times.append(timed_prediction(model, prepared, device, **baseline_kwargs)[0])
        fast_times.append(timed_prediction(model, prepared, device, **seglens_kwargs)[0])

    total = prepared.num_slices
    brain = prepared.to_input_grid(prepared.brain_mask)
    agree = base_pred.labels == fast_pred.labels
    base_s, fast_s = statistics.median(base_times), statistics.median(fast_times)
    return {
        "arch": model.config.arch,
        "image_size": model.config.image_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "slices_total": total,
        "baseline": {
            "batch_size": 1, "skip_empty": False, "slices_run": int(len(base_pred.slices_run)),
            "seconds_per_volume": base_s, "slices_per_second": total / base_s, "all_seconds": base_times,
        },
        "seglens": {
            "batch_size": batch_size, "skip_empty": True, "slices_run": int(len(fast_pred.slices_run)),
            "seconds_per_volume": fast_s, "slices_per_second": total / fast_s, "all_seconds": fast_times,
        },
        "speedup": base_s / fast_s,
        "labels_identical": bool(agree.all()),
        "agreement_brain": float(agree[brain].mean()) if brain.any() else 1.0,
        "agreement_all": float(agree.mean()),
        "voxels_differing": int((~agree).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()

    models = []
    if args.model:
        for folder in args.model:
            models.append(load_segmenter(folder, device=device))
    else:
        for arch in args.archs:
            torch.manual_seed(args.seed)
            config = SegmenterConfig(arch=arch, modalities=list(MODALITIES), class_names=list(CLASS_NAMES), image_size=args.image_size)
            models.append(build_segmenter(config).to(device).eval())

    # Preprocessing, once per distinct model input (modalities, image size); timed apart from prediction.
    case = find_case(args.case)
    t0 = time.perf_counter()
    images = read_case(case, modalities=sorted({m for model in models for m in model.config.modalities},
                                               key=CASE_MODALITIES.index))
    read_s = time.perf_counter() - t0
    prepared_for: dict[tuple, object] = {}
    prepare_s: dict[tuple, float] = {}
    for model in models:
        key = (tuple(model.config.modalities), model.config.image_size)
        if key not in prepared_for:
            t0 = time.perf_counter()
            prepared_for[key] = prepare_case(images, model.config.modalities, model.config.image_size)
            prepare_s[key] = time.perf_counter() - t0

    first = next(iter(prepared_for.values()))
    brain_slices = int(len(first.brain_slices()))
    env = environment(device, load_at_start)
    print(f"# Whole-volume prediction speed: `{case.case_id}`\n")
    print(f"- volume {'x'.join(map(str, images.shape))} voxels, {first.num_slices} axial slices, "
          f"{brain_slices} contain brain ({first.num_slices - brain_slices} empty)")
    print_environment(env, device)
    print(f"- preprocessing (not in the timings below): read case {read_s:.2f} s, "
          + ", ".join(f"prepare_case @ {size}px {s:.2f} s" for (_, size), s in prepare_s.items()))
    print(f"- models: {'loaded from ' + ', '.join(map(str, args.model)) if args.model else f'random init (seed {args.seed})'}; "
          f"warm-up 1 run per path, then median of {args.repeats} run(s)")
    sys.stdout.flush()

    results = []
    for model in models:
        prepared = prepared_for[(tuple(model.config.modalities), model.config.image_size)]
        print(f"  ... {model.config.arch} @ {model.config.image_size}px", file=sys.stderr, flush=True)
        results.append(benchmark_model(model, prepared, device, args.batch_size, args.repeats))

    print()
    print("| model | input | path | slices run / total | s per volume (median) | runs min-max (s) | slices/s (all slices) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        name = LABELS.get(r["arch"], r["arch"])
        size = f"{r['image_size']}px"
        b, f = r["baseline"], r["seglens"]
        print(f"| {name} | {size} | baseline: per slice, batch 1, all slices | {b['slices_run']} / {r['slices_total']} "
              f"| {b['seconds_per_volume']:.2f} | {spread(b)} | {b['slices_per_second']:.1f} | 1.00x |")
        print(f"| {name} | {size} | SegLens: batch {f['batch_size']}, brain slices only | {f['slices_run']} / {r['slices_total']} "
              f"| {f['seconds_per_volume']:.2f} | {spread(f)} | {f['slices_per_second']:.1f} | **{r['speedup']:.2f}x** |")
    print()
    print("Slices/s = all axial slices of the volume / median wall seconds per volume, for both paths: slices the "
          "SegLens path skips (no brain) count as done, so skipping empty slices counts as speed. "
          "Speed-up = baseline seconds / SegLens seconds. Preprocessing excluded.")
    print()
    print("Label agreement, baseline vs SegLens (warm-up outputs):")
    for r in results:
        verdict = "identical" if r["labels_identical"] else f"{r['voxels_differing']} voxels differ"
        print(f"- {LABELS.get(r['arch'], r['arch'])}: {verdict}; agreement {r['agreement_brain']:.6f} of brain voxels, "
              f"{r['agreement_all']:.6f} of all voxels")

    if args.json:
        payload = {
            "case": str(args.case), "case_id": case.case_id, "shape": list(images.shape),
            "slices_total": first.num_slices, "brain_slices": brain_slices,
            "preprocessing_seconds": {"read_case": read_s, **{f"prepare_case_{size}px": s for (_, size), s in prepare_s.items()}},
            "repeats": args.repeats, "batch_size": args.batch_size, "quick": args.quick,
            "models_from": [str(p) for p in args.model] if args.model else "random", "environment": env, "results": results,
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
