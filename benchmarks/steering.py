#!/usr/bin/env python
"""Benchmark: volume re-segmentation after a latent edit, and single-slice preview latency, on one real case.

What it measures
----------------
For each architecture (SegFormer-B0 and U-Net at 256 x 256 by default), on one real BraTS case, in one process,
with the same model, the same SAE and the same edit:

* **baseline** -- the naive way: the whole network on every brain slice with the edit applied by a hook at the
  hook point (``predict_volume(model, prepared, activation_edit=...)``, the edit being
  ``h + W_dec^T (z' - z)`` exactly as SegLens computes it);
* **SegLens** -- :meth:`SteeringSession.apply` on an open session: the layers before the hook were cached when
  the case was segmented, only the layers after it run, and only on the slices the edit changes (in their fixed
  batches). Opening the session (one forward pass plus the codes) is timed apart: it is paid once per case.

Two edits are timed:

* ``tumour latents``: scale by 3, inside the tumour, the three latents most active there (the labelled tumour,
  else the predicted one) -- the typical steering edit; slices outside the region are not re-run;
* ``every slice``: add 1 everywhere to the most active latent of the volume, so every brain slice changes --
  the worst case, where the only saving is the cached first layers.

Then the **ceiling for edits on every slice**: the whole network and the layers after the hook alone, on one
batch of cached slices. When every slice changes, no exact cached method can re-run faster than their ratio.

Then **preview latency**: :meth:`SteeringSession.preview` of one edit on one slice (the slider's cost), median
of ``--repeats * 5`` calls. The goal is at most 80 ms for SegFormer-B0 at 256 x 256 on 2 CPU cores.

Both paths' masks are compared: they must agree (same edit, float tolerance). Models are randomly initialised
unless ``--model DIR --sae DIR`` are given; a random model gets a random SAE with its threshold estimated on the
case's own activations, so codes are sparse as a trained SAE's are. Timings are medians of ``--repeats`` runs
after one warm-up; CUDA is synchronised around each. Goal: re-segmentation at least 5x faster than baseline.

Usage (from the repository root)::

    python benchmarks/steering.py --quick          # 128 px, 1 repeat
    python benchmarks/steering.py                  # 256 px, 3 repeats
    python benchmarks/steering.py --model M --sae S --json out.json
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

from common import environment, load_average, print_environment, sync, write_json  # noqa: E402

from SegLensLogic.data.cases import find_case, read_case  # noqa: E402
from SegLensLogic.segmentation.inference import predict_volume, prepare_for_model  # noqa: E402
from SegLensLogic.networks import SegmenterConfig, build_segmenter, default_device, load_segmenter  # noqa: E402
from SegLensLogic.sae import BatchTopKSAE, SAEConfig, estimate_threshold  # noqa: E402
from SegLensLogic.sae.activations import feature_map_to_vectors  # noqa: E402
from SegLensLogic.steering import LatentEdit, Region, SteeringSession, steer_activations  # noqa: E402
from SegLensLogic.steering.resegment import DEFAULT_CACHE_MB  # noqa: E402

DEFAULT_CASE = REPO_ROOT.parent / "shared" / "data" / "brats2018" / "Brats18_CBICA_ABM_1"
MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
CLASS_NAMES = ["background", "necrotic core", "edema", "enhancing tumour"]
LABELS = {"segformer-b0": "SegFormer-B0", "unet": "U-Net (BasicUNet)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="model input side (default 256; 128 with --quick)")
    parser.add_argument("--archs", nargs="+", default=["segformer-b0", "unet"], help="architectures (default: %(default)s)")
    parser.add_argument("--model", type=Path, help="a trained model folder instead of random models (with --sae)")
    parser.add_argument("--sae", type=Path, help="the SAE folder for --model")
    parser.add_argument("--expansion", type=int, default=16, help="random SAE expansion (default 16)")
    parser.add_argument("--k", type=int, default=32, help="random SAE k (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-mb", type=lambda v: None if v == "none" else float(v), default=DEFAULT_CACHE_MB,
                        help="the session's cache budget in MB, or 'none' (default: SegLens's, %(default)s)")
    parser.add_argument("--quick", action="store_true", help="128 px and 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (128 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if (args.model is None) != (args.sae is None):
        parser.error("--model and --sae go together")
    return args


def timed(fn, device, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def random_pair(arch: str, size: int, prepared, expansion: int, k: int, device):
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(arch=arch, modalities=MODALITIES, class_names=CLASS_NAMES, image_size=size)).to(device).eval()
    slices = prepared.brain_slices()
    pick = slices[np.linspace(0, len(slices) - 1, 8).astype(int)]
    with torch.no_grad():
        activations, _ = model.encode(prepared.model_input(pick).to(device))
    vectors = feature_map_to_vectors(activations).float().cpu()
    sae = BatchTopKSAE(SAEConfig(d_in=vectors.shape[1], expansion=expansion, k=k, hook_point=model.config.hook_point))
    with torch.no_grad():
        sae.b_dec.copy_(vectors.mean(0))
    estimate_threshold(sae, vectors)
    return model, sae.to(device).eval()


def run_one(label: str, model, sae, case, repeats: int, device, cache_mb: float | None) -> dict:
    prepared = prepare_for_model(model, case)
    start = time.perf_counter()
    session = SteeringSession(model, sae, prepared, cache_mb=cache_mb)
    session.segment()
    open_seconds = time.perf_counter() - start
    # The region a user would steer in: the labelled tumour when the case has labels (a random model's predicted
    # "tumour" is noise all over the brain), else the predicted one.
    tumour = prepared.to_input_grid(prepared.label) > 0 if prepared.label is not None else session.base_labels > 0
    region = Region.from_mask(tumour) if tumour.any() else None
    edits = {
        "tumour latents": LatentEdit(tuple(j for j, _ in session.top_latents(3, region)), "scale", 3.0, region=region or Region.volume()),
        "every slice": LatentEdit((session.top_latents(1)[0][0],), "add", 1.0, where="everywhere"),
    }
    forward = session.forward
    rows = {}
    for name, edit in edits.items():
        def baseline(edit=edit):
            def hook(activations, slices):
                positions = np.array([forward.slice_position[int(z)] for z in slices])
                return steer_activations(sae, activations, [edit], [forward.region_weights(sae, edit.region, positions)])

            return predict_volume(model, prepared, activation_edit=hook).labels

        def seglens(edit=edit):
            labels = session.apply(edit)
            changed = len(session._history[-1].deltas)
            session.undo()
            return labels, changed

        base_s, base_labels = timed(baseline, device, repeats)
        ours_s, (our_labels, changed) = timed(seglens, device, repeats)
        brain = prepared.to_input_grid(prepared.brain_mask)
        rows[name] = {
            "baseline_s": base_s,
            "seglens_s": ours_s,
            "speedup": base_s / ours_s,
            "slices_changed": changed,
            "brain_slices": len(forward.slices),
            "voxels_changed_by_edit": int((our_labels != session.base_labels).sum()),
            "mask_agreement_in_brain": float((our_labels == base_labels)[brain].mean()),
        }
    # The ceiling of any exact cached re-run when an edit changes every slice: the whole network against the
    # layers after the hook, on one batch of cached slices (same batch size, same device).
    index = torch.arange(min(forward.batch_size, len(forward.slices)), device=forward.activations.device)
    x = prepared.model_input(forward.slices[index.cpu().numpy()]).to(device)
    with torch.no_grad():
        whole_s, _ = timed(lambda: model(x), device, repeats * 5)
        after_s, _ = timed(lambda: model.decode(*forward.decoder_inputs(index), forward.hook), device, repeats * 5)
    z = int(forward.slices[len(forward.slices) // 2])
    preview_edit = LatentEdit(edits["tumour latents"].latents, "scale", 2.0)
    preview_s, _ = timed(lambda: session.preview(preview_edit, z), device, repeats * 5)
    return {"model": label, "open_s": open_seconds, "cache_mb": forward.nbytes / 1e6, "codes_mb": session.codes.nbytes / 1e6,
            "cache_budget_mb": cache_mb, "recomputed_levels": forward.recomputed,
            "edits": rows, "preview_ms": 1000 * preview_s, "preview_slice": z, "hook": forward.hook,
            "batch_ms": {"whole_network": 1000 * whole_s, "after_hook": 1000 * after_s}, "every_slice_ceiling": whole_s / after_s}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    load = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    env = environment(device, load)
    case = read_case(find_case(args.case), modalities=MODALITIES if args.model is None else None)
    print(f"# Steering: re-segmentation after an edit and preview latency ({args.case.name}, {case.shape})\n")
    print_environment(env, device)
    results = []
    if args.model is not None:
        model = load_segmenter(args.model, device=device)
        case = read_case(find_case(args.case), modalities=model.config.modalities)
        results.append(run_one(f"{model.config.arch} (trained)", model, BatchTopKSAE.load(args.sae, device=device), case, args.repeats, device, args.cache_mb))
    else:
        for arch in args.archs:
            prepared = prepare_for_model(build_segmenter(SegmenterConfig(arch=arch, modalities=MODALITIES, class_names=CLASS_NAMES, image_size=args.image_size)), case)
            model, sae = random_pair(arch, args.image_size, prepared, args.expansion, args.k, device)
            results.append(run_one(f"{LABELS.get(arch, arch)} {args.image_size}px, SAE {sae.d_sae} latents", model, sae, prepared, args.repeats, device, args.cache_mb))
    for result in results:
        print(f"\n## {result['model']}\n")
        budget = "no limit" if result["cache_budget_mb"] is None else f"budget {result['cache_budget_mb']:.0f} MB"
        print(f"- open (one forward pass, cache and codes): {result['open_s']:.2f} s; cache {result['cache_mb']:.0f} MB ({budget}; "
              f"{result['recomputed_levels']} finest level(s) recomputed when slices are re-run), codes {result['codes_mb']:.1f} MB")  # fmt: skip
        print("\n| edit | slices re-run | baseline (full forward + hook) | SegLens (cached partial) | speed-up | mask agreement in brain |")
        print("|---|---|---|---|---|---|")
        for name, row in result["edits"].items():
            print(f"| {name} | {row['slices_changed']}/{row['brain_slices']} | {row['baseline_s']:.2f} s | {row['seglens_s']:.2f} s | "
                  f"**{row['speedup']:.1f}x** | {row['mask_agreement_in_brain']:.6f} |")  # fmt: skip
        ms = result["batch_ms"]
        print(f"\n- one batch of cached slices: whole network {ms['whole_network']:.0f} ms, layers after hook `{result['hook']}` "
              f"{ms['after_hook']:.0f} ms: an edit that changes every slice can be re-run at most **{result['every_slice_ceiling']:.1f}x** "
              "faster than the baseline by any exact cached method")  # fmt: skip
        print(f"\n- single-slice preview (slice {result['preview_slice']}): **{result['preview_ms']:.0f} ms** (goal: at most 80 ms for SegFormer-B0 at 256 px)")
    if args.json:
        write_json(args.json, {"environment": env, "case": str(args.case), "image_size": args.image_size, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
