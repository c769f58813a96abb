#!/usr/bin/env python
"""Benchmark: training vectors per second of the SegLens BatchTopK SAE step against a plain dense BatchTopK step.

What it measures
----------------
The wall time of one SAE training step (forward, loss, backward, decoder-gradient projection, Adam step,
decoder renormalisation) on a batch of activation vectors, for two implementations of the same step, in one
process, on the same batches, on the same device:

* **baseline** -- a plain dense BatchTopK step written here, the way a reference implementation does it::

      pre   = relu(x @ W_enc + b_enc)                      # (n, d_sae) dense
      Z     = pre * mask                                   # mask: the n*k largest entries of pre over the batch
      x_hat = Z @ W_dec + b_dec                            # dense (n, d_sae) @ (d_sae, d_in)
      loss  = mean((x_hat - x)^2); loss.backward()         # autograd through the dense products
      W_dec.grad -= <W_dec.grad, W_dec>_row * W_dec        # drop the gradient parallel to each decoder row
      adam.step(); W_dec <- W_dec / ||W_dec||_row          # unit-norm decoder rows

* **SegLens** -- the inner loop of :func:`SegLensLogic.sae.trainer.train_sae`, step for step::

      x_hat, latents = train_forward(sae, x)  # codes as a CSR matrix: sparse-dense products forward and backward
      loss  = mean((x_hat - x)^2); loss.backward()         # sparse encoder backward (_SparseEncode)
      sae.remove_parallel_gradient(); adam.step(); sae.normalise_decoder()

Both run **without the auxiliary dead-latent loss** (and without ``train_sae``'s dead-latent bookkeeping, which
only serves that loss), so they optimise exactly the same objective. Both use ``torch.optim.Adam`` (lr 3e-4,
betas 0.9/0.999, PyTorch's default implementation) in float32.

Sizes default to a realistic hook point: ``d_in`` 128 (U-Net ``down_3``, SegFormer-B1 stage 2), expansion 16
(2048 latents), k 32, batches of 4096 vectors. Data are random normal vectors, or, with ``--store DIR``, vectors
drawn at random from an activation store (``seglens extract``). As in ``train_sae``, the data are multiplied by
one scalar so that the mean vector norm is ``sqrt(d_in)``. All batches are made and put on the device before
timing (data loading is not timed).

Timing: ``--warmup`` steps of each path (default 3), then ``--steps`` timed steps (default 20), alternating
baseline and SegLens step by step, each path on its own copy of the same initial SAE and its own optimiser,
both fed batch ``i`` at step ``i``. On CUDA the device is synchronised before and after each timed step. The
median step time is reported; vectors/s = batch size / median seconds per step; speed-up = baseline median /
SegLens median.

Equivalence check: from the same initial weights and on the same batch, one step of each path; the script
prints the max abs difference of the loss, of each parameter's gradient (after the decoder projection) and of
each parameter after the Adam step and renormalisation. They agree up to float32 rounding (the two paths sum
the same products in different orders).

Usage (from the repository root)::

    python benchmarks/sae_train.py --quick          # batch 1024, 5 steps: well under a minute on 2 CPU cores
    python benchmarks/sae_train.py                  # batch 4096, 20 steps
    python benchmarks/sae_train.py --store path/to/store --json out.json
"""

from __future__ import annotations

import argparse
import copy
import math
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
import torch.nn.functional as F  # noqa: E402

from SegLensLogic.networks import default_device  # noqa: E402
from SegLensLogic.sae import ActivationStore, BatchTopKSAE, SAEConfig  # noqa: E402
from SegLensLogic.sae.batch_topk import train_forward  # noqa: E402

LEARNING_RATE = 3e-4
BETAS = (0.9, 0.999)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=128, help="activation channels (default 128: U-Net down_3, SegFormer-B1 stage 2)")
    parser.add_argument("--expansion", type=int, default=16, help="latents per input channel (default 16)")
    parser.add_argument("-k", "--k", type=int, default=32, help="mean active latents per vector (default 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="vectors per step (default 4096; 1024 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per path, median reported (default 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per path first (default 3; 1 with --quick)")
    parser.add_argument("--store", type=Path, default=None, metavar="DIR",
                        help="draw vectors from this activation store instead of random data (--d-in is then the store's)")
    parser.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the initial weights (default 0)")
    parser.add_argument("--quick", action="store_true", help="batch 1024, 5 timed steps, 1 warm-up (a quick check on a CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile 3 extra steps of each path (torch.profiler) and print the 12 costliest operators")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 1024 if args.quick else 4096
    if args.steps is None:
        args.steps = 5 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0 or args.k < 1 or args.expansion < 1 or args.d_in < 1:
        parser.error("--steps, --batch-size, -k, --expansion and --d-in must be at least 1, --warmup at least 0")
    return args


# -- the two training steps -----------------------------------------------------------------------------
class DenseBatchTopK:
    """A plain dense BatchTopK SAE: four parameter tensors and a training step built from dense ops only."""

    def __init__(self, sae: BatchTopKSAE, k: int):
        self.k = k
        self.W_enc = sae.W_enc.detach().clone().requires_grad_(True)
        self.b_enc = sae.b_enc.detach().clone().requires_grad_(True)
        self.W_dec = sae.W_dec.detach().clone().requires_grad_(True)
        self.b_dec = sae.b_dec.detach().clone().requires_grad_(True)
        self.optimiser = torch.optim.Adam(self.parameters(), lr=LEARNING_RATE, betas=BETAS)

    def parameters(self) -> list[torch.Tensor]:
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]

    def forward_backward(self, x: torch.Tensor) -> torch.Tensor:
        """Loss and gradients (decoder gradient projected), no parameter update."""
        pre = F.relu(x @ self.W_enc + self.b_enc)
        with torch.no_grad():
            top = torch.topk(pre.flatten(), min(x.shape[0] * self.k, pre.numel()), sorted=False)
            mask = torch.zeros(pre.numel(), dtype=pre.dtype, device=pre.device).index_fill_(0, top.indices, 1.0).view_as(pre)
        codes = pre * mask  # dense (n, d_sae), zeros outside the batch top n*k
        x_hat = codes @ self.W_dec + self.b_dec
        loss = (x_hat - x).pow(2).mean()
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w = self.W_dec
            w.grad -= (w.grad * w).sum(dim=1, keepdim=True) * w
        return loss

    def update(self) -> None:
        self.optimiser.step()
        with torch.no_grad():
            self.W_dec.data = F.normalize(self.W_dec.data, dim=1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.forward_backward(x)
        self.update()
        return loss

    def named(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}


class SegLensStep:
    """The SegLens SAE and the training step of ``train_sae``'s inner loop: ``train_forward`` (CSR codes), no aux loss."""

    def __init__(self, sae: BatchTopKSAE):
        self.sae = sae
        self.optimiser = torch.optim.Adam(sae.parameters(), lr=LEARNING_RATE, betas=BETAS)

    def forward_backward(self, x: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        x_hat, _ = train_forward(sae, x)
        loss = (x_hat - x).pow(2).mean()
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_gradient()
        return loss

    def update(self) -> None:
        self.optimiser.step()
        self.sae.normalise_decoder()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.forward_backward(x)
        self.update()
        return loss

    def named(self) -> dict[str, torch.Tensor]:
        sae = self.sae
        return {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}


# -- data -----------------------------------------------------------------------------------------------
def make_batches(args: argparse.Namespace, count: int, device: torch.device) -> tuple[list[torch.Tensor], dict]:
    """``count`` batches on ``device``, scaled so that the mean vector norm is sqrt(d_in) (as ``train_sae`` does)."""
    generator = torch.Generator().manual_seed(args.seed)
    n = args.batch_size
    if args.store:
        store = ActivationStore(args.store)
        rng = np.random.default_rng(args.seed)
        replace = len(store) < n * count
        index = rng.choice(len(store), size=n * count, replace=replace)
        data = store.vectors(index)
        source = {"kind": "store", "store": str(args.store), "hook_point": store.hook_point,
                  "store_vectors": len(store), "drawn_with_replacement": bool(replace)}
    else:
        data = torch.randn(n * count, args.d_in, generator=generator)
        source = {"kind": "random normal"}
    scale = math.sqrt(data.shape[1]) / float(data.norm(dim=1).mean().clamp_min(1e-12))
    data = data * scale
    source["norm_scale"] = scale
    return [batch.to(device) for batch in data.split(n)], source


# -- measurements ---------------------------------------------------------------------------------------
def equivalence(sae: BatchTopKSAE, k: int, x: torch.Tensor) -> dict:
    """One step of each path from the same weights on the same batch: max abs differences."""
    dense, ours = DenseBatchTopK(sae, k), SegLensStep(copy.deepcopy(sae))
    loss_d, loss_o = dense.forward_backward(x).item(), ours.forward_backward(x).item()
    out = {"loss_baseline": loss_d, "loss_seglens": loss_o, "loss": abs(loss_d - loss_o)}
    nd, no = dense.named(), ours.named()
    for name in nd:
        out[f"grad_{name}"] = float((nd[name].grad - no[name].grad).abs().max())
        out[f"grad_{name}_scale"] = float(nd[name].grad.abs().max())
    dense.update()
    ours.update()
    for name in nd:
        out[f"param_{name}"] = float((nd[name].detach() - no[name].detach()).abs().max())
    return out


def timed_step(path, x: torch.Tensor, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    path.step(x)
    sync(device)
    return time.perf_counter() - start


def profile(path, batches: list[torch.Tensor], device: torch.device, title: str) -> None:
    """Print the costliest operators of 3 steps of ``path`` (self time on the device that runs them)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for x in batches[:3]:
            path.step(x)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### Profile: {title} (3 steps)\n\n```")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=48))
    print("```")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()

    batches, source = make_batches(args, args.warmup + args.steps + 1, device)
    d_in = batches[0].shape[1]
    torch.manual_seed(args.seed)
    config = SAEConfig(d_in=d_in, expansion=args.expansion, k=args.k)
    sae = BatchTopKSAE(config).to(device)
    with torch.no_grad():
        sae.b_dec.copy_(batches[0].mean(dim=0))  # a realistic start (train_sae uses the geometric median)

    check = equivalence(sae, args.k, batches[-1])

    dense, ours = DenseBatchTopK(sae, args.k), SegLensStep(copy.deepcopy(sae))
    for i in range(args.warmup):
        timed_step(dense, batches[i], device)
        timed_step(ours, batches[i], device)
    base_times, fast_times = [], []
    for i in range(args.warmup, args.warmup + args.steps):
        print(f"  ... step {i - args.warmup + 1}/{args.steps}", file=sys.stderr, flush=True)
        base_times.append(timed_step(dense, batches[i], device))
        fast_times.append(timed_step(ours, batches[i], device))
    base_s, fast_s = statistics.median(base_times), statistics.median(fast_times)
    n = args.batch_size
    result = {
        "baseline": {"seconds_per_step": base_s, "vectors_per_second": n / base_s, "all_seconds": base_times},
        "seglens": {"seconds_per_step": fast_s, "vectors_per_second": n / fast_s, "all_seconds": fast_times},
        "speedup": base_s / fast_s,
    }

    env = environment(device, load_at_start)
    d_sae = config.d_sae
    print("# SAE training step speed: dense BatchTopK vs SegLens\n")
    print(f"- SAE: d_in {d_in}, expansion {args.expansion} ({d_sae} latents), k {args.k}; batch {n} vectors "
          f"({n * args.k} kept activations per batch); float32; Adam lr {LEARNING_RATE}; no auxiliary loss in either path")
    data = (f"activation store `{source['store']}` (hook `{source['hook_point']}`, {source['store_vectors']} vectors)"
            if source["kind"] == "store" else "random normal vectors")
    print(f"- data: {data}, scaled so the mean norm is sqrt(d_in); {len(batches)} batches made on the device before timing")
    print_environment(env, device)
    print(f"- {args.warmup} warm-up step(s) per path, then median of {args.steps} timed steps, alternating paths")
    print()
    print("| path | what a step runs | ms per step (median) | vectors/s | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| baseline: dense BatchTopK | dense pre-activations with autograd, dense ({n}, {d_sae}) masked codes, "
          f"dense decoder | {1000 * base_s:.1f} | {n / base_s:,.0f} | 1.00x |")
    print(f"| SegLens: `train_forward` (CSR codes) | exact top {n * args.k} from a sampled cut, codes as CSR, "
          f"sparse-dense products forward and backward | {1000 * fast_s:.1f} | {n / fast_s:,.0f} | **{result['speedup']:.2f}x** |")
    print()
    print("Vectors/s = batch size / median seconds per step (forward, backward, decoder-gradient projection, Adam, "
          "decoder renormalisation). Speed-up = baseline seconds / SegLens seconds.")
    print()
    print(f"Same step from the same weights on the same batch (loss {check['loss_baseline']:.6f} baseline, "
          f"{check['loss_seglens']:.6f} SegLens), max abs difference:")
    print(f"- loss: {check['loss']:.3g}")
    print("- gradients: " + ", ".join(f"{name} {check[f'grad_{name}']:.3g} (of max |grad| {check[f'grad_{name}_scale']:.3g})"
                                      for name in ("W_enc", "b_enc", "W_dec", "b_dec")))
    print("- parameters after the Adam step and renormalisation: "
          + ", ".join(f"{name} {check[f'param_{name}']:.3g}" for name in ("W_enc", "b_enc", "W_dec", "b_dec")))

    if args.profile:
        profile(dense, batches, device, "baseline, dense BatchTopK")
        profile(ours, batches, device, "SegLens, train_forward (CSR codes)")

    if args.json:
        payload = {
            "d_in": d_in, "expansion": args.expansion, "d_sae": d_sae, "k": args.k, "batch_size": n,
            "steps": args.steps, "warmup": args.warmup, "quick": args.quick, "seed": args.seed, "data": source,
            "aux_loss": False, "environment": env, "results": result, "equivalence": check,
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
