"""Training a segmenter on one cohort, from scratch or fine-tuned from a shared base model (paper section 3.3).

Cohort models that are to be diffed must share an initialisation, so that their activation spaces are
comparable (design notes): train a base model once, then fine-tune every cohort model from it with ``init``.

Training runs on axial slices that contain brain, half of each epoch drawn from slices with foreground labels,
with random flips and intensity scaling/shifting (optionally rotation and scaling, and modality dropout so that
a model tolerates a missing sequence) and Dice + cross-entropy loss (MONAI ``DiceCELoss``). After every epoch
the held-out cases are segmented whole and scored per class; the best checkpoint by mean class Dice is what
stays in the output folder.

Long runs are resumable: after every epoch the whole training state (weights, best weights, optimiser,
schedule, random generators, history) is written to ``OUT/checkpoint/`` as safetensors + JSON, and
``train_segmenter(..., resumable=True)`` continues from it with the same results as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from pydantic import Field
from torch.utils.data import WeightedRandomSampler
from tqdm.auto import tqdm

from ..data.cases import read_case
from ..data.cohort import Cohort
from ..data.labels import get_scheme
from ..data.preprocessing import PreparedCase, prepare_case
from ..errors import InputFileError, SegLensError
from .inference import predict_volume
from .scores import segmentation_scores
from ..networks import Segmenter, SegmenterConfig, build_segmenter, default_device, load_segmenter, weights_sha256
from ..networks.segmenter import segmenter_class
from ..storage import Measured, Schema, atomic_write_text, load_safetensors, one_line, read_document, refuse_output_folder


@dataclass
class TrainingOptions:
    """How long and how to train.

    Attributes:
        epochs: number of epochs; None means until ``minutes`` run out.
        minutes: wall-clock budget; training stops after the batch that exceeds it (then validates once more).
        batch_size: slices per step.
        learning_rate: AdamW learning rate (cosine-decayed when ``epochs`` is set).
        warmup_steps: steps of linear learning-rate warm-up (transformers trained from scratch need some).
        slices_per_epoch: slices drawn per epoch; None means the number of brain slices in the training cases.
        foreground_fraction: share of each epoch drawn from slices that hold a labelled structure.
        val_cases: held-out cases for validation (the cohort's last ones); None: 20 %, at least one when
            the cohort has two or more cases.
        spatial_augmentation: random in-plane rotation (up to 15 degrees) and scaling (0.85-1.15) per slice.
        modality_dropout: probability that a slice loses a random subset of its input channels (set to 0, the
            brain mean after z-scoring), so that the model still works when sequences are missing.
        precision: ``"float32"`` or ``"bfloat16"`` (autocast for the forward pass; about 1.7x faster on CPUs with
            AVX512-BF16, and on GPUs).
        keep: which weights are saved: ``"best"`` (best mean validation Dice) or ``"last"`` (the final epoch: with
            a cosine schedule annealed to 0 and a single validation case, often the better choice).
        seed: seeds weights, sampling and augmentation.
    """

    epochs: int | None = 10
    minutes: float | None = None
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    slices_per_epoch: int | None = None
    foreground_fraction: float = 0.5
    val_cases: int | None = None
    spatial_augmentation: bool = False
    modality_dropout: float = 0.0
    precision: str = "float32"
    keep: str = "best"
    seed: int = 0

    def check(self) -> "TrainingOptions":
        """Raise :class:`SegLensError` for options no training can run with (before anything is read or built)."""
        import math

        problems = []
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1), ("warmup_steps", self.warmup_steps, 0),
                                 ("slices_per_epoch", self.slices_per_epoch, 1), ("val_cases", self.val_cases, 0)):  # fmt: skip
            if value is not None and (type(value) is not int or value < low):
                problems.append(f"{_option(name)} must be an integer of at least {low}, got {value!r}")
        for name, value, low, high, open_low in (("minutes", self.minutes, 0.0, math.inf, True), ("learning_rate", self.learning_rate, 0.0, 10.0, True),
                                                 ("weight_decay", self.weight_decay, 0.0, 10.0, False), ("foreground_fraction", self.foreground_fraction, 0.0, 1.0, False),
                                                 ("modality_dropout", self.modality_dropout, 0.0, 1.0, False)):  # fmt: skip
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if value is not None and not (number and (low < value if open_low else low <= value) and value <= high):
                problems.append(f"{_option(name)} must be a finite number in {'(' if open_low else '['}{low:g}, {high:g}], got {value!r}")
        if problems:
            raise SegLensError("training options: " + "; ".join(problems))
        return self


_FLAGS = {"epochs": "--epochs", "minutes": "--minutes", "batch_size": "--batch-size", "learning_rate": "--lr", "warmup_steps": "--warmup",
          "slices_per_epoch": "--slices-per-epoch", "val_cases": "--val-cases", "modality_dropout": "--modality-dropout"}  # fmt: skip


def _option(name: str) -> str:
    """An option's name with its command-line flag (``learning_rate (--lr)``)."""
    return f"{name} ({_FLAGS[name]})" if name in _FLAGS else name


@dataclass
class TrainingResult:
    """What a training run produced: the best model (also saved) and per-epoch history."""

    model: Segmenter
    out_dir: Path
    best_epoch: int
    best_scores: dict[str, float]
    history: list[dict] = field(default_factory=list)


class SliceDataset:
    """Axial brain slices of prepared cases, resized to the model size once, with their labels.

    Attributes:
        images: ``(N, C, S, S)`` float16 (half the memory; cast per batch).
        labels: ``(N, S, S)`` uint8 SegLens classes.
        foreground: ``(N,)`` bool, the slice holds a labelled structure.
        index: ``(case, axial slice)`` of each item.
    """

    def __init__(self, cases: list[PreparedCase]):
        images, labels, self.index = [], [], []
        for case_index, case in enumerate(cases):
            slices = case.brain_slices()
            if len(slices) == 0:
                continue
            images.append(case.model_input(slices).half())
            label = torch.from_numpy(np.ascontiguousarray(case.label[:, :, slices].transpose(2, 0, 1)))
            labels.append(case.geometry.to_model(label[:, None].float(), mode="nearest")[:, 0].to(torch.uint8))
            self.index += [(case_index, int(z)) for z in slices]
        self.images = torch.cat(images) if images else torch.zeros(0)
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.uint8)
        self.foreground = (self.labels.flatten(1) > 0).any(dim=1).numpy() if labels else np.zeros(0, dtype=bool)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, S, S)`` float32 and labels ``(B, 1, S, S)`` int64 on ``device``."""
        return self.images[items].to(device).float(), self.labels[items].to(device).long()[:, None]


def augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    spatial: bool = False,
    modality_dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right and anterior-posterior flips, per-slice intensity scaling and shifting, and optionally
    rotation and scaling and modality dropout.

    Done on whole batches on the model's device: per-sample MONAI dictionary transforms cost more than the
    forward pass of a small model on the CPU. Ranges follow MONAI's ``RandScaleIntensity(0.1)``,
    ``RandShiftIntensity(0.1)`` and ``RandAffine`` (rotation 15 degrees, scale 0.15) on z-scored inputs.

    Args:
        images: ``(B, C, S, S)`` float32; labels ``(B, 1, S, S)`` int64.
        generator: the CPU generator that makes every draw (so a seeded run is reproducible).
    """
    n = images.shape[0]
    draws = torch.rand(n, 4, generator=generator).to(images.device)
    for axis, column in ((2, 0), (3, 1)):
        flip = draws[:, column] < 0.5
        if flip.any():
            images[flip] = images[flip].flip(axis)
            labels[flip] = labels[flip].flip(axis)
    scale = 1 + 0.1 * (2 * torch.rand(n, generator=generator) - 1).to(images.device)
    shift = 0.1 * (2 * torch.rand(n, generator=generator) - 1).to(images.device)
    scale = torch.where(draws[:, 2] < 0.5, scale, torch.ones_like(scale))
    shift = torch.where(draws[:, 3] < 0.5, shift, torch.zeros_like(shift))
    images = images * scale[:, None, None, None] + shift[:, None, None, None]
    if spatial:
        images, labels = _rotate_and_scale(images, labels, generator)
    if modality_dropout > 0 and images.shape[1] > 1:
        # A dropped slice loses each channel with probability 1/2, but never all of them.
        drop = torch.rand(n, generator=generator) < modality_dropout
        lost = (torch.rand(n, images.shape[1], generator=generator) < 0.5) & drop[:, None]
        lost[lost.all(dim=1), torch.randint(images.shape[1], (1,), generator=generator)] = False
        images = images * (~lost).to(images.device)[:, :, None, None]
    return images, labels


def _rotate_and_scale(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Half of the slices rotated by up to 15 degrees and scaled by 0.85-1.15 about the centre (labels nearest)."""
    n = images.shape[0]
    active = (torch.rand(n, generator=generator) < 0.5).float()
    angle = active * math.radians(15) * (2 * torch.rand(n, generator=generator) - 1)
    zoom = 1 + active * 0.15 * (2 * torch.rand(n, generator=generator) - 1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    return images, labels


def _prepare_cohort(
    cohort: Cohort, modalities: list[str], size: int, crop_to_brain: bool, allow_missing: bool, log: Callable[[str], None]
) -> tuple[list[PreparedCase], str]:
    prepared, schemes = [], set()
    for case in cohort:
        if case.label is None:
            raise InputFileError(next(iter(case.images.values())).parent, f"case '{case.case_id}' has no label map to train on")
        images = read_case(case, modalities=modalities, allow_missing=allow_missing)
        schemes.add(images.label_scheme.name if images.label_scheme.name != "brats2013" else "brats2023")
        prepared.append(prepare_case(images, modalities, size, crop_to_brain=crop_to_brain))
        missing = prepared[-1].missing_modalities
        log(f"  loaded {case.case_id}" + (f" (no {', '.join(missing)}: set to 0)" if missing else ""))
    tumour = {"brats2023", "brats2018"}
    kinds = {"tumour" if s in tumour else s for s in schemes}
    if len(kinds) > 1:
        raise SegLensError(f"cohort '{cohort.name}' mixes label schemes {sorted(schemes)}; a model learns one")
    return prepared, ("aseg" if kinds == {"aseg"} else "brats2023")


def _validate(model: Segmenter, cases: list[PreparedCase], batch_size: int) -> dict[str, float]:
    per_case = [
        segmentation_scores(predict_volume(model, c, batch_size=batch_size).labels, c.source.label, model.config.class_names)
        for c in cases
    ]
    return {key: float(np.mean([s[key] for s in per_case])) for key in per_case[0]}


def _learning_rate_factor(warmup_steps: int, total_steps: int | None, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` (constant when None)."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if total_steps:
        factor *= 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return factor


CHECKPOINT_FOLDER = "checkpoint"
_CHECKPOINT_STATE = "training_state.json"
_CHECKPOINT_TENSORS = "training_state.safetensors"


def _save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """The whole training state after an epoch: tensors as safetensors, the rest as JSON (each atomic, the JSON
    last, so a checkpoint whose JSON names its epoch is complete)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{_CHECKPOINT_TENSORS}.tmp"
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(folder / _CHECKPOINT_TENSORS)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(folder / _CHECKPOINT_STATE, json.dumps(state, indent=1) + "\n", overwrite=True)


class OptimizerRecord(Schema):
    param_groups: list[dict[str, Any]]
    plain: dict[str, Any]


class CheckpointState(Schema):
    """``training_state.json`` of a resumable run (beside ``training_state.safetensors``)."""

    run: dict[str, Any]
    epoch: int = Field(ge=0)
    history: list[dict[str, Any]]
    best_epoch: int = Field(ge=0)
    best_metric: Measured
    best_scores: dict[str, Any]
    seconds: float = Field(ge=0)
    optimizer: OptimizerRecord
    scheduler: dict[str, Any] | None = None


def _load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A checkpoint written by :func:`_save_checkpoint`, or None when there is none."""
    state_path, tensor_path = folder / _CHECKPOINT_STATE, folder / _CHECKPOINT_TENSORS
    if not state_path.exists():
        return None
    state = read_document(state_path, "seglens-training-checkpoint", 1, CheckpointState, "SegLens training checkpoint", default_version=1)
    if not tensor_path.is_file():
        raise InputFileError(tensor_path, "missing: the training checkpoint is incomplete; delete it to start afresh")
    return load_safetensors(tensor_path), state


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state split into tensors (safetensors) and plain values (JSON)."""
    full = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, values in full["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                plain[f"{index}.{name}"] = value
    return tensors, {"param_groups": full["param_groups"], "plain": plain}


def _optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in saved["plain"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def init_with_new_head(base_dir: str | Path, class_names: list[str], label_scheme: str, out: str | Path, seed: int = 0) -> Path:
    """A copy of the base model for other label classes: every weight kept except the output layer (new, random).

    The encoder, and so the hook point, starts where the base is: fine-tuned from this (``train_segmenter(init=out)``),
    a model with other classes (healthy structures) stays in the base's activation space, like the tumour models.

    Returns:
        ``out``, a model folder.
    """
    base = load_segmenter(base_dir, device="cpu")
    provenance = {"encoder_from": str(base_dir), "encoder_from_sha256": weights_sha256(base_dir), "output_layer": "new (random)"}
    config = replace(base.config, class_names=list(class_names), label_scheme=label_scheme, training=provenance)
    torch.manual_seed(seed)
    model = build_segmenter(config)
    own = model.state_dict()
    kept = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(kept, strict=False)
    model.save_pretrained(out)
    return Path(out)


def _check_request(cohort: Cohort, out_dir: Path, arch: str | None, init, image_size, options: TrainingOptions, overwrite: bool) -> None:
    """Refuse a training that cannot run, before any work: an image size the architecture cannot take, a model
    folder already there, no stopping rule, an unknown precision or keep rule, an empty cohort."""
    if init is None:
        multiple = getattr(segmenter_class(arch or "unet"), "size_multiple", 32)
        if type(image_size) is not int or not 32 <= image_size <= 2048 or image_size % multiple:
            raise SegLensError(f"image size (--image-size) must be a multiple of {multiple} from 32 to 2048 pixels for {arch or 'unet'}, got {image_size!r}")
    refuse_output_folder(out_dir, overwrite, ("model.safetensors",))
    if options.epochs is None and options.minutes is None:
        raise ValueError("give a number of epochs, a time budget in minutes, or both")
    if options.precision not in ("float32", "bfloat16"):
        raise SegLensError(f"precision must be float32 or bfloat16, not '{options.precision}'")
    if options.keep not in ("best", "last"):
        raise SegLensError(f"keep must be 'best' or 'last', not '{options.keep}'")
    if len(cohort) == 0:
        raise SegLensError(f"cohort '{cohort.name}' has no cases")


def _balanced_sampler(dataset: SliceDataset, options: TrainingOptions) -> tuple[WeightedRandomSampler, torch.Generator]:
    """``slices_per_epoch`` slices an epoch, drawn with replacement so that a ``foreground_fraction`` of them show
    tumour (half, when every slice or none does); and the seeded generator that draws them (and augments)."""
    fg = np.asarray(dataset.foreground)
    share = options.foreground_fraction if fg.any() and (~fg).any() else 0.5
    weights = np.where(fg, share / max(fg.sum(), 1), (1 - share) / max((~fg).sum(), 1))
    generator = torch.Generator().manual_seed(options.seed)
    sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), options.slices_per_epoch or len(dataset),
                                    replacement=True, generator=generator)  # fmt: skip
    return sampler, generator


def _train_epoch(model, dataset: SliceDataset, sampler, generator: torch.Generator, optimizer, scheduler, loss_fn,
                 options: TrainingOptions, device: torch.device, epoch: int, deadline: float) -> list[float]:  # fmt: skip
    """One epoch of augmented, foreground-balanced batches (stops early at ``deadline``); the batches' losses."""
    model.train()
    losses = []
    order = torch.tensor(list(sampler), dtype=torch.long)
    bar = tqdm(order.split(options.batch_size), desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty(), unit="batch")
    for items in bar:
        images, labels = augment(
            *dataset.batch(items, device), generator,
            spatial=options.spatial_augmentation, modality_dropout=options.modality_dropout,
        )  # fmt: skip
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.precision == "bfloat16"):
            logits = model(images)
        loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if time.monotonic() > deadline:
            break
    return losses


def _write_checkpoint(folder: Path, model, best_state: dict[str, torch.Tensor], optimizer, scheduler,
                      generator: torch.Generator, state: dict) -> None:  # fmt: skip
    """Everything a resumed run needs: weights (current and best), optimiser, scheduler, random generators, and
    ``state`` (the run's key, epoch, history, best epoch and scores, seconds)."""
    opt_tensors, opt_plain = _optimizer_tensors(optimizer)
    tensors = {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **{f"best.{k}": v for k, v in best_state.items()},
        **opt_tensors,
        "rng.generator": generator.get_state(),
        "rng.torch": torch.get_rng_state(),
    }
    _save_checkpoint(folder, tensors, {"kind": "seglens-training-checkpoint", **state, "optimizer": opt_plain,
                                       "scheduler": scheduler.state_dict() if scheduler is not None else None})  # fmt: skip


def _resume(checkpoint, folder: Path, run_key: dict, model, optimizer, scheduler, generator: torch.Generator):
    """Put a checkpoint's weights, optimiser, scheduler and random generators back; ``(best weights, saved state)``.

    Raises:
        SegLensError: the checkpoint is of another run (cohort, model or options).
        InputFileError: it cannot be loaded into this run.
    """
    tensors, saved = checkpoint
    if saved["run"] != json.loads(json.dumps(run_key)):
        raise SegLensError(f"{folder} was written by a run with another cohort, model or options; "
                           "delete it or pass the same options to resume")  # fmt: skip
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        optimizer.load_state_dict(_optimizer_state(tensors, saved["optimizer"]))
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise InputFileError(folder, f"training checkpoint cannot be resumed ({one_line(exc)}); delete it to start afresh") from None
    return best_state, saved


def train_segmenter(
    cohort: Cohort,
    out_dir: str | Path,
    arch: str | None = "unet",
    init: str | Path | None = None,
    modalities: list[str] | None = None,
    image_size: int = 256,
    arch_options: dict | None = None,
    options: TrainingOptions | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    crop_to_brain: bool = False,
    resumable: bool = False,
) -> TrainingResult:
    """Train (or fine-tune from ``init``) a segmenter on ``cohort`` and save the best checkpoint to ``out_dir``.

    Args:
        cohort: labelled cases of one population.
        out_dir: model folder to write (``config.json``, ``model.safetensors``, ``training_history.json``).
        arch: architecture for a model trained from scratch (ignored with ``init``).
        init: a base model folder to fine-tune from; its architecture, inputs and size are kept.
        modalities: input channels; default: the base model's, else every modality all cases share.
        image_size: model input side for a model trained from scratch.
        arch_options: architecture overrides for small models (see :class:`SegmenterConfig`).
        options: epochs, time budget, batch size, learning rate, validation split, augmentation, seed.
        overwrite: replace an existing model folder.
        log: where progress lines go.
        crop_to_brain: a model trained from scratch sees the brain's bounding box, not the whole slice.
        resumable: write the whole training state to ``out_dir/checkpoint`` after every epoch, and continue
            from it when a previous run (same cohort, model and options) left one.
    """
    options = (options or TrainingOptions()).check()
    out_dir = Path(out_dir)
    _check_request(cohort, out_dir, arch, init, image_size, options, overwrite)  # before any work
    checkpoint_dir = out_dir / CHECKPOINT_FOLDER
    checkpoint = _load_checkpoint(checkpoint_dir) if resumable else None
    torch.manual_seed(options.seed)
    device = default_device()

    if init is not None:
        model = load_segmenter(init, device=device)
        config = model.config
        if modalities is not None and list(modalities) != list(config.modalities):
            raise SegLensError(f"the base model {init} takes {config.modalities}; cannot fine-tune on {list(modalities)}")
        init_info = {"init_model": str(init), "init_model_sha256": weights_sha256(init)}
        crop_to_brain = config.crop_to_brain
    else:
        config = None
        init_info = {}
    wanted = list(modalities or (config.modalities if config else cohort.modalities))
    if not wanted:
        raise SegLensError(f"the cases of cohort '{cohort.name}' share no modality")
    size = config.image_size if config else image_size

    log(f"Preparing {len(cohort)} case(s) of cohort '{cohort.name}' ({', '.join(wanted)}, {size}x{size})")
    # Missing sequences are tolerated when the model learns (or learnt) with modality dropout.
    allow_missing = options.modality_dropout > 0 or (config is not None and config.accepts_missing_modalities)
    prepared, scheme_name = _prepare_cohort(cohort, wanted, size, crop_to_brain, allow_missing, log)
    scheme = get_scheme(scheme_name)
    if config is None:
        config = SegmenterConfig(
            arch=arch or "unet",
            modalities=wanted,
            class_names=list(scheme.class_names),
            label_scheme=scheme.name,
            image_size=size,
            crop_to_brain=crop_to_brain,
            arch_options=dict(arch_options or {}),
        )
        model = build_segmenter(config).to(device)
    elif config.label_scheme != scheme.name:
        raise SegLensError(f"the base model segments {config.label_scheme} classes but cohort '{cohort.name}' has {scheme.name} labels")

    n_val = options.val_cases if options.val_cases is not None else (max(1, round(0.2 * len(prepared))) if len(prepared) >= 2 else 0)
    if n_val >= len(prepared):
        raise SegLensError(f"cohort '{cohort.name}' has {len(prepared)} case(s): too few to hold out {n_val} for validation")
    train_cases, val_cases = prepared[: len(prepared) - n_val], prepared[len(prepared) - n_val :]
    dataset = SliceDataset(train_cases)
    if len(dataset) == 0:
        raise SegLensError(f"the training cases of cohort '{cohort.name}' hold no brain slices")
    sampler, generator = _balanced_sampler(dataset, options)
    steps_per_epoch = math.ceil(sampler.num_samples / options.batch_size)

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    scheduler = None
    if options.epochs is not None or options.warmup_steps:
        total_steps = options.epochs * steps_per_epoch if options.epochs is not None else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_learning_rate_factor, options.warmup_steps, total_steps))

    history: list[dict] = []
    best_scores: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_metric = 0, -math.inf
    epoch = 0
    elapsed_before = 0.0
    # What decides the training trajectory (which weights are kept at the end does not).
    run_key = {"cohort": [c.case_id for c in cohort], "options": {k: v for k, v in asdict(options).items() if k != "keep"},
               "config": config.to_dict(), **init_info}  # fmt: skip
    if checkpoint is not None:
        best_state, saved = _resume(checkpoint, checkpoint_dir, run_key, model, optimizer, scheduler, generator)
        history, epoch = saved["history"], saved["epoch"]
        best_epoch, best_metric, best_scores = saved["best_epoch"], saved["best_metric"], saved["best_scores"]
        elapsed_before = saved["seconds"]
        log(f"Resuming from {checkpoint_dir} after epoch {epoch} (best so far: epoch {best_epoch})")

    log(
        f"Training {config.arch} on {len(train_cases)} case(s) ({len(dataset)} brain slices, {int(np.sum(dataset.foreground))} with labels), "
        f"validating on {len(val_cases)}; device {device.type}, {options.precision}"
    )
    start = time.monotonic() - elapsed_before
    deadline = start + 60 * options.minutes if options.minutes is not None else math.inf
    while (options.epochs is None or epoch < options.epochs) and time.monotonic() < deadline:
        epoch += 1
        losses = _train_epoch(model, dataset, sampler, generator, optimizer, scheduler, loss_fn, options, device, epoch, deadline)
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.monotonic() - start, 1)}
        if val_cases:
            scores = _validate(model, val_cases, options.batch_size)
            record["validation"] = scores
            metric = scores["dice_mean"]
        else:
            metric = -record["loss"]
        improved = metric > best_metric
        if improved:
            best_metric, best_epoch = metric, epoch
            best_scores = record.get("validation", {})
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(record)
        dice = record.get("validation", {})
        dice_text = "  ".join(f"{k[5:]} {v:.3f}" for k, v in dice.items() if k.startswith("dice_")) if dice else "no validation cases"
        remaining = ""
        if options.epochs is not None and epoch < options.epochs:
            eta = (record["seconds"] / epoch) * (options.epochs - epoch)
            remaining = f"  ~{eta / 60:.0f} min left"
        log(f"epoch {epoch:3d}  loss {record['loss']:.4f}  val Dice: {dice_text}{'  (best)' if improved else ''}  [{record['seconds'] / 60:.1f} min{remaining}]")
        if resumable:
            assert best_state is not None
            _write_checkpoint(checkpoint_dir, model, best_state, optimizer, scheduler, generator, {
                "run": run_key, "epoch": epoch, "history": history, "best_epoch": best_epoch, "best_metric": best_metric,
                "best_scores": best_scores, "seconds": record["seconds"],
            })  # fmt: skip

    assert best_state is not None
    if options.keep == "last":
        best_epoch, best_scores = epoch, history[-1].get("validation", {}) if history else {}
    else:
        model.load_state_dict(best_state)
    model.eval()
    model.config.training = {
        "cohort": cohort.name,
        "cases": [c.source.case_id for c in train_cases],
        "validation_cases": [c.source.case_id for c in val_cases],
        "epochs": epoch,
        "best_epoch": best_epoch,
        "best_validation": best_scores,
        "seconds": history[-1]["seconds"] if history else 0.0,
        "device": device.type,
        "options": asdict(options),
        **init_info,
    }
    model.save_pretrained(out_dir, overwrite=True)
    atomic_write_text(out_dir / "training_history.json", json.dumps(history, indent=2) + "\n", overwrite=True)
    log(f"Saved the {'last' if options.keep == 'last' else 'best'} model (epoch {best_epoch}) to {out_dir}")
    return TrainingResult(model=model, out_dir=out_dir, best_epoch=best_epoch, best_scores=best_scores, history=history)
