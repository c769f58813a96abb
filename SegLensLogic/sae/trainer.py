"""Training a BatchTopK SAE from an activation store (Bussmann et al. 2024; paper section 3.4, appendix B).

Recipe (choices made explicit; the settings sweep that chose the shipped SAE is in ``docs/reference-model.md``):

- one dataset-level normalisation scalar ``s`` so that ``E||s x|| = sqrt(d_in)``, folded into the weights at save;
- ``b_dec`` initialised at the geometric median of a sample (Weiszfeld iterations);
- decoder rows initialised from random training vectors (centred on ``b_dec``, unit norm: every latent starts
  where data lives, so few die) and the encoder as their transpose (``init="data"``; ``"random"``: Kaiming);
- loss: mean squared error over all elements, plus ``aux_coefficient`` (1/32) times the auxiliary top-k loss:
  the ``k_aux`` largest pre-activations among *dead* latents reconstruct the residual ``x - x^`` (no ``b_dec``),
  normalised by the residual's variance (as in OpenAI's and dictionary_learning's code: unnormalised, the aux
  loss vanishes as the reconstruction improves and dead latents stay dead);
- a latent is dead when it has not fired on the last ``dead_after`` training vectors;
- optionally (``resample_every``), dead latents are re-initialised at the residuals of poorly reconstructed vectors,
  in the first half of training (Bricken et al. 2023): the aux loss alone leaves most of a wide dictionary dead on
  brain MRI activations, and the resampled latents land on tumour (``docs/measurements/sae-resampling.md``);
- decoder rows kept at unit norm, with the gradient component parallel to each row removed before each step;
- Adam, betas (0.9, 0.999), learning rate ``2e-4 / sqrt(d_sae / 2**14)`` unless given (dictionary_learning's
  scaling), linear warm-up, gradient norm clipped at 1;
- a stopping rule: every ``eval_every`` steps the normalised MSE on held-out vectors is measured; when it has
  not improved by ``min_delta`` (relative) for ``patience`` evaluations, the learning rate decays linearly to 0
  over ``decay_fraction`` of the steps run so far, then training stops; without a plateau the decay takes the
  last 20 % of the step budget;
- sparse encoder backward and sparse decoding (``n*k*d`` work instead of ``n*d_sae*d``);
- the inference threshold is estimated on held-out vectors so that they average exactly ``k`` active latents.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SegLensError
from ..networks.segmenter import default_device
from .activations import ActivationStore
from .batch_topk import train_forward
from .model import DEFAULT_MIN_BRAIN_FRACTION, BatchTopKSAE, SAEConfig
from .options import SAETrainingOptions  # defined apart so that the command line reads its defaults without torch


def default_learning_rate(d_sae: int) -> float:
    """``2e-4 / sqrt(d_sae / 2**14)`` (dictionary_learning's scaling with dictionary size)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points`` ``(n, d)``."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() < eps * max(1.0, float(median.norm())):
            return new
        median = new
    return median


def store_min_brain_fraction(store) -> float:
    """The brain-fraction rule a store's vectors were extracted by, which an SAE trained on them encodes by
    (0 when every position was kept; the default for stores written before the rule was recorded)."""
    options = store.manifest.get("options") or {}
    if options.get("brain_only") is False:
        return 0.0
    return float(options.get("min_brain_fraction", DEFAULT_MIN_BRAIN_FRACTION))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - sum||x - x^||^2 / sum||x - mean(x)||^2`` over a batch."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return float(1 - residual / total)


@torch.no_grad()
def estimate_threshold(sae: BatchTopKSAE, vectors: torch.Tensor, chunk: int = 4096) -> float:
    """The global threshold that leaves held-out ``vectors`` with exactly ``k`` active latents on average.

    It is the ``(n * k)``-th largest pre-activation over the set (computed chunk by chunk on the top ``n*k``
    candidates), stored in float32 on the SAE and returned.
    """
    n, k = vectors.shape[0], sae.config.k
    device = sae.W_enc.device
    best = torch.empty(0, device=device)
    for start in range(0, n, chunk):
        pre = sae.pre_activations(vectors[start : start + chunk].to(device)).flatten()
        best = torch.topk(torch.cat([best, pre]), min(n * k, best.numel() + pre.numel()), sorted=False).values
    # Encoding keeps pre > theta: step just below the (n*k)-th value so that it counts too.
    theta = float(torch.nextafter(best.min(), torch.tensor(-float("inf"), device=best.device)))
    sae.threshold.fill_(theta)
    sae.config.threshold = theta
    return theta


@torch.no_grad()
def evaluate_reconstruction(sae: BatchTopKSAE, vectors: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Reconstruction metrics with the inference threshold on ``vectors`` (raw activation units).

    Returns:
        ``mse`` (per element), ``explained_variance``, ``l0`` (mean active latents per vector) and
        ``dead_fraction`` (latents that never fire on these vectors).
    """
    device = sae.W_enc.device
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    sq_err, count, active = 0.0, 0, 0
    xs, xhats = [], []
    for start in range(0, vectors.shape[0], chunk):
        x = vectors[start : start + chunk].to(device)
        codes = sae.encode(x, use_threshold=True)
        x_hat = sae.decode(codes)
        fired |= (codes > 0).any(dim=0)
        active += int((codes > 0).sum())
        sq_err += float((x - x_hat).pow(2).sum())
        count += x.numel()
        xs.append(x.cpu())
        xhats.append(x_hat.cpu())
    x_all, x_hat_all = torch.cat(xs), torch.cat(xhats)
    return {
        "mse": sq_err / count,
        "explained_variance": explained_variance(x_all, x_hat_all),
        "l0": active / vectors.shape[0],
        "dead_fraction": float((~fired).float().mean()),
    }


class _Schedule:
    """Warm-up, constant, then a linear decay to 0 that starts at a plateau (or at 80 % of the budget)."""

    def __init__(self, total_steps: int, warmup_steps: int, decay_fraction: float):
        self.total, self.warmup, self.decay_fraction = total_steps, warmup_steps, decay_fraction
        self.decay_start: int | None = None
        self.decay_length = 1

    def start_decay(self, step: int, until_budget: bool = False) -> None:
        if self.decay_start is None:
            self.decay_start = step
            length = self.total - step if until_budget else min(int(round(self.decay_fraction * step)), self.total - step)
            self.decay_length = max(1, length)

    def factor(self, step: int) -> float:
        if step >= int(0.8 * self.total):
            self.start_decay(step, until_budget=True)
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.decay_start is None:
            return warm
        return warm * max(0.0, 1 - (step - self.decay_start) / self.decay_length)

    def finished(self, step: int) -> bool:
        return step >= self.total or (self.decay_start is not None and step >= self.decay_start + self.decay_length)


def initialise_from_data(sae: BatchTopKSAE, sample: torch.Tensor, generator: torch.Generator) -> None:
    """Decoder rows = random distinct sample vectors minus ``b_dec``, unit norm; encoder = their transpose.

    Args:
        sample: normalised training vectors ``(m, d_in)``; with fewer than ``d_sae`` of them, the rest of the
            rows keep their random initialisation.
    """
    with torch.no_grad():
        centred = sample - sae.b_dec
        centred = centred[centred.norm(dim=1) > 1e-6]
        n = min(sae.d_sae, len(centred))
        picks = torch.randperm(len(centred), generator=generator)[:n].to(centred.device)
        rows = F.normalize(centred[picks], dim=1)
        sae.W_dec.data[:n] = rows
        sae.W_enc.data[:, :n] = rows.t()


@torch.no_grad()
def resample_dead_latents(sae: BatchTopKSAE, optimiser: torch.optim.Optimizer, dead: torch.Tensor, x: torch.Tensor,
                          generator: torch.Generator, encoder_scale: float = 0.2) -> int:  # fmt: skip
    """Re-initialise the ``dead`` latents at what the dictionary misses (Bricken et al. 2023, "Towards Monosemanticity").

    Each dead latent takes one vector of ``x`` (normalised training vectors ``(m, d_in)``), drawn with probability
    proportional to the square of its squared reconstruction error: its decoder row becomes that vector's unit
    residual ``x - x^``, its encoder column the same direction at ``encoder_scale`` times the mean norm of the live
    encoder columns (so that it enters the top-k gently), its bias 0; Adam's moments for these entries restart.

    Returns:
        the number of latents re-initialised.
    """
    dead_ids = torch.nonzero(dead).squeeze(1)
    if dead_ids.numel() == 0 or dead_ids.numel() == sae.d_sae:
        return 0
    x_hat, _ = train_forward(sae, x)
    residual = x - x_hat
    weights = residual.pow(2).sum(dim=1).pow(2)
    usable = int((weights > 0).sum())
    if usable == 0:
        return 0
    picks = torch.multinomial(weights.cpu(), dead_ids.numel(), replacement=dead_ids.numel() > usable, generator=generator)
    directions = F.normalize(residual[picks.to(residual.device)], dim=1)
    live_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()
    sae.W_dec[dead_ids] = directions
    sae.W_enc[:, dead_ids] = directions.t() * (encoder_scale * live_norm)
    sae.b_enc[dead_ids] = 0
    for parameter, index in ((sae.W_dec, (dead_ids,)), (sae.W_enc, (slice(None), dead_ids)), (sae.b_enc, (dead_ids,))):
        state = optimiser.state.get(parameter, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                state[moment][index] = 0
    return int(dead_ids.numel())


def _heldout_nmse(sae: BatchTopKSAE, x: torch.Tensor) -> float:
    """Normalised MSE ``1 - EV`` of BatchTopK reconstructions of held-out (normalised) vectors."""
    with torch.no_grad():
        x_hat, _ = train_forward(sae, x)
        return float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12))


def training_loss(
    sae: BatchTopKSAE, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, k_aux: int, aux_coefficient: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training objective on one batch of normalised vectors ``x`` and their reconstruction ``x_hat``.

    ``mse`` over all elements, plus ``aux_coefficient`` times the auxiliary loss when latents are ``dead``: the
    ``k_aux`` largest pre-activations among dead latents reconstruct the residual, normalised by its variance.

    Returns:
        ``(loss, mse, aux)``.
    """
    mse = (x_hat - x).pow(2).mean()
    loss = mse
    aux = torch.zeros((), device=x.device)
    if dead.any():
        dead_ids = torch.nonzero(dead).squeeze(1)
        pre_dead = torch.relu(x @ sae.W_enc[:, dead_ids] + sae.b_enc[dead_ids])
        top = torch.topk(pre_dead, min(k_aux, len(dead_ids)), dim=1)
        aux_recon = torch.einsum("nk,nkd->nd", top.values, sae.W_dec[dead_ids][top.indices])
        residual = (x - x_hat).detach()
        # Normalised by the residual's variance, so the aux loss keeps its weight as the MSE falls.
        variance = (residual - residual.mean(dim=0)).pow(2).sum(dim=1).mean().clamp_min(1e-12)
        aux = (aux_recon - residual).pow(2).sum(dim=1).mean() / variance
        if torch.isfinite(aux):
            loss = loss + aux_coefficient * aux
    return loss, mse, aux


class TrainingWorld:
    """Where the training loop runs: alone (this class), or as worker ``rank`` of ``size`` data-parallel workers.

    :mod:`.distributed` subclasses it for Ray Train (DDP). With more than one worker each step takes
    ``batch_size / size`` vectors per worker (the same ``batch_size`` vectors per step in all), gradients are
    averaged, dead latents are counted over all workers, and rank 0 decides the stopping rule.
    """

    rank = 0
    size = 1

    def forward(self, sae: BatchTopKSAE) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The training pass ``x -> (x_hat, latents)`` (DDP wraps it so that gradients are averaged)."""
        return lambda x: train_forward(sae, x)

    def fired_anywhere(self, fired: torch.Tensor) -> torch.Tensor:
        """The latents that fired on any worker this step, from this worker's boolean mask."""
        return fired

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every worker (stopping decisions must not diverge)."""
        return value

    def checkpoint(self, state: dict) -> None:
        """Called on every worker after each held-out evaluation with the loop's state (see ``_train``)."""


class _GlobalOrder:
    """The single-process order: a seeded split of all vector positions and a fresh global shuffle every epoch."""

    def __init__(self, store: ActivationStore, options: SAETrainingOptions):
        self.store, self.seed = store, options.seed
        self.train_idx, self.hold_idx = store.split(options.holdout_fraction, seed=options.seed)
        self.n_train, self.n_holdout = len(self.train_idx), len(self.hold_idx)

    def sample(self, rng: np.random.Generator, size: int) -> torch.Tensor:
        return self.store.vectors(rng.choice(self.train_idx, size=size, replace=False))

    def holdout(self, n: int) -> torch.Tensor:
        return self.store.vectors(self.hold_idx[:n])

    def batches(self, batch_size: int, skip: int = 0):
        epoch = 0
        while True:
            for batch in self.store.batches(self.train_idx, batch_size, seed=self.seed + epoch):
                if skip:
                    skip -= 1
                    continue
                yield batch
            epoch += 1


class _ShardOrder:
    """The streaming order (:meth:`ActivationStore.shard_split`): memory bounded by a few shards; each worker
    streams its own shards every epoch."""

    def __init__(self, store: ActivationStore, options: SAETrainingOptions, world: TrainingWorld):
        self.split, self.world, self.seed = store.shard_split(options.holdout_fraction, options.seed), world, options.seed
        self.n_train, self.n_holdout = self.split.n_train, self.split.n_holdout

    def sample(self, rng: np.random.Generator, size: int) -> torch.Tensor:
        return self.split.sample(size, rng, "train")

    def holdout(self, n: int) -> torch.Tensor:
        return self.split.sample(n, np.random.default_rng([self.seed, 3]), "holdout")

    def batches(self, batch_size: int, skip: int = 0):
        return self.split.batches(batch_size // self.world.size, self.world.rank, self.world.size, skip=skip)


def train_sae(
    store: ActivationStore,
    options: SAETrainingOptions | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
    stream: bool = False,
) -> tuple[BatchTopKSAE, dict]:
    """Train a BatchTopK SAE on ``store`` and estimate its inference threshold.

    Args:
        stream: read the store shard by shard (:meth:`ActivationStore.shard_split`: memory bounded by a few shards,
            the split and the shuffle made shard by shard) instead of the exact global split and shuffle.

    Returns:
        ``(sae, report)``: the SAE (``norm_scale`` set, so it takes raw activations) and a report with the
        training history and held-out metrics (also stored in ``sae.config.training``).

    :func:`SegLensLogic.sae.distributed.train_sae_ray` runs the same loop on Ray Train workers.
    """
    return _train(store, options, device, log, TrainingWorld(), stream=stream)


def _train(
    store: ActivationStore,
    options: SAETrainingOptions | None,
    device: str | torch.device | None,
    log: Callable[[str], None],
    world: TrainingWorld,
    stream: bool = False,
    resume: dict | None = None,
) -> tuple[BatchTopKSAE, dict]:
    """The training loop of every path: alone in global order, alone streaming, or one of ``world.size`` workers
    (always streaming). ``resume`` (see :mod:`.distributed`) continues from a checkpointed state."""
    options = options or SAETrainingOptions()
    if options.init not in ("data", "random"):
        raise ValueError(f"init must be 'data' or 'random', not {options.init!r}")
    device = torch.device(device) if device else default_device()
    torch.manual_seed(options.seed)
    streaming = stream or world.size > 1
    data = _ShardOrder(store, options, world) if streaming else _GlobalOrder(store, options)
    if data.n_train == 0:
        raise SegLensError(f"{store.folder}: no training vectors left after holding out {options.holdout_fraction:.0%}")
    if data.n_train < options.batch_size:
        log(f"note: {data.n_train} training vectors, fewer than one batch of {options.batch_size}")
    sae = BatchTopKSAE(SAEConfig(d_in=store.d_in, expansion=options.expansion, k=options.k, hook_point=store.hook_point,
                                 model_sha256=store.manifest.get("model_sha256"),
                                 min_brain_fraction=store_min_brain_fraction(store))).to(device)  # fmt: skip
    scale, holdout, watch = _initialise(sae, data, store.d_in, options, world, device)
    run = _Run(sae, options, data.n_train, world, device)
    where = f"{device.type}" + (f", {world.size} workers" if world.size > 1 else "") + (", streaming shards" if streaming else "")
    log(
        f"Training BatchTopK SAE: d_in {store.d_in}, {sae.d_sae} latents, k {options.k}, "
        f"{data.n_train} training vectors, up to {run.schedule.total} steps of {options.batch_size} on {where} "
        f"(lr {run.learning_rate:.2g}, init {options.init})"
    )
    if resume is not None:
        run.resume(resume)
        log(f"Resuming at step {run.step} from a checkpoint")
    bar = tqdm(total=run.schedule.total, initial=run.step, desc="train-sae", unit="step", disable=not sys.stderr.isatty() or world.rank != 0)
    for batch in data.batches(options.batch_size, skip=run.step):
        if run.schedule.finished(run.step):
            break
        x, x_hat, latents, mse, aux, dead = run.train_step(batch.to(device) * scale)
        bar.update(1)
        if run.resampling_due():
            run.resample(data, scale, log)
        evaluating = run.step % options.eval_every == 0 and run.step > run.schedule.warmup
        if evaluating:
            run.watch_heldout(watch, log)
        if run.step % options.log_every == 0 or run.schedule.finished(run.step):
            run.record(x, x_hat, latents, mse, aux, dead, log)
        if evaluating:
            world.checkpoint({"sae": sae, "optimiser": run.optimiser, "since_fired": run.since_fired, "scale": scale, **run.state()})
        if run.schedule.finished(run.step):
            break
    bar.close()
    return sae, _finish(sae, store, options, run, scale, holdout, streaming, resume, log)


def _initialise(sae: BatchTopKSAE, data, d_in: int, options: SAETrainingOptions, world: TrainingWorld, device: torch.device):
    """Set the normalisation scalar, ``b_dec`` and (``init="data"``) the dictionary from a sample of the training
    vectors. Returns ``(scale, holdout, watch)``: the scalar, the held-out vectors (raw units; the first half sets
    the threshold, the second half measures it) and the normalised first part whose loss the stopping rule watches."""
    generator = torch.Generator().manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    sample = data.sample(rng, min(data.n_train, max(16384, 2 * sae.d_sae))).to(device)
    scale = world.agree(math.sqrt(d_in) / float(sample.norm(dim=1).mean().clamp_min(1e-12)))
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample[:16384] * scale))
    if options.init == "data":
        initialise_from_data(sae, sample * scale, generator)
    holdout = data.holdout(65536) if data.n_holdout >= 2 else sample.cpu()[:4096] / scale
    watch = holdout[: min(8192, max(1, len(holdout) // 4))].to(device) * scale
    return scale, holdout, watch


class _Run:
    """One training run's moving parts: optimiser, schedule, dead-latent counters, the stopping rule's state and
    the history; :meth:`state` is what a checkpoint keeps besides the weights and the optimiser."""

    def __init__(self, sae: BatchTopKSAE, options: SAETrainingOptions, n_train: int, world: TrainingWorld, device: torch.device):
        self.sae, self.options, self.world = sae, options, world
        self.k_aux = options.k_aux or max(1, sae.config.d_in // 2)
        self.dead_after = options.dead_after or 10 * options.batch_size
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
        self.learning_rate = options.learning_rate or default_learning_rate(sae.d_sae)
        self.optimiser = torch.optim.Adam(sae.parameters(), lr=self.learning_rate, betas=(0.9, 0.999))
        total_steps = max(1, math.ceil(options.epochs * math.ceil(n_train / options.batch_size)))
        if options.max_steps:
            total_steps = min(total_steps, options.max_steps)
        warmup = options.warmup_steps if options.warmup_steps is not None else min(1000, total_steps // 20)
        self.schedule = _Schedule(total_steps, warmup, options.decay_fraction)
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.best_nmse, self.stale, self.step = math.inf, 0, 0
        self.resamples: list[dict] = []
        self.forward = world.forward(sae)
        self.start_time = time.monotonic()

    def resume(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.since_fired.copy_(state["since_fired"].to(self.since_fired.device))
        self.step, self.best_nmse, self.stale = state["step"], state["best_nmse"], state["stale"]
        self.history, self.evaluations = state["history"], state["evaluations"]
        self.resamples = state.get("resamples", [])
        self.schedule.decay_start, self.schedule.decay_length = state["decay_start"], state["decay_length"]
        self.start_time = time.monotonic() - state["seconds"]

    def state(self) -> dict:
        return {"step": self.step, "best_nmse": self.best_nmse, "stale": self.stale, "decay_start": self.schedule.decay_start,
                "decay_length": self.schedule.decay_length, "history": self.history, "evaluations": self.evaluations,
                "resamples": self.resamples, "seconds": time.monotonic() - self.start_time}  # fmt: skip

    def train_step(self, x: torch.Tensor):
        """One optimiser step on normalised vectors ``x``; returns what :meth:`record` reads."""
        sae, options = self.sae, self.options
        for group in self.optimiser.param_groups:
            group["lr"] = self.learning_rate * self.schedule.factor(self.step)
        x_hat, latents = self.forward(x)
        dead = self.since_fired >= self.dead_after
        loss, mse, aux = training_loss(sae, x, x_hat, dead, self.k_aux, options.aux_coefficient)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_gradient()
        if options.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), options.grad_clip)
        self.optimiser.step()
        sae.normalise_decoder()
        with torch.no_grad():
            self.since_fired += x.shape[0] * self.world.size
            if self.world.size == 1:
                self.since_fired[latents.unique()] = 0
            else:
                fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
                fired[latents] = True
                self.since_fired[self.world.fired_anywhere(fired)] = 0
        self.step += 1
        return x, x_hat, latents, mse, aux, dead

    def resampling_due(self) -> bool:
        """A resampling step: every ``resample_every`` steps, before the decay and in the first half of the budget
        (resampled latents need the rest to settle)."""
        every = self.options.resample_every
        return bool(every) and self.step % every == 0 and self.schedule.decay_start is None and self.step <= self.schedule.total // 2

    def resample(self, data, scale: float, log: Callable[[str], None]) -> None:
        """Re-initialise the latents dead now, by the aux loss's rule (no firing on the last ``dead_after``
        vectors): :func:`resample_dead_latents`. A longer window (no firing since the previous resampling) finds
        few to resample on brain MRI activations and gains little; this one also moves latents that fire rarely to
        where the dictionary misses, which on brain MRI is tumour (docs/measurements/sae-resampling.md). The
        vectors come from a generator seeded by the step, so every data-parallel worker draws the same ones."""
        dead = self.since_fired >= self.dead_after
        rng = np.random.default_rng([self.options.seed, 7, self.step])
        x = data.sample(rng, min(data.n_train, 16384)).to(self.since_fired.device) * scale
        generator = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
        count = resample_dead_latents(self.sae, self.optimiser, dead, x, generator)
        if count:  # none re-initialised (none dead, or all): the counters keep counting
            self.since_fired[dead] = 0
        self.resamples.append({"step": self.step, "latents": count})
        log(f"step {self.step:6d}  resampled {count} dead latents")

    def watch_heldout(self, watch: torch.Tensor, log: Callable[[str], None]) -> None:
        """The stopping rule: decay the learning rate once the held-out loss stops improving for ``patience``
        evaluations."""
        nmse = self.world.agree(_heldout_nmse(self.sae, watch))
        self.evaluations.append({"step": self.step, "heldout_nmse": nmse})
        if nmse < self.best_nmse * (1 - self.options.min_delta):
            self.best_nmse, self.stale = nmse, 0
        else:
            self.stale += 1
        if self.options.patience is not None and self.stale >= self.options.patience and self.schedule.decay_start is None:
            self.schedule.start_decay(self.step)
            log(f"step {self.step:6d}  held-out loss has plateaued (1-EV {nmse:.4f}): decaying the learning rate over {self.schedule.decay_length} steps")

    def record(self, x, x_hat, latents, mse, aux, dead, log: Callable[[str], None]) -> None:
        record = {
            "step": self.step,
            "mse": mse.item(),
            "aux": aux.item(),
            "explained_variance": explained_variance(x, x_hat.detach()),
            "l0": len(latents) / x.shape[0],
            "dead_fraction": float(dead.float().mean()),
            "learning_rate": self.optimiser.param_groups[0]["lr"],
            "seconds": round(time.monotonic() - self.start_time, 1),
        }
        self.history.append(record)
        log(
            f"step {self.step:6d}  mse {record['mse']:.4f}  EV {record['explained_variance']:.3f}  "
            f"L0 {record['l0']:.1f}  dead {record['dead_fraction']:.3f}  lr {record['learning_rate']:.2g}"
        )


def _finish(sae: BatchTopKSAE, store: ActivationStore, options: SAETrainingOptions, run: _Run, scale: float,
            holdout: torch.Tensor, streaming: bool, resume: dict | None, log: Callable[[str], None]) -> dict:  # fmt: skip
    """Fold in the scale, set the inference threshold on half of the held-out vectors and measure it on the other
    half; the training report (also kept in ``sae.config.training`` without the history)."""
    with torch.no_grad():
        sae.norm_scale.fill_(scale)
    half = len(holdout) // 2
    theta = estimate_threshold(sae, holdout[:half][:16384])
    evaluation = evaluate_reconstruction(sae, holdout[half:])
    log(
        f"Held-out ({len(holdout)} vectors): EV {evaluation['explained_variance']:.3f}  "
        f"L0 {evaluation['l0']:.1f} (k {options.k})  dead {evaluation['dead_fraction']:.3f}  threshold {theta:.4g}  "
        f"after {run.step} steps"
    )
    report = {
        "options": asdict(options),
        "learning_rate": run.learning_rate,
        "store": str(store.folder),
        "vectors": len(store),
        "cohort": store.manifest.get("cohort"),
        "norm_scale": scale,
        "steps": run.step,
        "stopped_early": run.step < run.schedule.total,
        "history": run.history,
        "evaluations": run.evaluations,
        "resamples": run.resamples,
        "holdout": evaluation,
        "seconds": round(time.monotonic() - run.start_time, 1),
    }
    if streaming:
        report["order"] = "shards"
        report["workers"] = run.world.size
    if resume is not None:
        report["resumed_at_step"] = resume["step"]
    sae.config.training = {k: v for k, v in report.items() if k not in ("history", "evaluations")}
    return report


def save_training_report(report: dict, folder: str | Path) -> Path:
    """Write ``training_report.json`` (history included) beside a saved SAE."""
    import json

    from ..storage import atomic_write_text

    return atomic_write_text(Path(folder) / "training_report.json", json.dumps(report, indent=2) + "\n", overwrite=True)


def load_trained(folder: str | Path, options: SAETrainingOptions) -> tuple[BatchTopKSAE, dict] | None:
    """The SAE and report that :func:`train_sae_once` left in ``folder`` when trained with exactly ``options``;
    ``None`` when there is none, it is incomplete (the report is written last) or its options differ."""
    import json

    from ..storage import read_json

    report_path = Path(folder) / "training_report.json"
    if not report_path.is_file():
        return None
    report = read_json(report_path)
    # A report written before an option existed was trained with that option's default.
    stored = {**json.loads(json.dumps(asdict(SAETrainingOptions()))), **(report.get("options") or {})}
    if stored != json.loads(json.dumps(asdict(options))):
        return None
    return BatchTopKSAE.load(folder), report


def train_sae_once(
    store: ActivationStore | Callable[[], ActivationStore],
    options: SAETrainingOptions,
    folder: str | Path,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
) -> tuple[BatchTopKSAE, dict]:
    """:func:`train_sae`, kept in ``folder`` (SAE + ``training_report.json``): a sweep or build cut off part way
    finds the SAEs it had finished and trains only the rest. ``store`` may be a function that makes the store,
    called only when training is needed (extraction can cost as much as a short training)."""
    cached = load_trained(folder, options)
    if cached is not None:
        log(f"{folder}: trained earlier with the same options, loaded")
        return cached
    sae, report = train_sae(store() if callable(store) else store, options, device=device, log=log)
    sae.save(folder, overwrite=True)
    save_training_report(report, folder)
    return sae, report
