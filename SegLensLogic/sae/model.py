"""The BatchTopK sparse autoencoder (Bussmann et al. 2024) of Med-SegLens section 3.4.

``Z = BatchTopK(X W_enc + b_enc)``, ``X^ = Z W_dec + b_dec``: over a batch of ``n`` activation vectors the
``n * k`` largest pre-activations are kept (so a vector gets k latents on average, more where it is complex).
Decoder rows have unit norm. At inference one global threshold ``theta`` replaces the batch-dependent top-k
(a JumpReLU with a single scalar), so a single case encodes the same way whatever else is in the batch.

An SAE is stored as a folder: ``sae_config.json`` (:class:`SAEConfig`) plus ``sae.safetensors``. The dataset
normalisation scalar is folded into the weights at save time, so a loaded SAE takes raw activations.

Shapes: activations ``(n, d_in)``; codes ``(n, d_sae)`` dense or ``(indices, values)`` sparse.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import InputFileError, SegLensError
from ..storage import (
    MAX_CHANNELS,
    MAX_LATENTS,
    Schema,
    check_document,
    check_tensor_shapes,
    file_sha256,
    load_safetensors,
    read_json,
    safetensors_shapes,
    weights_folder_files,
    write_weights_folder,
)

SAE_CONFIG_NAME = "sae_config.json"
SAE_WEIGHTS_NAME = "sae.safetensors"
SAE_FORMAT_VERSION = 1
# A feature-map position is encoded when at least half of its patch is brain (extraction, encoding, steering).
DEFAULT_MIN_BRAIN_FRACTION = 0.5


@dataclass
class SAEConfig:
    """Sizes and provenance of a sparse autoencoder.

    Attributes:
        d_in: activation channels at the hook point.
        expansion: dictionary size over ``d_in`` (paper: 16).
        k: mean active latents per vector (paper: 32).
        threshold: inference threshold on pre-activations (raw activation units once saved); None until
            estimated.
        hook_point: the segmenter hook point the activations came from.
        model_sha256: hash of the segmenter's weights the SAE was trained on.
        min_brain_fraction: the SAE encodes a feature-map position only when at least this share of its patch is
            brain (the rule its training vectors were extracted by; SAE folders written before it was stored have
            :data:`DEFAULT_MIN_BRAIN_FRACTION`).
        training: provenance and final metrics written by training.
    """

    d_in: int
    expansion: int = 16
    k: int = 32
    threshold: float | None = None
    hook_point: str | None = None
    model_sha256: str | None = None
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = SAE_FORMAT_VERSION

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "<config>") -> "SAEConfig":
        """A config from its JSON form, checked against :class:`SAEConfigSchema` before anything is allocated.

        Raises:
            InputFileError: naming ``source`` and the problem.
        """
        if not isinstance(data, dict):
            raise InputFileError(source, "is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - known):
            raise InputFileError(source, f"unknown SAE config field(s) {unknown}")
        if "d_in" not in data:
            raise InputFileError(source, "missing SAE config field 'd_in'")
        for name, limit in (("d_in", MAX_CHANNELS), ("expansion", 1 << 10), ("k", 1 << 12)):
            value = data.get(name, 1)
            if type(value) is not int or not 1 <= value <= limit:
                raise InputFileError(source, f"'{name}' must be a positive integer (at most {limit}), got {value!r}")
        check_document(data, source, None, SAE_FORMAT_VERSION, SAEConfigSchema, "SAE config", default_version=SAE_FORMAT_VERSION)
        return cls(**copy.deepcopy(data))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of this SAE's weights file (compared with the file's header before loading)."""
        d_in, d_sae = self.d_in, self.d_sae
        return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "norm_scale": (), "threshold": ()}


class SAEConfigSchema(Schema):
    """``sae_config.json`` (see :class:`SAEConfig`): sizes bounded (``d_in x expansion`` latents at most
    :data:`~SegLensLogic.storage.MAX_LATENTS`, ``k`` within the dictionary), a finite threshold or null."""

    d_in: int = Field(ge=1, le=MAX_CHANNELS)
    expansion: int = Field(default=16, ge=1, le=1 << 10)
    k: int = Field(default=32, ge=1, le=1 << 12)
    threshold: float | None = None
    hook_point: str | None = Field(default=None, max_length=64)
    model_sha256: str | None = Field(default=None, max_length=128)
    min_brain_fraction: float = Field(default=DEFAULT_MIN_BRAIN_FRACTION, ge=0.0, le=1.0)
    training: dict[str, Any] = Field(default_factory=dict)
    format_version: int = SAE_FORMAT_VERSION

    @model_validator(mode="after")
    def _sizes(self):
        d_sae = self.d_in * self.expansion
        if d_sae > MAX_LATENTS:  # checked before any weight is allocated
            raise ValueError(f"d_in x expansion = {d_sae} latents is more than SegLens loads ({MAX_LATENTS:,})")
        if self.k > d_sae:
            raise ValueError(f"'k' ({self.k}) is larger than the dictionary ({d_sae} latents)")
        return self


class NoThresholdError(SegLensError, RuntimeError):
    """An SAE without an inference threshold was asked to encode (it can only reconstruct batches)."""

    def __init__(self, sae: "BatchTopKSAE"):
        source = getattr(sae, "source", None)
        where = f"{Path(source) / SAE_CONFIG_NAME}: " if source is not None else "this "
        super().__init__(f"{where}SAE has no inference threshold, so it cannot encode single cases "
                         "(train it with seglens train-sae, which sets one; or estimate it with estimate_threshold())")  # fmt: skip


@runtime_checkable
class SparseDictionary(Protocol):
    """What steering and model diffing read of an SAE: its config (hook point, the brain-fraction rule), the codes
    of chosen latents, the activation change a change of codes makes, and its latent vectors. :class:`BatchTopKSAE`
    is one; nothing outside :mod:`SegLensLogic.sae` reads its weights."""

    config: SAEConfig

    @property
    def d_sae(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def encode(self, x: torch.Tensor, use_threshold: bool = True) -> torch.Tensor: ...

    def latent_codes(self, x: torch.Tensor, latents) -> torch.Tensor: ...

    def decode_change(self, change: torch.Tensor, latents) -> torch.Tensor: ...

    def latent_directions(self) -> dict[str, torch.Tensor]: ...

    def inference_threshold(self) -> float: ...

    def check_fits(self, model, hook: str | None = None) -> str: ...

    def to(self, device) -> "SparseDictionary": ...


class BatchTopKSAE(nn.Module):
    """BatchTopK sparse autoencoder on activation vectors of dimension ``d_in``.

    Parameters: ``W_enc (d_in, d_sae)``, ``b_enc (d_sae,)``, ``W_dec (d_sae, d_in)`` with unit-norm rows,
    ``b_dec (d_in,)``. ``norm_scale`` (a buffer) multiplies inputs during training; it is 1 after saving.
    """

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        self.source: Path | None = None  # the folder it was loaded from, named in errors
        d_in, d_sae = config.d_in, config.d_sae
        w = torch.empty(d_in, d_sae)
        nn.init.kaiming_uniform_(w.t(), a=5**0.5)
        self.W_enc = nn.Parameter(w)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        # Decoder starts as the encoder's transpose, rows of unit norm (Bussmann et al. reference code).
        self.W_dec = nn.Parameter(F.normalize(w.t().clone(), dim=1))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.ones(()))
        threshold = config.threshold if config.threshold is not None else float("nan")
        # float32 on purpose: the threshold decides which latents exist, keep it out of any reduced precision.
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    # -- encoding ---------------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x * norm_scale @ W_enc + b_enc)``, shape ``(n, d_sae)``."""
        return F.relu((x * self.norm_scale) @ self.W_enc + self.b_enc)

    def active(self, pre: torch.Tensor) -> torch.Tensor:
        """The encoding rule: which ReLU pre-activations (any shape) are codes, those above the inference
        threshold (boolean, same shape). Every encoding path of SegLens decides by it."""
        return pre > self.inference_threshold()

    def encode(self, x: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        """Dense codes ``(n, d_sae)``: the inference threshold (default), or BatchTopK over this batch."""
        if use_threshold:
            pre = self.pre_activations(x)
            return pre * self.active(pre)
        from .batch_topk import batch_topk  # training-time selection, kept out of the inference path

        rows, latents, values = batch_topk(self, x)
        codes = torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=x.device)
        codes[rows, latents] = values
        return codes

    def encode_sparse(self, x: torch.Tensor, max_active: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Thresholded codes as fixed-width sparse rows: ``(indices, values)``, each ``(n, max_active)``.

        ``max_active`` (default ``4 * k``) caps the latents kept per vector, largest first; unused slots hold
        value 0 (index 0). With the threshold set so that the mean is ``k``, vectors rarely reach the cap.
        """
        pre = self.pre_activations(x)
        width = min(max_active or 4 * self.config.k, self.d_sae)
        top = torch.topk(pre, width, dim=1)
        values = top.values * self.active(top.values)
        indices = torch.where(values > 0, top.indices, torch.zeros_like(top.indices))
        return indices, values

    def check_fits(self, model, hook: str | None = None) -> str:
        """The hook point this SAE reads in ``model`` (``hook``, else the SAE's, else the model's default), after
        checking that the model has it with ``d_in`` channels; returns its name.

        Raises:
            InputFileError: naming the SAE's config (when the SAE was loaded from a folder), else SegLensError.
        """
        hook = hook or self.config.hook_point or model.config.hook_point
        shapes = model.hook_points()
        if hook not in shapes:
            problem = f"the SAE was trained at hook point '{hook}', which model {model.config.arch} does not have ({', '.join(shapes)})"
        elif shapes[hook][0] != self.config.d_in:
            problem = f"the SAE takes {self.config.d_in}-dimensional activations but hook point '{hook}' of the model has {shapes[hook][0]} channels"
        else:
            return hook
        if self.source is not None:
            raise InputFileError(Path(self.source) / SAE_CONFIG_NAME, problem)
        raise SegLensError(problem)

    def inference_threshold(self) -> float:
        """The threshold a pre-activation must exceed to count as a code (raw activation units).

        Raises:
            NoThresholdError: the SAE has none yet (not estimated), naming its folder.
        """
        theta = float(self.threshold)
        if theta != theta:  # NaN: not estimated
            raise NoThresholdError(self)
        return theta

    def latent_codes(self, x: torch.Tensor, latents) -> torch.Tensor:
        """Codes of some latents: ``(n, len(latents))`` for vectors ``(n, d_in)`` in input units.

        The encoding rule (a code is the ReLU pre-activation kept where it exceeds the inference threshold), from
        those latents' encoder columns only: the same numbers as those columns of ``encode(x)``.
        """
        index = torch.as_tensor(list(latents), dtype=torch.long, device=x.device)
        pre = torch.relu((x * self.norm_scale) @ self.W_enc.index_select(1, index) + self.b_enc.index_select(0, index))
        return pre * self.active(pre)

    # -- decoding ---------------------------------------------------------------------------------------
    def decode_change(self, change: torch.Tensor, latents) -> torch.Tensor:
        """``(n, d_in)``: how the reconstruction of ``n`` vectors moves when the codes of ``latents`` change by
        ``change`` ``(n, len(latents))``, in input units (``change @ W_dec[latents]``). A steering edit adds
        exactly this to the activations."""
        index = torch.as_tensor(list(latents), dtype=torch.long, device=change.device)
        return (change @ self.W_dec.index_select(0, index)) / self.norm_scale

    def latent_directions(self) -> dict[str, torch.Tensor]:
        """Every latent's encoder and decoder vector in activation space: ``{"enc": W_enc^T, "dec": W_dec}``,
        each ``(d_sae, d_in)`` (what model diffing compares)."""
        return {"enc": self.W_enc.detach().t(), "dec": self.W_dec.detach()}

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Dense codes ``(n, d_sae)`` -> reconstructions ``(n, d_in)`` in input units."""
        return (codes @ self.W_dec + self.b_dec) / self.norm_scale

    def decode_sparse(self, rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
        """Sparse codes -> ``(n, d_in)``: ``n*k*d`` work (an ``embedding_bag``-style gather-scatter)."""
        contrib = values[:, None] * self.W_dec.index_select(0, latents)
        out = torch.zeros(n, self.config.d_in, dtype=contrib.dtype, device=contrib.device).index_add(0, rows, contrib)
        return (out + self.b_dec) / self.norm_scale

    def forward(self, x: torch.Tensor, use_threshold: bool = False) -> torch.Tensor:
        """Reconstruction of ``x`` (BatchTopK by default, as in training; the threshold when asked)."""
        if use_threshold:
            return self.decode(self.encode(x, use_threshold=True))
        from .batch_topk import batch_topk

        rows, latents, values = batch_topk(self, x)
        return self.decode_sparse(rows, latents, values, x.shape[0])

    # -- constraints ------------------------------------------------------------------------------------
    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale decoder rows to unit norm (during training, while ``norm_scale`` is not folded in)."""
        self.W_dec.data = F.normalize(self.W_dec.data, dim=1)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the component of each decoder row's gradient along the row (it would only change its norm)."""
        if self.W_dec.grad is not None:
            w = self.W_dec.data
            # Divide by |w|^2 so that rows of any norm (a loaded SAE has rows of norm 1/norm_scale) are handled.
            along = (self.W_dec.grad * w).sum(dim=1, keepdim=True) / (w * w).sum(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec.grad -= along * w

    # -- storage ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_normalisation(self) -> None:
        """Fold ``norm_scale`` into the weights (then ``norm_scale`` is 1); the SAE computes the same function.

        With ``s = norm_scale``: ``pre = s x W_enc + b_enc`` is unchanged by ``W_enc <- s W_enc``; the decoder
        output ``(z W_dec + b_dec) / s`` is unchanged by ``W_dec <- W_dec / s``, ``b_dec <- b_dec / s`` (rows then have
        norm ``1/s``, and latent values keep their training units, hence so does the threshold).
        """
        s = self.norm_scale.clone()
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.norm_scale.fill_(1.0)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``sae_config.json`` and ``sae.safetensors`` into ``folder`` (normalisation folded in)."""
        # Fold in place, so that this SAE and the stored one are the same numbers (exact round trip).
        self.fold_normalisation()
        self.config.threshold = None if torch.isnan(self.threshold) else float(self.threshold)
        write_weights_folder(
            folder, SAE_CONFIG_NAME, self.config.to_dict(), SAE_WEIGHTS_NAME, self.state_dict(),
            metadata={"format": "pt", "kind": "BatchTopKSAE"}, overwrite=overwrite,
        )  # fmt: skip
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device | None = None, sha256: str | None = None) -> "BatchTopKSAE":
        """Load an SAE folder written by :meth:`save` (no unpickling); ``sha256``: the weights' hash when the caller
        has just verified it (a bundle), so it is not computed again.

        Raises:
            InputFileError: missing or malformed config or weights, or weights that do not fit the config.
        """
        folder = Path(folder)
        config_path, weights_path = weights_folder_files(folder, SAE_CONFIG_NAME, SAE_WEIGHTS_NAME, "an SAE")
        config = SAEConfig.from_dict(read_json(config_path), config_path)
        # Shapes from the header first: a config's sizes are never allocated unless the weights file holds them.
        check_tensor_shapes(weights_path, config.expected_shapes(), safetensors_shapes(weights_path),
                            f"{SAE_CONFIG_NAME} (d_in {config.d_in}, d_sae {config.d_sae})")  # fmt: skip
        state = load_safetensors(weights_path)
        sae = cls(config)
        sae.load_state_dict(state)
        if not all(torch.isfinite(state[name]).all() for name in ("W_enc", "b_enc", "W_dec", "b_dec", "norm_scale")):
            raise InputFileError(weights_path, "holds NaN or Inf weights")
        if config.threshold is not None and not torch.isclose(sae.threshold, torch.tensor(float(config.threshold))):
            raise InputFileError(weights_path, f"threshold {float(sae.threshold)} disagrees with {SAE_CONFIG_NAME} ({config.threshold})")
        if config.threshold is None and not torch.isnan(sae.threshold):
            raise InputFileError(weights_path, f"holds threshold {float(sae.threshold)} but {SAE_CONFIG_NAME} has none (null)")
        sae.source = folder
        # Recipes, labels files and alignments name an SAE by this hash.
        sae.weights_sha256 = sha256 or sae_sha256(folder)
        return sae.to(device or "cpu").eval()


def sae_sha256(folder: str | Path) -> str:
    """Content hash of an SAE folder's weights file (identifies an SAE in recipes, labels files and alignments)."""
    return file_sha256(Path(folder) / SAE_WEIGHTS_NAME)
