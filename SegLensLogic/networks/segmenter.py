"""The segmenter interface shared by SegFormer and U-Net: a 2D model on axial slices with named hook points.

A segmenter is split at a *hook point* into ``encode`` (input slices -> activations at the hook, plus the earlier
feature maps the rest of the network still reads) and ``decode`` (those -> logits). ``forward`` is the two in a
row, so capturing activations costs nothing extra, and steering (editing the activations at the hook and
re-running only what follows) uses the very same code path.

A segmenter is stored as a folder: ``config.json`` (a :class:`SegmenterConfig`) plus ``model.safetensors``.
Loading never unpickles anything.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import InputFileError
from .architectures import ARCHITECTURE_MODULES
from ..storage import (
    Schema,
    check_document,
    check_tensor_shapes,
    file_sha256,
    load_safetensors,
    one_line,
    read_json,
    safetensors_shapes,
    weights_folder_files,
    write_weights_folder,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def default_device() -> torch.device:
    """CUDA when PyTorch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class SegmenterConfig:
    """Everything needed to rebuild a segmenter and feed it the right inputs.

    Attributes:
        arch: ``"segformer-b0"`` ... ``"segformer-b5"`` or ``"unet"``.
        modalities: input channels in order (BraTS 2023 names: t1n, t1c, t2w, t2f).
        class_names: output classes, index 0 background.
        label_scheme: the SegLens label scheme of the outputs (``brats2023`` or ``aseg``).
        image_size: side of the square model input in pixels.
        crop_to_brain: the model sees each slice's brain bounding box (plus a margin) at ``image_size``, not the
            whole slice (more pixels on the brain for the same cost); False for models saved before it existed.
        hook_point: the default hook point (a mid-encoder stage unless set).
        arch_options: architecture overrides (SegFormer config fields; U-Net ``features``), for small test models.
        training: provenance written by training (cohort, epochs, validation Dice, base model hash).
    """

    arch: str
    modalities: list[str]
    class_names: list[str]
    label_scheme: str = "brats2023"
    image_size: int = 256
    crop_to_brain: bool = False
    hook_point: str | None = None
    arch_options: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def accepts_missing_modalities(self) -> bool:
        """Trained with modality dropout, so a case lacking some inputs is segmented with them set to 0."""
        return float(self.training.get("options", {}).get("modality_dropout", 0.0) or 0.0) > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "<config>") -> "SegmenterConfig":
        """A config from its JSON form, checked against :class:`SegmenterConfigSchema` (keys, types, sizes, known
        modalities and label scheme) before anything is built from it.

        Raises:
            InputFileError: naming ``source`` and the field.
        """
        if not isinstance(data, dict):
            raise InputFileError(source, "is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputFileError(source, f"unknown config field(s) {unknown}")
        missing = [name for name in ("arch", "modalities", "class_names") if name not in data]
        if missing:
            raise InputFileError(source, f"missing config field(s) {missing}")
        check_document(data, source, None, FORMAT_VERSION, SegmenterConfigSchema, "model config", default_version=FORMAT_VERSION)
        return cls(**copy.deepcopy(data))


class TrainingRecord(Schema):
    """The parts of a model's training provenance that SegLens reads back (the rest is kept as written)."""

    cohort: str | None = None
    init_model_sha256: str | None = None
    options: dict[str, Any] | None = None

    @field_validator("options")
    @classmethod
    def _dropout(cls, options):
        dropout = (options or {}).get("modality_dropout")
        if dropout is not None and (type(dropout) not in (int, float) or not 0 <= dropout <= 1):
            raise ValueError(f"options.modality_dropout must be a number from 0 to 1, got {dropout!r}")
        return options


class SegmenterConfigSchema(Schema):
    """``config.json`` of a model folder (see :class:`SegmenterConfig`): sizes are bounded here, and the weights'
    shapes are compared with the model this describes before any weight is allocated
    (:meth:`Segmenter.from_pretrained`)."""

    arch: str = Field(min_length=1, max_length=64)
    modalities: list[Literal["t1n", "t1c", "t2w", "t2f"]] = Field(min_length=1, max_length=4)
    class_names: list[str] = Field(min_length=2, max_length=256)
    label_scheme: Literal["brats2023", "brats2018", "brats2013", "aseg"] = "brats2023"
    image_size: int = Field(default=256, ge=32, le=2048)
    crop_to_brain: bool = False
    hook_point: str | None = Field(default=None, max_length=64)
    arch_options: dict[str, Any] = Field(default_factory=dict)
    training: TrainingRecord = Field(default_factory=TrainingRecord)
    format_version: int = FORMAT_VERSION

    @field_validator("modalities")
    @classmethod
    def _distinct(cls, modalities):
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"'modalities' must be distinct, got {modalities}")
        return modalities


class Segmenter(nn.Module):
    """Base class: a 2D segmenter split at named hook points.

    Subclasses define :attr:`hook_names` (encoder stages in forward order), :meth:`encode` and :meth:`decode`.
    Inputs are ``(N, C, S, S)`` float32 slices; logits are ``(N, K, S, S)``.
    """

    hook_names: tuple[str, ...] = ()
    default_hook: str = ""
    # Architecture names (``SegmenterConfig.arch``) a subclass builds; subclasses register themselves.
    architectures: tuple[str, ...] = ()
    registry: dict[str, type["Segmenter"]] = {}
    size_multiple: int = 32
    # Slices per forward pass on the CPU (see inference.default_batch_size).
    cpu_batch_size: int = 4

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for arch in cls.architectures:
            Segmenter.registry[arch] = cls

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        if config.image_size % self.size_multiple:
            raise ValueError(f"image_size {config.image_size} must be a multiple of {self.size_multiple} for {config.arch}")
        self.config = config
        if config.hook_point is None:
            config.hook_point = self.default_hook
        self._check_hook(config.hook_point)
        self._hook_shapes: dict[str, tuple[int, int, int]] | None = None

    # -- the split forward pass -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, hook: str | None = None, with_cache: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the network up to ``hook``.

        Returns:
            ``(activations, cache)``: the hook's feature map ``(N, D, h, w)`` and what :meth:`decode` reads of the
            earlier layers (SegFormer's earlier stages for its multi-scale head; the U-Net's skip connections, as
            their terms of the decoder's convolutions). ``with_cache=False`` returns an empty cache and computes
            nothing for it: for callers that only want the activations.
        """
        raise NotImplementedError

    def decode(self, activations: torch.Tensor, cache: list[torch.Tensor], hook: str | None = None) -> torch.Tensor:
        """Run the rest of the network from the hook's (possibly edited) activations to logits ``(N, K, S, S)``."""
        raise NotImplementedError

    def encode_cache(self, x: torch.Tensor, hook: str | None = None, count: int | None = None) -> list[torch.Tensor]:
        """The first ``count`` entries (finest first) of ``encode(x, hook)``'s cache, the same bits, running only
        the layers they need: a cache that keeps only the coarser entries recomputes the finest ones from the input."""
        return self.encode(x, hook)[1][:count]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activations, cache = self.encode(x)
        return self.decode(activations, cache)

    def capture(self, x: torch.Tensor, hook: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass that also returns the activations at ``hook``: ``(logits, activations)``."""
        activations, cache = self.encode(x, hook)
        return self.decode(activations, cache, hook), activations

    # -- hook points ------------------------------------------------------------------------------------
    def _check_hook(self, hook: str) -> str:
        if hook not in self.hook_names:
            raise ValueError(f"unknown hook point '{hook}' for {self.config.arch}; choose one of {', '.join(self.hook_names)}")
        return hook

    def _hook(self, hook: str | None) -> str:
        return self._check_hook(hook or self.config.hook_point or self.default_hook)

    @torch.no_grad()
    def hook_points(self) -> dict[str, tuple[int, int, int]]:
        """Named hook points and their feature-map shapes ``(channels, height, width)`` at the model size."""
        if self._hook_shapes is None:
            device = next(self.parameters()).device
            x = torch.zeros(1, self.config.in_channels, self.config.image_size, self.config.image_size, device=device)
            was_training = self.training
            self.eval()
            shapes = {}
            for name in self.hook_names:
                activations, _ = self.encode(x, name, with_cache=False)
                shapes[name] = tuple(int(s) for s in activations.shape[1:])
            self.train(was_training)
            self._hook_shapes = shapes
        return dict(self._hook_shapes)

    # -- storage ----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (each atomically)."""
        return write_weights_folder(
            folder, CONFIG_NAME, self.config.to_dict(), WEIGHTS_NAME, self.state_dict(),
            metadata={"format": "pt", "arch": self.config.arch}, overwrite=overwrite,
        )  # fmt: skip

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None, sha256: str | None = None) -> "Segmenter":
        """Load a segmenter folder written by :meth:`save_pretrained`, on ``device`` (default: GPU if any).

        ``sha256``: the weights' hash when the caller has just verified it (a bundle), so it is not computed again.

        Raises:
            InputFileError: the folder, its config or its weights are missing, malformed or do not match.
        """
        folder = Path(folder)
        config_path, weights_path = weights_folder_files(folder, CONFIG_NAME, WEIGHTS_NAME, "a model")
        config = SegmenterConfig.from_dict(read_json(config_path), config_path)
        found = safetensors_shapes(weights_path)
        # The model the config describes is built on the meta device first (no memory): its weights' shapes are
        # compared with the file's header before a model of the config's sizes is allocated.
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. zero-element tensors of a degenerate config (refused below)
                skeleton = build_segmenter(copy.deepcopy(config))
        except Exception as exc:  # noqa: BLE001 (arch_options reach third-party constructors: any error is the config's)
            raise InputFileError(config_path, f"does not describe a valid model ({one_line(exc)})") from None
        expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        check_tensor_shapes(weights_path, expected, found, CONFIG_NAME)
        state = load_safetensors(weights_path)
        if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
            raise InputFileError(weights_path, "holds NaN or Inf weights")
        model = build_segmenter(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()
            detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
            raise InputFileError(weights_path, f"weights do not match {config_path.name} ({detail})") from None
        model.eval()
        # Recipes, labels files and alignments name a model by this hash.
        model.weights_sha256 = sha256 or weights_sha256(folder)
        return model.to(device or default_device())


def segmenter_class(arch: str) -> type[Segmenter] | None:
    """The Segmenter subclass that builds ``arch`` (its module imported on first use), or None for an unknown name."""
    if arch not in Segmenter.registry and arch in ARCHITECTURE_MODULES:
        importlib.import_module(f"{__package__}.{ARCHITECTURE_MODULES[arch]}")
    return Segmenter.registry.get(arch)


def build_segmenter(config: SegmenterConfig) -> Segmenter:
    """A freshly initialised segmenter for ``config`` (no pretrained weights exist here: we train from scratch)."""
    cls = segmenter_class(config.arch)
    if cls is None:
        raise ValueError(f"unknown architecture '{config.arch}'; choose one of {', '.join(ARCHITECTURE_MODULES)}")
    return cls(config)


def weights_sha256(folder: str | Path) -> str:
    """Content hash of a model folder's weights file (identifies a model in recipes and provenance)."""
    return file_sha256(Path(folder) / WEIGHTS_NAME)
