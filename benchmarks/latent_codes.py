#!/usr/bin/env python
"""Benchmark: memory of one volume's SAE codes, sparse (CSR) against dense float32, and heatmap build time.

What it measures
----------------
One real case (a BraTS 2018 volume by default, 240 x 240 x 155) is encoded with
:func:`SegLensLogic.sae.codes.encode_volume`: every position of every brain slice's feature map at the hook
point goes through the SAE with its inference threshold, and only the active latents are kept, as
:class:`~SegLensLogic.sae.codes.VolumeCodes` (CSR: ``offsets`` int64 per position + ``latents`` int32 and
``values`` float32 per active latent). The script reports

* **positions** (brain slices x feature-map height x width) and the **mean L0** (active latents per position);
* **sparse MB** = ``VolumeCodes.nbytes`` (offsets + latents + values), against **dense MB** = positions x
  ``d_sae`` x 4 bytes (``VolumeCodes.dense_nbytes``: the same codes as one float32 array), and their ratio;
* the wall time of ``encode_volume`` and the **time to build one latent heatmap on the input grid**
  (``VolumeCodes.heatmap``: scatter the latent's values, bilinear upsampling to the model size, undoing the
  slice resizing and padding, reorientation to the file's voxel order), median over ``--heatmaps`` latents
  (the most frequent ones) after one warm-up;
* the growth of the process's peak resident memory during ``encode_volume`` (Linux: the peak is reset through
  ``/proc/self/clear_refs`` just before; elsewhere ``getrusage`` peak growth, which reads 0 when an earlier step
  already peaked higher). It includes the segmenter's forward passes and the dense pre-activations of one batch
  of slices, which ``encode_volume`` computes before thresholding; it is not the size of the codes.

Model and SAE: a randomly initialised U-Net (MONAI ``BasicUNet``, default features) at ``--image-size`` (256:
hook ``down_3`` is 128 channels x 32 x 32), and a randomly initialised BatchTopK SAE with ``d_in`` 128,
expansion 16 (2048 latents), k 32, whose inference threshold is estimated with
:func:`SegLensLogic.sae.trainer.estimate_threshold` on the case's own activations (``--threshold-vectors``
positions drawn at random from the vectors ``encode_volume`` will encode; 0 = all of them), so the mean L0 of
the codes is about k. A trained SAE gives a different L0 distribution over positions but the same mean, and the
memory depends on the mean only.

A sanity check compares the codes of the first batch of slices with ``sae.encode(..., use_threshold=True)`` on
the same activations (dense) and prints the max abs difference (0 expected).

Usage (from the repository root)::

    python benchmarks/latent_codes.py --quick          # image size 128 (hook 128 x 16 x 16)
    python benchmarks/latent_codes.py                  # image size 256 (hook 128 x 32 x 32)
    python benchmarks/latent_codes.py --case ../shared/data/brats2018/Brats18_2013_11_1 --json out.json
"""

from __future__ import annotations

import argparse
import resource
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

from SegLensLogic.segmentation.inference import prepare_for_model  # noqa: E402
from SegLensLogic.networks import SegmenterConfig, build_segmenter, default_device  # noqa: E402
from SegLensLogic.sae import BatchTopKSAE, SAEConfig, estimate_threshold, feature_map_to_vectors  # noqa: E402
from SegLensLogic.sae.activations import brain_fraction_on_grid  # noqa: E402
from SegLensLogic.sae.codes import encode_volume  # noqa: E402

DEFAULT_CASE = REPO_ROOT.parent / "shared" / "data" / "brats2018" / "Brats18_CBICA_ABM_1"
MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
CLASS_NAMES = ["background", "necrotic core", "edema", "enhancing tumour"]
MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="U-Net input side in pixels (default 256; 128 with --quick)")
    parser.add_argument("--hook", default="down_3", help="U-Net hook point (default down_3: 128 channels at 1/8 resolution)")
    parser.add_argument("--expansion", type=int, default=16, help="SAE latents per input channel (default 16)")
    parser.add_argument("-k", "--k", type=int, default=32, help="SAE mean active latents (default 32)")
    parser.add_argument("--threshold-vectors", type=int, default=16384,
                        help="case positions used to estimate the threshold (default 16384; 0 = all)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass in encode_volume (default 16)")
    parser.add_argument("--heatmaps", type=int, default=5, help="heatmaps timed, median reported (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random U-Net, SAE and threshold sample (default 0)")
    parser.add_argument("--quick", action="store_true", help="image size 128 (a quick check on a CPU)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 128 if args.quick else 256
    if args.heatmaps < 1 or args.batch_size < 1 or args.k < 1 or args.expansion < 1 or args.threshold_vectors < 0:
        parser.error("--heatmaps, --batch-size, -k and --expansion must be at least 1, --threshold-vectors at least 0")
    return args


# -- peak resident memory -------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _ru_maxrss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, kB on Linux


class PeakRSS:
    """Growth of peak resident memory over a block: ``peak during - resident before``, in bytes."""

    def __enter__(self):
        self.method = "getrusage"
        try:  # Linux >= 4.0: writing 5 resets the peak (VmHWM) to the current resident size.
            Path("/proc/self/clear_refs").write_text("5")
            if _status_kb("VmHWM") is not None:
                self.method = "VmHWM reset"
        except OSError:
            pass
        self.before = _status_kb("VmRSS") if self.method == "VmHWM reset" else _ru_maxrss_kb()
        return self

    def __exit__(self, *exc):
        after = _status_kb("VmHWM") if self.method == "VmHWM reset" else _ru_maxrss_kb()
        self.growth = max(0, after - self.before) * 1024
        return False


# -- measurements ---------------------------------------------------------------------------------------
@torch.no_grad()
def case_vectors(model, prepared, hook: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """All hook vectors of the brain slices, in the order ``encode_volume`` encodes them: ``(P, D)`` on the CPU."""
    slices = prepared.brain_slices()
    out = []
    for start in range(0, len(slices), batch_size):
        activations, _ = model.encode(prepared.model_input(slices[start : start + batch_size]).to(device), hook)
        out.append(feature_map_to_vectors(activations).float().cpu())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()

    torch.manual_seed(args.seed)
    config = SegmenterConfig(arch="unet", modalities=list(MODALITIES), class_names=list(CLASS_NAMES),
                             image_size=args.image_size, hook_point=args.hook)
    model = build_segmenter(config).to(device).eval()
    d_in, height, width = model.hook_points()[args.hook]

    t0 = time.perf_counter()
    prepared = prepare_for_model(model, args.case)
    prepare_s = time.perf_counter() - t0
    slices = prepared.brain_slices()

    # Threshold from the case's own activations (the positions encode_volume will encode).
    with PeakRSS() as rss_activations:
        sync(device)
        t0 = time.perf_counter()
        vectors = case_vectors(model, prepared, args.hook, args.batch_size, device)
        sync(device)
        activations_s = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    sae = BatchTopKSAE(SAEConfig(d_in=d_in, expansion=args.expansion, k=args.k, hook_point=args.hook)).to(device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    if args.threshold_vectors and args.threshold_vectors < len(vectors):
        sample = vectors[torch.randperm(len(vectors), generator=generator)[: args.threshold_vectors]]
    else:
        sample = vectors
    t0 = time.perf_counter()
    theta = estimate_threshold(sae, sample)
    threshold_s = time.perf_counter() - t0
    n_threshold = len(sample)
    first_batch = vectors[: min(args.batch_size, len(slices)) * height * width]
    del vectors, sample

    # The codes.
    with PeakRSS() as rss:
        sync(device)
        t0 = time.perf_counter()
        codes = encode_volume(model, sae, prepared, hook=args.hook, batch_size=args.batch_size)
        sync(device)
        encode_s = time.perf_counter() - t0

    # Sanity check: first batch of slices against dense thresholded encoding of the same activations.
    with torch.no_grad():
        reference = sae.encode(first_batch.to(device), use_threshold=True).cpu().numpy()
    # encode_volume leaves positions under the SAE's brain fraction without codes (extraction's rule): so does the check.
    first = slices[: min(args.batch_size, len(slices))]
    reference[~(brain_fraction_on_grid(prepared, first, (height, width)).numpy().reshape(-1) >= sae.config.min_brain_fraction)] = 0
    mine = np.concatenate([codes.dense(s) for s in range(min(args.batch_size, len(slices)))])
    check_diff = float(np.abs(mine - reference).max())
    check_support = int(((mine > 0) != (reference > 0)).sum())

    # Heatmaps of the most frequent latents, on the input grid.
    frequency = codes.latent_frequency()
    latents = [int(j) for j in np.argsort(-frequency)[: args.heatmaps + 1] if frequency[j] > 0]
    heatmap_times = []
    heatmap = codes.heatmap(latents[0])  # warm-up
    for latent in latents[1:] or latents[:1]:
        t0 = time.perf_counter()
        heatmap = codes.heatmap(latent)
        heatmap_times.append(time.perf_counter() - t0)

    # Heatmap mass per label class of every fired latent (what label_mass needs): one VolumeCodes.heatmap_mass
    # call against the per-latent loop over heatmaps (label_mass's former way), timed on --heatmaps latents.
    regions = prepared.label.astype(np.int64)
    t0 = time.perf_counter()
    mass = codes.heatmap_mass(regions, len(CLASS_NAMES))
    mass_s = time.perf_counter() - t0
    loop_times, mass_diff = [], 0.0
    for latent in latents[1:] or latents[:1]:
        t0 = time.perf_counter()
        heat_ras = prepared.orientation.apply(codes.heatmap(latent)).astype(np.float64)
        by_class = [heat_ras[regions == c].sum() for c in range(len(CLASS_NAMES))] + [heat_ras.sum()]
        loop_times.append(time.perf_counter() - t0)
        mass_diff = max(mass_diff, float(np.max(np.abs(mass[latent] - by_class)) / max(heat_ras.sum(), 1e-12)))
    fired = int(len(np.unique(codes.latents)))
    loop_per_latent = statistics.median(loop_times)

    l0 = np.diff(codes.offsets)
    positions = codes.num_positions
    sparse_b, dense_b = codes.nbytes, codes.dense_nbytes
    result = {
        "case": str(args.case), "case_id": prepared.source.case_id, "volume_shape": list(prepared.source.shape),
        "image_size": args.image_size, "hook": args.hook, "feature_map": [d_in, height, width],
        "d_sae": sae.d_sae, "k": args.k, "threshold": theta, "threshold_vectors": n_threshold,
        "axial_slices": prepared.num_slices, "brain_slices": int(len(slices)), "positions": positions,
        "nnz": int(len(codes.latents)), "mean_l0": codes.mean_l0(),
        "l0_median": float(np.median(l0)), "l0_p99": float(np.percentile(l0, 99)), "l0_max": int(l0.max()),
        "positions_without_latents": float((l0 == 0).mean()),
        "sparse_bytes": sparse_b, "sparse_bytes_parts": {"offsets": int(codes.offsets.nbytes), "latents": int(codes.latents.nbytes),
                                                         "values": int(codes.values.nbytes)},
        "dense_float32_bytes": dense_b, "sparse_over_dense": sparse_b / dense_b,
        "seconds": {"read_and_prepare": prepare_s, "activations_for_threshold": activations_s, "estimate_threshold": threshold_s,
                    "encode_volume": encode_s, "heatmap_median": statistics.median(heatmap_times),
                    "heatmap_all": heatmap_times, "heatmap_mass_all_latents": mass_s,
                    "class_mass_per_latent_loop_median": loop_per_latent},
        "fired_latents": fired, "class_mass_loop_estimate_s": fired * loop_per_latent,
        "class_mass_speedup": fired * loop_per_latent / mass_s, "class_mass_max_relative_diff": mass_diff,
        "heatmap_latents": latents[1:] or latents[:1], "heatmap_shape": list(heatmap.shape),
        "encode_volume_peak_rss_growth_bytes": rss.growth, "peak_rss_method": rss.method,
        "activation_pass_peak_rss_growth_bytes": rss_activations.growth,
        "check_first_batch_max_abs_diff": check_diff, "check_first_batch_support_mismatches": check_support,
    }
    env = environment(device, load_at_start)

    r = result
    print(f"# Latent codes of one volume: sparse vs dense (`{r['case_id']}`)\n")
    shape = "x".join(map(str, r["volume_shape"]))
    print(f"- volume {shape} voxels, {r['axial_slices']} axial slices, {r['brain_slices']} contain brain (all encoded)")
    print(f"- U-Net (BasicUNet, random init, seed {args.seed}) at {args.image_size}px, hook `{args.hook}`: "
          f"{d_in} channels x {height} x {width}")
    print(f"- SAE: d_in {d_in}, expansion {args.expansion} ({r['d_sae']} latents), k {args.k}, random init; threshold "
          f"{theta:.4g} from `estimate_threshold` on {n_threshold:,} of the case's {positions:,} positions")
    print_environment(env, device)
    print()
    print("| positions | mean L0 | L0 median / p99 / max | sparse MB | dense float32 MB | sparse / dense |")
    print("|---|---|---|---|---|---|")
    print(f"| {positions:,} | {r['mean_l0']:.2f} | {r['l0_median']:.0f} / {r['l0_p99']:.0f} / {r['l0_max']} "
          f"| {sparse_b / MB:.2f} | {dense_b / MB:.1f} | **{100 * r['sparse_over_dense']:.2f}%** |")
    print()
    parts = r["sparse_bytes_parts"]
    print(f"Sparse = `VolumeCodes.nbytes`: offsets {parts['offsets'] / MB:.2f} MB (int64, one per position + 1), "
          f"latents {parts['latents'] / MB:.2f} MB (int32) and values {parts['values'] / MB:.2f} MB (float32) for "
          f"{r['nnz']:,} active latents. Dense = positions x {r['d_sae']} x 4 bytes. MB = 10^6 bytes. "
          f"{100 * r['positions_without_latents']:.1f}% of positions have no active latent.")
    print()
    s = r["seconds"]
    rss_note = "" if rss.method == "VmHWM reset" else " (getrusage: 0 when an earlier step peaked higher)"
    print("| step | time |")
    print("|---|---|")
    print(f"| read + preprocess the case (`prepare_for_model`) | {s['read_and_prepare']:.2f} s |")
    print(f"| hook activations of all brain slices + `estimate_threshold` | {s['activations_for_threshold']:.2f} s + "
          f"{s['estimate_threshold']:.2f} s |")
    print(f"| `encode_volume` (U-Net forward + SAE, {r['brain_slices']} slices) | {s['encode_volume']:.2f} s |")
    print(f"| one heatmap on the input grid (`VolumeCodes.heatmap`, {shape}), median of {len(heatmap_times)} | "
          f"**{1000 * s['heatmap_median']:.0f} ms** (min {1000 * min(heatmap_times):.0f}, max {1000 * max(heatmap_times):.0f}) |")
    print(f"| class mass of all {fired} fired latents, per-latent heatmaps (former `label_mass`): {len(loop_times)} timed, "
          f"median x {fired} | {loop_per_latent * fired:.2f} s |")
    print(f"| the same with one `VolumeCodes.heatmap_mass` call | **{mass_s:.2f} s** "
          f"(**{r['class_mass_speedup']:.0f}x**; largest difference {mass_diff:.1e} of a heatmap's mass) |")
    print()
    print(f"Peak resident memory growth during `encode_volume`: {rss.growth / MB:.0f} MB ({rss.method}{rss_note}); it "
          "includes the U-Net forward passes and one batch's dense pre-activations "
          f"({args.batch_size} slices x {height * width} positions x {r['d_sae']} x 4 bytes = "
          f"{args.batch_size * height * width * r['d_sae'] * 4 / MB:.0f} MB), not only the codes. For comparison, the "
          f"activation pass before it (U-Net encoder only, same batches, keeping all {positions:,} x {d_in} float32 "
          f"vectors = {positions * d_in * 4 / MB:.0f} MB) grew the peak by {rss_activations.growth / MB:.0f} MB.")
    print(f"Check, first batch of slices vs dense `sae.encode(use_threshold=True)`: max abs difference {check_diff:.3g}, "
          f"{check_support} (position, latent) pairs active in one and not the other.")

    if args.json:
        payload = {**result, "quick": args.quick, "seed": args.seed, "batch_size": args.batch_size, "environment": env}
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
