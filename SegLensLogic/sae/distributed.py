"""Cohort scale on Ray: activation extraction by Ray actors and SAE training by Ray Train (DDP).

Ray is optional (``pip install -e ".[ray]"``) and imported only here, only when called: the default single-process
paths never need it.

Extraction (:func:`extract_activations_ray`)
    One actor per worker slot (a GPU, or ``cpus_per_worker`` CPUs) loads the model once; cases are dealt to idle
    actors. Each case is written by :func:`~.activations.extract_case` into its own :class:`~.activations.ShardWriter`
    in a private attempt folder, which is renamed into place only when the case is complete: a worker killed
    mid-case leaves an attempt folder that is never used, Ray restarts the actor and runs the case again, and a case
    that is already in place is not redone. When every case is in, the driver renames the shards into the store
    folder, numbered in case order, and writes ``store.json`` (:func:`~.activations.store_manifest`), then renames
    the folder into place (:func:`~.activations.publish_store`). The store holds the same vectors, in the same order,
    with the same index, as :func:`~.activations.extract_activations` writes; only the shard boundaries differ (each
    case starts a shard). With ``subsample < 1`` a first pass counts each case's brain slices, so that every case's
    draws start where the single-process stream would be (:func:`~.activations.subsample_generator`).

Training (:func:`train_sae_ray`)
    Ray Train's ``TorchTrainer`` runs :func:`~.training._train`, the loop of single-process training, on every worker
    with a :class:`~.training.TrainingWorld` for DDP: the same objective (:func:`~.training.training_loss`), the same
    initialisation, schedule and stopping rule, ``batch_size / workers`` vectors per worker and step, gradients
    averaged, dead latents counted over all workers, rank 0's held-out loss deciding for all. Data stream shard by
    shard (:meth:`~.activations.ActivationStore.shard_split`): each worker reads only its own shards in an epoch,
    a few at a time. At every held-out evaluation rank 0 reports a checkpoint holding the SAE at that step in the
    saved SAE format (``sae/``) and the full training state; a run whose worker dies restarts from it (up to
    ``retries`` times). The final checkpoint holds the finished SAE folder and ``training_report.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.cohort import Cohort
from ..storage import atomic_write_text, read_json
from ..errors import SegLensError, refuse_existing
from .activations import (
    ActivationStore,
    ExtractionOptions,
    ShardWriter,
    extract_case,
    publish_store,
    staging_folder,
    store_manifest,
    subsample_generator,
)
from .batch_topk import train_forward
from .model import BatchTopKSAE
from .trainer import SAETrainingOptions, TrainingWorld, _train, save_training_report

RAY_EXTRA = 'pip install -e ".[ray]"'
CASE_RECORD = "case.json"
STATE_WEIGHTS = "training_state.safetensors"
STATE_JSON = "training_state.json"
FINAL_MARKER = "final.json"


def require_ray(train: bool = False):
    """``import ray`` (and ``ray.train``), or a one-line :class:`SegLensError` naming the extra to install."""
    try:
        import ray

        if train:
            import ray.train  # noqa: F401
            import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise SegLensError(f"Ray is not installed ({exc.name or exc}): install the optional extra with {RAY_EXTRA}") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str | None, local_cpus: int | None = None) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address`` (``"auto"``: ``$RAY_ADDRESS``, else the one this machine belongs to),
    or with ``address=None`` (and no ``$RAY_ADDRESS``) start a local one with ``local_cpus`` CPUs; shut it down
    afterwards. A Ray already initialised
    in this process (a test, a notebook) is used as it is and left running."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None and os.environ.get("RAY_ADDRESS"):  # Ray would connect there anyway (and refuse num_cpus)
        address = "auto"
    try:
        if address is None:
            ray.init(num_cpus=local_cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at '{address}'" if address not in (None, "auto") else "on this machine (start one with `ray start --head`, give --ray ADDRESS, or use --workers N for a local one)"
        raise SegLensError(f"cannot connect to a Ray cluster {where}: {str(exc).splitlines()[0]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _placement(ray, device: str, workers: int | None, cpus_per_worker: int) -> tuple[bool, int]:
    """``(use_gpu, number of workers)`` on the connected cluster; a clear error rather than a wait forever."""
    if device not in ("auto", "cpu", "cuda"):
        raise SegLensError(f"device must be auto, cpu or cuda, not '{device}'")
    if workers is not None and workers < 1:
        raise SegLensError(f"--workers must be at least 1, got {workers}")
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if device == "cuda" and gpus == 0:
        raise SegLensError("--device cuda was asked for but the Ray cluster has no GPU")
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    n = workers or (gpus if use_gpu else max(1, cpus // cpus_per_worker))
    if use_gpu and n > gpus:
        raise SegLensError(f"{n} workers of one GPU each were asked for but the Ray cluster has {gpus} GPU(s)")
    if n * cpus_per_worker > cpus:
        raise SegLensError(f"{n} workers of {cpus_per_worker} CPU(s) each were asked for but the Ray cluster has {cpus} CPU(s)")
    return use_gpu, n


def _local_cpus(address: str | None, workers: int | None, cpus_per_worker: int) -> int | None:
    return (workers or os.cpu_count() or 1) * cpus_per_worker if address is None else None


# -- extraction ------------------------------------------------------------------------------------------------


def _absolute_case(case):
    """The case with absolute file paths (Ray workers do not share the driver's working directory)."""

    def resolve(path):
        if path is None:
            return None
        if isinstance(path, str) and ":" in path and not Path(path).exists():  # "archive.npz:key"
            file, key = path.rsplit(":", 1)
            return f"{Path(file).resolve()}:{key}"
        return str(Path(path).resolve()) if isinstance(path, str) else Path(path).resolve()

    if case.naming == "arrays":
        raise SegLensError(f"case '{case.case_id}' is held in memory, not in files: Ray workers read cases from files")
    return dataclasses.replace(
        case, images={m: resolve(p) for m, p in case.images.items()}, label=resolve(case.label), brain_mask=resolve(case.brain_mask)
    )


class _CaseExtractor:
    """A Ray actor: the model, loaded once, and the cases given to it, each written into its own shards."""

    def __init__(self, model_dir: str, device: str, threads: int, options: dict, kill_once: dict | None = None):
        from ..networks import load_segmenter

        if device == "cpu":
            torch.set_num_threads(threads)
        self.model = load_segmenter(model_dir, device=device).eval()
        self.options = ExtractionOptions(**options)
        self.d_in = self.model.hook_points()[self.model._hook(self.options.hook)][0]
        self.kill_once = kill_once

    def count(self, case) -> dict:
        """The case's brain slices (what its subsampling draws depend on)."""
        from ..segmentation.inference import prepare_for_model

        try:
            return {"slices": len(prepare_for_model(self.model, case).brain_slices())}
        except (SegLensError, ValueError, OSError) as exc:
            return {"error": str(exc)}

    def extract(self, case, case_number: int, draws_before: int, staging: str) -> dict:
        """Write ``case`` into ``staging/case_NNNNN`` (atomically: an attempt folder renamed when complete)."""
        staging = Path(staging)
        final = staging / f"case_{case_number:05d}"
        if (final / CASE_RECORD).is_file():  # done by an attempt whose answer was lost
            return read_json(final / CASE_RECORD)
        attempt = Path(tempfile.mkdtemp(prefix=f"case_{case_number:05d}.", suffix=".partial", dir=staging))
        writer = ShardWriter(attempt, self.d_in, self.options.dtype, self.options.shard_size)
        self._arm_kill(writer, case_number, attempt)
        rng = subsample_generator(self.options.seed, draws_before) if self.options.subsample < 1 else None
        start = time.monotonic()
        try:
            entry = extract_case(self.model, case, case_number, self.options, writer, rng)
            writer.flush()
        except (SegLensError, ValueError, OSError) as exc:
            shutil.rmtree(attempt, ignore_errors=True)
            return {"error": str(exc)}
        entry["shards"] = writer.shards
        entry["seconds"] = round(time.monotonic() - start, 2)  # on the worker (not in store.json)
        atomic_write_text(attempt / CASE_RECORD, json.dumps(entry) + "\n")
        try:
            os.rename(attempt, final)
        except OSError:
            if not (final / CASE_RECORD).is_file():
                raise
            shutil.rmtree(attempt, ignore_errors=True)  # another attempt finished first
            return read_json(final / CASE_RECORD)
        return entry

    def _arm_kill(self, writer: ShardWriter, case_number: int, attempt: Path) -> None:
        """Testing only: SIGKILL this worker once, after it wrote ``after_shards`` shards of case ``case``."""
        kill = self.kill_once
        if not kill or kill["case"] != case_number or Path(kill["marker"]).exists():
            return
        flush = writer.flush

        def flush_then_die() -> None:
            flush()
            if len(writer.shards) >= kill["after_shards"]:
                written = sorted(p.name for p in attempt.iterdir())
                Path(kill["marker"]).write_text(json.dumps({"attempt": str(attempt), "files": written}))
                os.kill(os.getpid(), signal.SIGKILL)

        writer.flush = flush_then_die


def _run_on_actors(ray, actors: list, jobs: list[Callable], names: list[str], on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run ``jobs[i](actor)`` (each returns an ObjectRef) on idle actors; results in job order.

    Raises:
        SegLensError: a job answered an error, or its worker died more often than Ray retries.
    """
    results: list[dict | None] = [None] * len(jobs)
    pending: dict[Any, tuple[int, Any]] = {}
    idle, upcoming = list(actors), 0
    while upcoming < len(jobs) or pending:
        while idle and upcoming < len(jobs):
            actor = idle.pop()
            pending[jobs[upcoming](actor)] = (upcoming, actor)
            upcoming += 1
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        number, actor = pending.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise SegLensError(f"case '{names[number]}': its Ray worker failed ({message})") from exc
        if "error" in result:
            raise SegLensError(result["error"])
        results[number] = result
        idle.append(actor)
        if on_done:
            on_done(number, result)
    return results  # type: ignore[return-value]


def extract_activations_ray(
    model_dir: str | Path,
    cohort: Cohort,
    out_dir: str | Path,
    options: ExtractionOptions | None = None,
    overwrite: bool = False,
    address: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    cpus_per_worker: int = 1,
    retries: int = 3,
    log: Callable[[str], None] = print,
    _kill_once: dict | None = None,
) -> ActivationStore:
    """:func:`~.activations.extract_activations` with the cases run by Ray actors; the same store (see the module).

    Args:
        model_dir: the model folder (every worker loads it: on a cluster, a path all nodes see).
        cohort: cases in files (on a cluster, on a filesystem all nodes see).
        out_dir: store folder to create (on a cluster, on a filesystem all nodes see: workers write into it).
        address: the Ray cluster (``"auto"``: the one this machine belongs to); None starts a local one.
        workers: actors (default: one per GPU, or per ``cpus_per_worker`` CPUs, of the cluster).
        device: ``auto`` (GPUs when the cluster has any), ``cpu`` or ``cuda``.
        retries: times a case is run again after its worker dies.
        _kill_once: testing only, ``{"case", "after_shards", "marker"}``: that case's worker is killed once.

    Raises:
        OutputExistsError, SegLensError: as the single-process extraction; also when Ray is missing, the cluster
            cannot be reached or lacks the resources, or a case's worker died more than ``retries`` times.
    """
    from ..networks import load_segmenter

    options = options or ExtractionOptions()
    out_dir = refuse_existing(out_dir, overwrite)
    require_ray()
    cases = [_absolute_case(case) for case in cohort]
    if not cases:
        raise SegLensError(f"cohort '{cohort.name}' has no cases")
    model = load_segmenter(model_dir, device="cpu")
    hook = model._hook(options.hook)
    d_in, *spatial = model.hook_points()[hook]
    with ray_cluster(address, _local_cpus(address, workers, cpus_per_worker)) as ray:
        use_gpu, n = _placement(ray, device, workers, cpus_per_worker)
        n = min(n, len(cases))
        log(f"Extracting '{hook}' activations of {len(cases)} case(s) with {n} Ray worker(s) "
            f"({'1 GPU + ' if use_gpu else ''}{cpus_per_worker} CPU each)")
        tmp = staging_folder(out_dir)
        staging = tmp / ".cases"
        staging.mkdir()
        actors = []
        try:
            actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=retries, max_task_retries=retries)(_CaseExtractor)
            actors = [actor_class.remote(str(Path(model_dir).resolve()), "cuda" if use_gpu else "cpu", cpus_per_worker, vars(options), _kill_once)
                      for _ in range(n)]  # fmt: skip
            names = [case.case_id for case in cases]
            draws_before = [0] * len(cases)
            if options.subsample < 1:
                counts = _run_on_actors(ray, actors, [lambda a, c=c: a.count.remote(c) for c in cases], names)
                draws_before = list(math.prod(spatial) * np.cumsum([0] + [c["slices"] for c in counts[:-1]]))

            def done(number: int, entry: dict) -> None:
                log(f"  {entry['case_id']}: {entry['vectors']} vectors from {len(entry['slices'])} slices ({entry['seconds']:.1f} s on a worker)")

            jobs = [lambda a, i=i: a.extract.remote(cases[i], i, int(draws_before[i]), str(staging.resolve())) for i in range(len(cases))]
            entries = _run_on_actors(ray, actors, jobs, names, on_done=done)
            shards, records = [], []
            for number, entry in enumerate(entries):
                folder = staging / f"case_{number:05d}"
                for shard in entry["shards"]:
                    g = len(shards)
                    os.rename(folder / shard["vectors"], tmp / f"vectors_{g:05d}.npy")
                    os.rename(folder / shard["index"], tmp / f"index_{g:05d}.npy")
                    shards.append({"vectors": f"vectors_{g:05d}.npy", "index": f"index_{g:05d}.npy", "n": int(shard["n"])})
                records.append({key: entry[key] for key in ("case_id", "slices", "vectors")})
            shutil.rmtree(staging)  # killed attempts' folders go with it
            manifest = store_manifest(model, cohort, options, records, shards, model_dir)
            publish_store(tmp, out_dir, manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for actor in actors:
                ray.kill(actor)
    log(f"Wrote {manifest['n_vectors']} vectors of dimension {d_in} ({options.dtype}) in {len(shards)} shard(s) to {out_dir} ({n} Ray workers)")
    return ActivationStore(out_dir)


# -- training --------------------------------------------------------------------------------------------------


class _WorkerError(Exception):
    """A SegLensError raised on a training worker, carried to the driver as plain text (it pickles simply)."""


class _TrainForward(torch.nn.Module):
    """The SAE's training pass as a module, so that DDP can wrap it."""

    def __init__(self, sae: BatchTopKSAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return train_forward(self.sae, x)


class _RayWorld(TrainingWorld):
    """One Ray Train worker: DDP for the gradients, collectives for dead latents and decisions, checkpoints."""

    def __init__(self, rank: int, size: int, device: torch.device, kill_once: dict | None = None):
        self.rank, self.size, self.device, self.kill_once = rank, size, device, kill_once
        self.last_nmse: float | None = None

    def forward(self, sae: BatchTopKSAE):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(_TrainForward(sae), device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def fired_anywhere(self, fired: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        counts = fired.to(torch.int32)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return counts.bool()

    def agree(self, value: float) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        self.last_nmse = float(tensor.item())
        return self.last_nmse

    def checkpoint(self, state: dict) -> None:
        import ray.train

        kill = self.kill_once
        if kill and self.rank == kill["rank"] and state["step"] >= kill["step"] and not Path(kill["marker"]).exists():
            # Ray Train's controller collects the workers' reports every health-check interval (2 s by default): a
            # worker killed sooner after the last checkpoint can beat its registration, and the run restarts from
            # nothing. That races Ray, not the resume under test, so wait out a few intervals first.
            time.sleep(3 * _health_check_interval())
            Path(kill["marker"]).write_text(str(state["step"]))
            os.kill(os.getpid(), signal.SIGKILL)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                save_training_state(Path(folder), state)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"step": state["step"], "heldout_nmse": self.last_nmse}, checkpoint=checkpoint)


def _health_check_interval() -> float:
    """Seconds between Ray Train's polls of its workers (its environment variable, else its default)."""
    try:
        from ray.train.v2._internal.constants import DEFAULT_HEALTH_CHECK_INTERVAL_S, HEALTH_CHECK_INTERVAL_S_ENV_VAR

        return float(os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR, DEFAULT_HEALTH_CHECK_INTERVAL_S))
    except (ImportError, ValueError):  # another Ray version
        return 2.0


def save_training_state(folder: Path, state: dict) -> None:
    """A training checkpoint: ``sae/`` (the SAE at this step in the saved format, no threshold yet) and the state
    to resume from (``training_state.safetensors``: weights, Adam moments, dead-latent counters; ``.json``: the rest).
    """
    sae: BatchTopKSAE = state["sae"]
    snapshot = copy.deepcopy(sae).cpu()
    with torch.no_grad():
        snapshot.norm_scale.fill_(state["scale"])
    snapshot.save(folder / "sae")
    tensors = {f"sae.{name}": t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    optimiser = state["optimiser"].state_dict()
    for index, moments in optimiser["state"].items():
        for name, value in moments.items():
            tensors[f"adam.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["since_fired"] = state["since_fired"].detach().cpu().contiguous()
    save_file(tensors, str(folder / STATE_WEIGHTS))
    scalars = {key: state[key] for key in ("step", "stale", "decay_start", "decay_length", "history", "evaluations", "resamples", "seconds", "scale")}
    scalars["best_nmse"] = None if math.isinf(state["best_nmse"]) else state["best_nmse"]
    scalars["adam_param_groups"] = optimiser["param_groups"]
    atomic_write_text(folder / STATE_JSON, json.dumps(scalars) + "\n")


def load_training_state(folder: Path) -> dict:
    """What :func:`save_training_state` wrote, as ``_train``'s ``resume`` argument (safetensors and JSON only)."""
    tensors = load_file(str(folder / STATE_WEIGHTS))
    scalars = read_json(folder / STATE_JSON)
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    return {
        "sae": {key[4:]: value for key, value in tensors.items() if key.startswith("sae.")},
        "optimiser": {"state": moments, "param_groups": scalars["adam_param_groups"]},
        "since_fired": tensors["since_fired"],
        "best_nmse": math.inf if scalars["best_nmse"] is None else scalars["best_nmse"],
        **{key: scalars[key] for key in ("step", "stale", "decay_start", "decay_length", "history", "evaluations", "seconds")},
        "resamples": scalars.get("resamples", []),  # absent from checkpoints written before resampling existed
    }


def _quiet_ray_train() -> None:
    """Ray Train logs every report and checkpoint at INFO on loggers its log level does not reach; quiet them."""
    try:
        from ray.train.v2._internal.execution import context, storage

        for module in (context, storage):
            module.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray version: leave its logging alone
        pass


def _train_worker(config: dict) -> None:
    """The function every Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    _quiet_ray_train()
    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config["threads"])
    resume = None
    previous = ray.train.get_checkpoint()
    if previous is not None:
        with previous.as_directory() as folder:
            if (Path(folder) / FINAL_MARKER).is_file():  # finished before the restart: report it again
                checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
                ray.train.report({"final": True}, checkpoint=checkpoint)
                return
            resume = load_training_state(Path(folder))

    def log(message: str) -> None:
        if rank == 0:  # not print(): Ray Train redirects it to a logger
            sys.stdout.write(message + "\n")
            sys.stdout.flush()

    try:
        store = ActivationStore(config["store"])
        options = SAETrainingOptions(**config["options"])
        world = _RayWorld(rank, size, device, config.get("kill_once"))
        sae, report = _train(store, options, device, log, world, stream=True, resume=resume)
    except SegLensError as exc:
        raise _WorkerError(str(exc)) from None
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            sae.cpu().save(Path(folder) / "sae")
            save_training_report(report, Path(folder) / "sae")
            atomic_write_text(Path(folder) / FINAL_MARKER, json.dumps({"steps": report["steps"]}) + "\n")
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"final": True, "steps": report["steps"]}, checkpoint=checkpoint)


def _failure_message(exc: BaseException) -> str:
    """The first line that says what went wrong on a worker (a SegLensError's message when there is one)."""
    seen: list[BaseException] = []
    stack = [exc]
    while stack:
        error = stack.pop()
        if error is None or any(error is s for s in seen):
            continue
        seen.append(error)
        if isinstance(error, _WorkerError):
            return str(error)
        stack += [getattr(error, "cause", None), error.__cause__, error.__context__]
        stack += list(getattr(error, "worker_failures", {}).values())
    text = str(exc).strip()
    for line in text.splitlines():
        if "_WorkerError:" in line:
            return line.split("_WorkerError:", 1)[1].strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def train_sae_ray(
    store: ActivationStore | str | Path,
    options: SAETrainingOptions | None = None,
    address: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    cpus_per_worker: int = 1,
    storage: str | Path | None = None,
    retries: int = 2,
    log: Callable[[str], None] = print,
    _kill_once: dict | None = None,
) -> tuple[BatchTopKSAE, dict]:
    """:func:`~.training.train_sae` on Ray Train workers (DDP), streaming shards; the same ``(sae, report)``.

    Args:
        store: the activation store (on a cluster, on a filesystem all nodes see).
        address, workers, device, cpus_per_worker: as :func:`extract_activations_ray` (default: one worker per GPU,
            or per ``cpus_per_worker`` CPUs).
        storage: where Ray Train keeps checkpoints (a folder all nodes see, or an object-storage URI such as
            ``s3://bucket/path``); default: a temporary folder, removed afterwards.
        retries: times the run restarts from its last checkpoint after a worker dies.
        _kill_once: testing only, ``{"rank", "step", "marker"}``: that worker is killed once at its first checkpoint
            from ``step`` on.

    Raises:
        SegLensError: Ray is missing, the cluster lacks the resources, ``batch_size`` is not a multiple of the
            number of workers, or training failed on a worker (its message).
    """
    options = options or SAETrainingOptions()
    if options.init not in ("data", "random"):
        raise ValueError(f"init must be 'data' or 'random', not {options.init!r}")
    if workers is not None and (workers < 1 or options.batch_size % workers):
        raise SegLensError(f"--batch-size {options.batch_size} is not a multiple of --workers {workers} (each worker takes an equal share of a step)")
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    ray = require_ray(train=True)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    own_storage = storage is None
    storage_path = str(storage) if storage is not None else tempfile.mkdtemp(prefix="seglens-ray-train-")
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    try:
        with ray_cluster(address, _local_cpus(address, workers, cpus_per_worker)) as ray:
            use_gpu, n = _placement(ray, device, workers, cpus_per_worker)
            if options.batch_size % n:
                raise SegLensError(f"--batch-size {options.batch_size} is not a multiple of the {n} workers (each takes an equal share of a step)")
            log(f"Ray Train: {n} worker(s) on {'GPU' if use_gpu else 'CPU'}, {options.batch_size // n} vectors per worker and step")
            config = {"store": str(store.folder.resolve()), "options": asdict(options), "threads": cpus_per_worker, "kill_once": _kill_once}
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
                run_config=RunConfig(
                    name="seglens-train-sae",
                    storage_path=storage_path,
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                    failure_config=FailureConfig(max_failures=retries),
                    logging_config=LoggingConfig(log_level="WARNING"),
                ),
            )
            try:
                result = trainer.fit()
            except Exception as exc:  # Ray Train's TrainingFailedError and kin
                raise SegLensError(f"distributed SAE training failed: {_failure_message(exc)}") from exc
            if getattr(result, "error", None) is not None:
                raise SegLensError(f"distributed SAE training failed: {_failure_message(result.error)}")
            with result.checkpoint.as_directory() as folder:
                sae = BatchTopKSAE.load(Path(folder) / "sae")
                report = read_json(Path(folder) / "sae" / "training_report.json")
    finally:
        if own_storage:
            shutil.rmtree(storage_path, ignore_errors=True)
    return sae, report
