"""Interventions on SAE latents at the hook point (paper sections 5.3, 6 and 7).

An edit changes the codes ``z`` of some latents and writes the change back into the activations through the
decoder, keeping the SAE's reconstruction error:

    h' = h + W_dec^T (z' - z)

so an identity edit (scale 1, add 0) leaves ``h`` untouched to the last bit and the model's own mask comes back
exactly; only the edited latents' decoder rows are involved. Modes, for each selected latent ``k``:

- ``scale``: ``z_k <- alpha * z_k`` (multiplicative latent steering, MLS; alpha 0 ablates);
- ``add``: ``z_k <- z_k + alpha`` (additive latent steering, ALS), at the positions where the latent is active
  (``where="active"``, the default: the edit follows the feature) or at every encoded position
  (``where="everywhere"``: the feature is injected where it was absent);
- ``zero``: ``z_k <- 0`` (ablation);
- ``clamp``: ``z_k <- alpha``, where active or everywhere as for ``add``;
- ``swap``: ``z_k <- z^(B)_{pi(k)}``, the value of the aligned latent of a second SAE ``B`` on the same
  activations (feature swapping, section 5.3).

Edits apply inside a :class:`Region` (the whole volume, one axial slice, a slice range, or a voxel mask) and only
at encoded positions (feature-map positions that are mostly brain, as in extraction: the SAE never saw background
vectors). A mask region weighs each position by the fraction of its patch inside the mask, so its border is soft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SegLensError
from ..storage import MAX_AXIS, MAX_VOXELS
from ..sae.activations import feature_map_to_vectors, vectors_to_feature_map
from ..sae.model import SparseDictionary

from .modes import LABEL_RULES, MODES, REGION_KINDS, WHERE  # noqa: F401 (re-exported: the edit vocabulary)


@dataclass(frozen=True, eq=False)
class Region:
    """Where an edit applies.

    Slice indices are axial slices in RAS order (the order of a :class:`~SegLensLogic.data.PreparedCase`, the
    axis the model slices along); ``stop`` is exclusive. A mask is boolean on the input's voxel grid (file order).
    """

    kind: str = "volume"
    start: int | None = None
    stop: int | None = None
    mask: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def volume(cls) -> "Region":
        return cls("volume")

    @classmethod
    def slice(cls, index: int) -> "Region":
        return cls("slice", int(index), int(index) + 1)

    @classmethod
    def slices(cls, start: int, stop: int) -> "Region":
        return cls("slices", int(start), int(stop))

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "Region":
        return cls("mask", mask=np.asarray(mask, dtype=bool))

    def __post_init__(self):
        if self.kind not in REGION_KINDS:
            raise SegLensError(f"unknown region kind {self.kind!r}; use one of {', '.join(REGION_KINDS)}")
        if self.kind in ("slice", "slices"):
            for name in ("start", "stop"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise SegLensError(f"a {self.kind} region needs integer slice indices, got {name} {value!r}")
                object.__setattr__(self, name, int(value))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Region):
            return NotImplemented
        same_mask = (self.mask is None and other.mask is None) or (
            self.mask is not None and other.mask is not None and np.array_equal(self.mask, other.mask)
        )
        return (self.kind, self.start, self.stop) == (other.kind, other.start, other.stop) and same_mask

    def __hash__(self) -> int:
        return hash((self.kind, self.start, self.stop))

    def check(self, num_slices: int, input_shape: tuple[int, ...]) -> "Region":
        """Raise :class:`SegLensError` unless this region lies inside a volume of ``num_slices`` axial slices
        whose input grid has ``input_shape``; returns the region."""
        if self.kind not in REGION_KINDS:
            raise SegLensError(f"unknown region kind '{self.kind}'; use one of {', '.join(REGION_KINDS)}")
        if self.kind in ("slice", "slices"):
            if self.start is None or self.stop is None or not 0 <= self.start < self.stop <= num_slices:
                raise SegLensError(
                    f"region slices [{self.start}, {self.stop}) are outside the volume's {num_slices} axial slices (0..{num_slices - 1})"
                )
        if self.kind == "mask":
            if self.mask is None or tuple(self.mask.shape) != tuple(input_shape):
                shape = None if self.mask is None else tuple(self.mask.shape)
                raise SegLensError(f"region mask of shape {shape} is not on the case's voxel grid {tuple(input_shape)}")
            if not self.mask.any():
                raise SegLensError("region mask is empty")
        return self

    def slice_weights(self, slices: np.ndarray) -> np.ndarray | None:
        """1/0 per RAS axial slice in ``slices`` for slice regions; None when every slice is in."""
        if self.kind in ("slice", "slices"):
            return ((slices >= self.start) & (slices < self.stop)).astype(np.float32)
        return None

    # -- JSON (recipes) ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        if self.kind == "mask":
            flat = np.asarray(self.mask, dtype=bool).ravel()
            # Run-length code of the flattened (C order) mask: [start, length, start, length, ...].
            edges = np.flatnonzero(np.diff(np.concatenate([[0], flat.view(np.int8), [0]])))
            runs = np.stack([edges[0::2], edges[1::2] - edges[0::2]], axis=1).ravel()
            return {"kind": "mask", "shape": list(self.mask.shape), "runs": [int(v) for v in runs]}
        if self.kind == "volume":
            return {"kind": "volume"}
        return {"kind": self.kind, "start": self.start, "stop": self.stop}

    @classmethod
    def from_json(cls, data: dict, shape: tuple[int, ...] | None = None) -> "Region":
        """The region of its JSON form (:meth:`to_json`). A mask region is checked before its voxels are allocated:
        its ``shape`` (which must be ``shape``, the case's grid, when given) and its runs inside it.

        Raises:
            SegLensError: a malformed region.
        """
        if not isinstance(data, dict):
            raise SegLensError(f"a region must be a JSON object, got {data!r:.60}")
        kind = data.get("kind")
        if kind == "mask":
            mask_shape, runs = data.get("shape"), data.get("runs")
            if not isinstance(mask_shape, list) or len(mask_shape) != 3 or not all(type(v) is int and 1 <= v <= MAX_AXIS for v in mask_shape):
                raise SegLensError(f"a mask region needs a 'shape' of three voxel counts from 1 to {MAX_AXIS}, got {mask_shape!r:.60}")
            if shape is not None and tuple(mask_shape) != tuple(shape):
                raise SegLensError(f"region mask of shape {tuple(mask_shape)} is not on the case's voxel grid {tuple(shape)}")
            size = int(np.prod(mask_shape, dtype=np.int64))
            if size > MAX_VOXELS:
                raise SegLensError(f"a mask region of shape {tuple(mask_shape)} is larger than SegLens reads ({MAX_VOXELS} voxels)")
            if not isinstance(runs, list) or len(runs) % 2 or not all(type(v) is int for v in runs):
                raise SegLensError("a mask region needs 'runs': an even-length list of integers [start, length, ...]")
            pairs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
            if len(pairs) and ((pairs[:, 0] < 0).any() or (pairs[:, 1] < 1).any() or (pairs.sum(axis=1) > size).any()):
                raise SegLensError(f"a mask region's runs must lie inside its {size} voxels (start >= 0, length >= 1)")
            flat = np.zeros(size, dtype=bool)
            for start, length in pairs:
                flat[start : start + length] = True
            return cls.from_mask(flat.reshape(tuple(mask_shape)))
        if kind == "volume":
            return cls.volume()
        if kind in ("slice", "slices"):
            start, stop = data.get("start"), data.get("stop")
            if type(start) is not int or type(stop) is not int:
                raise SegLensError(f"a {kind} region needs integer 'start' and 'stop', got {start!r:.20} and {stop!r:.20}")
            return cls(kind, start, stop)
        raise SegLensError(f"unknown region kind {kind!r:.40}; use one of {', '.join(REGION_KINDS)}")


@dataclass(frozen=True, eq=False)
class LatentEdit:
    """One intervention: ``mode`` with strength ``alpha`` on ``latents`` inside ``region``.

    Attributes:
        latents: SAE latent ids.
        mode: one of :data:`MODES`.
        alpha: the factor (scale), the amount (add) or the value (clamp); unused by zero and swap.
        where: for add and clamp, ``"active"`` (positions where the latent fires) or ``"everywhere"``.
        region: where the edit applies.
        swap_sae: for swap, the second SAE whose aligned latents give the values.
        partners: for swap, the aligned latent of ``swap_sae`` for each of ``latents`` (same order).
        labels: the label rule of the step that applies this edit (:func:`apply_label_rule`): ``model`` (the edited
            model's own labels), or one that changes only the tumour's extent or only its composition.
    """

    latents: tuple[int, ...]
    mode: str = "scale"
    alpha: float = 1.0
    where: str = "active"
    region: Region = field(default_factory=Region.volume)
    swap_sae: SparseDictionary | None = field(default=None, repr=False)
    partners: tuple[int, ...] | None = None
    labels: str = "model"

    def __post_init__(self):
        latents = [int(j) for j in np.atleast_1d(self.latents)]
        # A latent named twice is edited once (the first time it is named, with its partner for swaps).
        keep = [i for i, j in enumerate(latents) if j not in latents[:i]]
        object.__setattr__(self, "latents", tuple(latents[i] for i in keep))
        if self.partners is not None:
            partners = [int(j) for j in np.atleast_1d(self.partners)]
            object.__setattr__(self, "partners", tuple(partners[i] for i in keep if i < len(partners)) if len(partners) == len(latents) else tuple(partners))
        object.__setattr__(self, "alpha", float(self.alpha))

    def __eq__(self, other) -> bool:
        if not isinstance(other, LatentEdit):
            return NotImplemented
        return (self.latents, self.mode, self.alpha, self.where, self.region, self.partners, self.labels) == (
            other.latents, other.mode, other.alpha, other.where, other.region, other.partners, other.labels
        ) and self.swap_sae is other.swap_sae  # fmt: skip

    def __hash__(self) -> int:
        return hash((self.latents, self.mode, self.alpha, self.where))

    def check(self, sae: SparseDictionary) -> "LatentEdit":
        """Raise :class:`SegLensError` for an edit ``sae`` cannot carry out; returns the edit."""
        if self.mode not in MODES:
            raise SegLensError(f"unknown steering mode '{self.mode}'; use one of {', '.join(MODES)}")
        if self.where not in WHERE:
            raise SegLensError(f"unknown 'where' {self.where!r}; use 'active' or 'everywhere'")
        if self.labels not in LABEL_RULES:
            raise SegLensError(f"unknown label rule {self.labels!r:.30}; use one of {', '.join(LABEL_RULES)}")
        if not self.latents:
            raise SegLensError("the edit selects no latent")
        check_latent_ids(self.latents, sae.d_sae)
        if not np.isfinite(self.alpha):
            raise SegLensError(f"alpha must be a finite number, got {self.alpha}")
        if self.mode == "swap":
            if self.swap_sae is None or self.partners is None:
                raise SegLensError("a swap edit needs the second SAE and the aligned partner of each latent")
            if len(self.partners) != len(self.latents):
                raise SegLensError(f"a swap edit has {len(self.latents)} latents but {len(self.partners)} partners")
            if self.swap_sae.config.d_in != sae.config.d_in:
                raise SegLensError(
                    f"cannot swap from an SAE on {self.swap_sae.config.d_in}-dimensional activations into one on {sae.config.d_in}"
                )
            check_latent_ids(self.partners, self.swap_sae.d_sae, what="partner latent")
        return self

    @property
    def is_identity(self) -> bool:
        """True for edits that change nothing by construction (scale 1, add 0)."""
        return (self.mode == "scale" and self.alpha == 1.0) or (self.mode == "add" and self.alpha == 0.0)


def apply_label_rule(rule: str, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Extent and composition apart: the labels an edit under ``rule`` leaves, from the labels ``before`` it and
    the edited model's labels ``after`` (same shape).

    - ``model``: ``after`` as it is;
    - ``extent``: tumour that stays tumour keeps its class from ``before`` (the edit moves the tumour's border,
      the model's own composition stays); voxels that become tumour take their class from ``after``;
    - ``grow``: as ``extent``, and no tumour is removed; ``shrink``: as ``extent``, and no tumour is added;
    - ``composition``: the tumour's extent stays as ``before``; inside it, the classes of ``after`` (where
      ``after`` says background, the class of ``before``).
    """
    if rule == "model":
        return after
    was, now = before > 0, after > 0
    if rule == "composition":
        out = before.copy()
        relabel = was & now
        out[relabel] = after[relabel]
        return out
    out = after.copy()
    out[was & now] = before[was & now]
    if rule == "grow":
        out[was & ~now] = before[was & ~now]
    elif rule == "shrink":
        out[~was & now] = 0
    return out


def step_rule(edits: Sequence[LatentEdit]) -> str:
    """The label rule of edits applied as one step: the one they share.

    Raises:
        SegLensError: edits of one step with different rules.
    """
    rules = {edit.labels for edit in edits}
    if len(rules) > 1:
        raise SegLensError(f"edits applied together must share one label rule, got {', '.join(sorted(rules))}")
    return rules.pop() if rules else "model"


def check_latent_ids(latents: Sequence[int], d_sae: int, what: str = "latent") -> tuple[int, ...]:
    """The ids as ints; :class:`SegLensError` when one is outside ``[0, d_sae)``."""
    ids = tuple(int(j) for j in latents)
    bad = [j for j in ids if not 0 <= j < d_sae]
    if bad:
        raise SegLensError(f"{what} id(s) {bad[:5]} out of range: this SAE has {d_sae} latents (0..{d_sae - 1})")
    return ids


def _edited(edit: LatentEdit, z: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """New values of ``edit.latents`` given their current values ``z`` ``(P, L)``."""
    if edit.mode == "scale":
        return z * edit.alpha
    if edit.mode == "zero":
        return torch.zeros_like(z)
    if edit.mode == "add":
        return z + edit.alpha if edit.where == "everywhere" else z + edit.alpha * (z > 0)
    if edit.mode == "clamp":
        return torch.full_like(z, edit.alpha) if edit.where == "everywhere" else torch.where(z > 0, edit.alpha, z)
    if edit.mode == "swap":
        return edit.swap_sae.latent_codes(vectors, edit.partners).to(z.dtype)
    raise SegLensError(f"unknown steering mode '{edit.mode}'")


@torch.no_grad()
def steering_delta(
    sae: SparseDictionary,
    activations: torch.Tensor,
    edits: Sequence[LatentEdit],
    weights: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The change ``W_dec^T (z' - z)`` that ``edits`` make to hook activations, as a feature map.

    Args:
        sae: the SAE at the hook point.
        activations: ``(N, D, h, w)``.
        edits: applied in order; each sees the values the previous ones left.
        weights: per edit, ``(N, h, w)`` in [0, 1]: how much the edit applies at each position (its region times
            the encoded positions); None applies it everywhere.

    Returns:
        ``(N, D, h, w)``, exactly zero wherever no edit changes a code.
    """
    n, d, *spatial = activations.shape
    vectors = feature_map_to_vectors(activations)
    latents = sorted({j for edit in edits for j in edit.latents})
    if not latents:
        return torch.zeros_like(activations)
    column = {j: i for i, j in enumerate(latents)}
    z = sae.latent_codes(vectors, latents)
    z_new = z.clone()
    for number, edit in enumerate(edits):
        cols = torch.as_tensor([column[j] for j in edit.latents], dtype=torch.long, device=z.device)
        current = z_new.index_select(1, cols)
        change = _edited(edit, current, vectors) - current
        w = None if weights is None else weights[number]
        if w is not None:
            change = change * w.reshape(-1, 1).to(change.dtype)
        z_new.index_add_(1, cols, change)
    delta = sae.decode_change(z_new - z, latents)
    return vectors_to_feature_map(delta.to(activations.dtype), n, tuple(spatial))


def steer_activations(
    sae: SparseDictionary,
    activations: torch.Tensor,
    edits: Sequence[LatentEdit],
    weights: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``h' = h + W_dec^T (z' - z)`` for hook activations ``h`` ``(N, D, h, w)``; see :func:`steering_delta`.

    The SAE's reconstruction error stays in ``h'``: with identity edits ``h'`` equals ``h`` exactly.
    """
    return activations + steering_delta(sae, activations, edits, weights)
