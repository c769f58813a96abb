"""Which activation space two SAEs live in, and aligning SAEs of *different* spaces.

Cosines between dictionary vectors compare directions of one activation space. They are meaningful when:

(a) the SAEs were trained on one model's activations (``same-model``; e.g. cohorts run through one model), or
(b) on models fine-tuned from one base model (``shared-init``; the paper's setting: the models stay close to
    their common initialisation, so their channels keep their meaning).

Otherwise (``unrelated`` models: independently trained, or SegFormer against U-Net with other channel counts)
the bases differ and cosines mean nothing. Two alignments work there, both on the *same images* run through
both models (activations paired position by position on a common feature grid):

- :func:`correlation_alignment`: correlation of the two SAEs' latent activations over the paired positions,
  matched with the Hungarian algorithm (method ``activation-correlation``; one similarity, ``corr``);
- :func:`procrustes_alignment`: an orthogonal map between the activation spaces fitted on the paired
  activations (``scipy.linalg.orthogonal_procrustes``; the smaller space zero-padded, so the map is an isometry of
  it into the larger one), then the paper's encoder+decoder cosine rule in B's space (method
  ``procrustes-decoder-encoder-cosine``).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import orthogonal_procrustes

from ..storage import read_json
from ..errors import InputFileError
from ..sae.activations import brain_fraction_on_grid, feature_map_to_vectors, vectors_to_feature_map
from ..sae.model import DEFAULT_MIN_BRAIN_FRACTION
from .latent_alignment import LatentAlignment, align_similarities, align_vectors, dictionary_vectors

SHARED_RELATIONS = ("same-model", "shared-init")


def _model_provenance(folder: str | Path) -> tuple[str, dict]:
    from ..networks.segmenter import CONFIG_NAME, SegmenterConfig, weights_sha256

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise InputFileError(folder, f"not a model folder (no {CONFIG_NAME})")
    config = SegmenterConfig.from_dict(read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
    return weights_sha256(folder), dict(config.training or {})


def space_relation(sae_a, sae_b, model_a: str | Path | None = None, model_b: str | Path | None = None) -> dict:
    """How the activation spaces of two SAEs relate: ``{"relation", "shared_space", "detail"}``.

    ``relation`` is ``same-model``, ``shared-init``, ``unrelated``, ``different-dimensions``,
    ``different-hook-points`` or ``unknown``; ``shared_space`` is True, False or None (unknown). Model folders,
    when given, are checked against the hash each SAE recorded and their training provenance
    (``config.training["init_model_sha256"]``) decides ``shared-init``.

    Raises:
        InputFileError: a model folder is not the model its SAE was trained on.
    """
    ca, cb = sae_a.config, sae_b.config
    if ca.d_in != cb.d_in:
        return {"relation": "different-dimensions", "shared_space": False,
                "detail": f"the SAEs take {ca.d_in}- and {cb.d_in}-dimensional activations"}  # fmt: skip
    if ca.hook_point and cb.hook_point and ca.hook_point != cb.hook_point:
        return {"relation": "different-hook-points", "shared_space": False,
                "detail": f"the SAEs were trained at hook points '{ca.hook_point}' and '{cb.hook_point}'"}  # fmt: skip
    sha_a, sha_b = ca.model_sha256, cb.model_sha256
    init_a = init_b = None
    for side, folder, sae_sha in (("A", model_a, sha_a), ("B", model_b, sha_b)):
        if folder is None:
            continue
        sha, training = _model_provenance(folder)
        if sae_sha and sha != sae_sha:
            raise InputFileError(folder, f"is not the model SAE {side} was trained on (weights {sha[:12]}..., the SAE records {sae_sha[:12]}...)")
        if side == "A":
            sha_a, init_a = sha, training.get("init_model_sha256")
        else:
            sha_b, init_b = sha, training.get("init_model_sha256")
    if sha_a and sha_a == sha_b:
        return {"relation": "same-model", "shared_space": True, "detail": f"both SAEs were trained on model {sha_a[:12]}..."}
    if model_a is not None and model_b is not None:
        base = {init_a, init_b} - {None}
        if (init_a and init_a == init_b) or (init_a and init_a == sha_b) or (init_b and init_b == sha_a):
            return {"relation": "shared-init", "shared_space": True,
                    "detail": f"the models were fine-tuned from one base model ({next(iter(base))[:12]}...)"}  # fmt: skip
        return {"relation": "unrelated", "shared_space": False,
                "detail": "the models share no initialisation: their channels need not mean the same; align by activations"}  # fmt: skip
    return {"relation": "unknown", "shared_space": None,
            "detail": "the SAEs come from different or unrecorded models; give the model folders to check that they were "
                      "fine-tuned from one base model (cosine alignment assumes they were)"}  # fmt: skip


# -- paired activations ------------------------------------------------------------------------------------
def paired_activations(
    model_a,
    model_b,
    cases: Iterable,
    hook_a: str | None = None,
    hook_b: str | None = None,
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION,
    max_slices_per_case: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The two models' hook activations at the same positions of the same images, batch by batch.

    Each case is prepared for each model (their modalities and sizes may differ); the brain slices both see are
    run through both encoders, and both feature maps are average-pooled to the coarser grid so that a position
    covers the same patch of the slice in both (inputs are the same padded squares, whatever their size).
    Positions whose patch is less than ``min_brain_fraction`` brain are dropped.

    Yields:
        ``(h_a, h_b)``: ``(n, d_a)`` and ``(n, d_b)`` float32 on the CPU, row ``i`` of both the same position.
    """
    yield from _paired_maps(model_a, model_b, cases, hook_a, hook_b, min_brain_fraction, max_slices_per_case)


def paired_codes(
    model_a,
    sae_a,
    model_b,
    sae_b,
    cases: Iterable,
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION,
    max_slices_per_case: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The two SAEs' latent activations at the same positions of the same images, batch by batch.

    As :func:`paired_activations`, except that each SAE encodes its own model's feature map at the model's own
    resolution (its hook point, its inference threshold) and the *codes* are average-pooled to the common grid:
    a latent's activation over a patch is the mean of its activations inside it. Pooling the activations first
    would hand an SAE averages of the vectors it was trained on, which it never saw (on the shipped SegFormer-B0
    at ``stage1``, pooled 3 x 3, 92 of its 128 latents then never fire).

    Yields:
        ``(z_a, z_b)``: ``(n, d_sae_a)`` and ``(n, d_sae_b)`` float32 on the CPU, row ``i`` of both the same position.
    """

    def encoder(sae):
        def encode(feature_map: torch.Tensor) -> torch.Tensor:
            n, d, h, w = feature_map.shape
            codes = sae.encode(feature_map_to_vectors(feature_map).to(sae.device)).cpu()
            return vectors_to_feature_map(codes, n, (h, w))

        return encode

    hook_a, hook_b = sae_a.config.hook_point, sae_b.config.hook_point
    yield from _paired_maps(model_a, model_b, cases, hook_a, hook_b, min_brain_fraction, max_slices_per_case, (encoder(sae_a), encoder(sae_b)))


@torch.no_grad()
def _paired_maps(model_a, model_b, cases, hook_a, hook_b, min_brain_fraction, max_slices_per_case, encoders=None):
    """Both models' hook feature maps (each mapped by its ``encoders`` entry first, when given) pooled to the
    coarser grid, brain positions only, as row-aligned ``(n, d)`` pairs."""
    from ..segmentation.inference import default_batch_size, prepare_for_model

    hook_a, hook_b = model_a._hook(hook_a), model_b._hook(hook_b)
    _, ha, wa = model_a.hook_points()[hook_a]
    _, hb, wb = model_b.hook_points()[hook_b]
    grid = (min(ha, hb), min(wa, wb))
    device_a, device_b = next(model_a.parameters()).device, next(model_b.parameters()).device
    batch_size = min(default_batch_size(model_a), default_batch_size(model_b))
    map_a, map_b = encoders or (lambda x: x, lambda x: x)
    for case in cases:
        pa = prepare_for_model(model_a, case)
        # Models with the same inputs share one preparation (reading and resampling a case dominates here).
        same_inputs = model_a.config.modalities == model_b.config.modalities and model_a.config.image_size == model_b.config.image_size
        pb = pa if same_inputs else prepare_for_model(model_b, case)
        slices = np.intersect1d(pa.brain_slices(), pb.brain_slices())
        if max_slices_per_case and len(slices) > max_slices_per_case:
            slices = slices[np.linspace(0, len(slices) - 1, max_slices_per_case).round().astype(int)]
        for start in range(0, len(slices), batch_size):
            batch = slices[start : start + batch_size]
            act_a, _ = model_a.encode(pa.model_input(batch).to(device_a), hook_a, with_cache=False)
            act_b, _ = model_b.encode(pb.model_input(batch).to(device_b), hook_b, with_cache=False)
            act_a = F.adaptive_avg_pool2d(map_a(act_a.float()), grid).cpu()
            act_b = F.adaptive_avg_pool2d(map_b(act_b.float()), grid).cpu()
            keep = brain_fraction_on_grid(pa, batch, grid).flatten() >= min_brain_fraction
            if keep.any():
                yield feature_map_to_vectors(act_a)[keep], feature_map_to_vectors(act_b)[keep]


class _CorrelationSums:
    """Streaming sums for Pearson correlations between the columns of two code matrices (float64)."""

    def __init__(self, d_a: int, d_b: int):
        self.n = 0
        self.sum_a, self.sum_b = torch.zeros(d_a, dtype=torch.float64), torch.zeros(d_b, dtype=torch.float64)
        self.sq_a, self.sq_b = torch.zeros(d_a, dtype=torch.float64), torch.zeros(d_b, dtype=torch.float64)
        self.cross = torch.zeros(d_a, d_b, dtype=torch.float64)

    def add(self, za: torch.Tensor, zb: torch.Tensor) -> None:
        za, zb = za.double(), zb.double()
        self.n += za.shape[0]
        self.sum_a += za.sum(0)
        self.sum_b += zb.sum(0)
        self.sq_a += (za * za).sum(0)
        self.sq_b += (zb * zb).sum(0)
        self.cross += za.t() @ zb

    def correlation(self) -> np.ndarray:
        """``(d_a, d_b)``; latents that never vary (dead on these images) correlate 0 with everything."""
        n = max(self.n, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - mean_a[:, None] * mean_b[None, :]
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        denom = std_a[:, None] * std_b[None, :]
        corr = torch.where(denom > 1e-12, cov / denom.clamp_min(1e-12), torch.zeros_like(cov))
        return corr.clamp(-1, 1).numpy()


def latent_correlations(sae_a, sae_b, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], encoded: bool = False) -> tuple[np.ndarray, int]:
    """Pearson correlation of every latent of A with every latent of B over paired positions: ``((n_a, n_b), n)``.

    ``pairs`` yields activations ``(h_a, h_b)`` as :func:`paired_activations` does, encoded here with each SAE's
    inference threshold, or (``encoded``) the codes themselves, as :func:`paired_codes` does.
    """
    sums = _CorrelationSums(sae_a.d_sae, sae_b.d_sae)
    with torch.no_grad():
        for h_a, h_b in pairs:
            if encoded:
                sums.add(h_a, h_b)
            else:
                sums.add(sae_a.encode(h_a.to(sae_a.device)).cpu(), sae_b.encode(h_b.to(sae_b.device)).cpu())
    if sums.n < 2:
        raise ValueError("too few paired positions to correlate latent activations (are the images empty?)")
    return sums.correlation(), sums.n


def correlation_alignment(sae_a, sae_b, pairs, tau: float = 0.5, encoded: bool = False) -> LatentAlignment:
    """Align two SAEs by the correlation of their latents' activations on the same images (Hungarian + tau).

    A latent is shared when its Hungarian partner correlates with it at ``>= tau`` (default 0.5: activation
    correlations run lower than dictionary cosines of one space). ``pairs`` and ``encoded`` as for
    :func:`latent_correlations` (across models of different grids: :func:`paired_codes`).
    """
    corr, n = latent_correlations(sae_a, sae_b, pairs, encoded=encoded)
    return alignment_from_correlations(corr, n, tau)


def alignment_from_correlations(corr: np.ndarray, n: int, tau: float = 0.5) -> LatentAlignment:
    """The activation-correlation alignment of a latent correlation matrix ``(n_a, n_b)`` measured on ``n`` positions."""
    alignment = align_similarities({"corr": corr}, tau, method="activation-correlation", primary="corr")
    # Latents that never fire on these images correlate with nothing: they can only be specific here.
    alignment.info = {"positions": int(n), "active_a": int((np.abs(corr).max(1) > 0).sum()), "active_b": int((np.abs(corr).max(0) > 0).sum())}
    return alignment


@torch.no_grad()
def shared_image_correlations(
    members: Mapping[str, tuple[object, object]],
    pairs: Mapping[Hashable, tuple[str, str, Collection[int]]],
    cases: Sequence,
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION,
) -> dict[Hashable, tuple[np.ndarray, int]]:
    """Latent activation correlations of many SAE pairs, each over the images it names, every image read once.

    For models of one architecture and inputs (e.g. fine-tuned from one base), a position of a slice is the same
    patch for all of them: each case is prepared once, run once through each model's encoder, and every SAE
    encodes its own model's activations there (:func:`paired_activations` does the same for one pair of any models).

    Args:
        members: ``{name: (model, sae)}``; several names may share one model (e.g. SAEs from two seeds).
        pairs: ``{key: (name_a, name_b, indices into cases)}``: the images to correlate each pair on.
        cases: case folders or :class:`~SegLensLogic.data.Case` objects.
        min_brain_fraction: positions whose patch is less brain than this are left out.

    Returns:
        ``{key: (correlation (d_sae_a, d_sae_b), positions)}``.

    Raises:
        ValueError: the models differ in inputs or in the grid at their SAEs' hooks; a pair names an unknown member.
    """
    from ..segmentation.inference import default_batch_size, prepare_for_model

    for key, (a, b, _) in pairs.items():
        for name in (a, b):
            if name not in members:
                raise ValueError(f"pair {key!r} names '{name}', which is not among the members ({', '.join(members)})")
    models = {id(model): model for model, _ in members.values()}
    hooks = {name: model._hook(sae.config.hook_point) for name, (model, sae) in members.items()}
    first = next(iter(models.values()))
    grids = {tuple(model.hook_points()[hooks[name]][1:]) for name, (model, _) in members.items()}
    if len(grids) != 1 or any(
        m.config.modalities != first.config.modalities or m.config.image_size != first.config.image_size for m in models.values()
    ):
        raise ValueError("the models take different inputs or give different grids at their hooks; align them pair by pair "
                         "with paired_activations")  # fmt: skip
    grid = grids.pop()
    sums = {key: _CorrelationSums(members[a][1].d_sae, members[b][1].d_sae) for key, (a, b, _) in pairs.items()}
    by_case: dict[int, list] = {}
    for key, (_, _, indices) in pairs.items():
        for index in indices:
            by_case.setdefault(int(index), []).append(key)
    batch_size = min(default_batch_size(m) for m in models.values())
    for index in sorted(by_case):
        keys = by_case[index]
        names = {name for key in keys for name in pairs[key][:2]}
        prepared = prepare_for_model(first, cases[index])
        slices = prepared.brain_slices()
        if not len(slices):
            continue
        keep = torch.cat([brain_fraction_on_grid(prepared, slices[s : s + batch_size], grid).flatten()
                          for s in range(0, len(slices), batch_size)]) >= min_brain_fraction  # fmt: skip
        vectors: dict[int, torch.Tensor] = {}
        for name in sorted(names):
            model, _ = members[name]
            key_model = (id(model), hooks[name])
            if key_model not in vectors:
                device = next(model.parameters()).device
                parts = []
                for s in range(0, len(slices), batch_size):
                    h, _ = model.encode(prepared.model_input(slices[s : s + batch_size]).to(device), hooks[name], with_cache=False)
                    parts.append(feature_map_to_vectors(h.float()).cpu())
                vectors[key_model] = torch.cat(parts)[keep]
        codes = {}
        for name in names:
            model, sae = members[name]
            x = vectors[(id(model), hooks[name])]
            codes[name] = sae.encode(x.to(sae.device)).cpu()
        for key in keys:
            a, b, _ = pairs[key]
            sums[key].add(codes[a], codes[b])
    out = {}
    for key, total in sums.items():
        if total.n < 2:
            raise ValueError(f"too few positions to correlate the latents of pair {key!r} (are its images empty?)")
        out[key] = (total.correlation(), total.n)
    return out


def fit_procrustes(h_a: np.ndarray, h_b: np.ndarray) -> tuple[np.ndarray, dict]:
    """Orthogonal map from A's activation space into B's, fitted on paired activations ``(n, d_a)``, ``(n, d_b)``.

    Both sides are centred and scaled to unit RMS norm; the smaller side is zero-padded to ``d = max(d_a, d_b)``
    and ``R (d, d)`` minimises ``||A R - B||`` over orthogonal matrices. Returns ``R`` and the fit:
    ``{"explained": 1 - ||A R - B||^2 / ||B||^2, "d_a", "d_b", "positions"}``.
    """
    a, b = np.asarray(h_a, dtype=np.float64), np.asarray(h_b, dtype=np.float64)
    if a.shape[0] != b.shape[0] or a.shape[0] < 2:
        raise ValueError(f"paired activations must have the same number (>= 2) of rows, got {a.shape[0]} and {b.shape[0]}")
    a = a - a.mean(0)
    b = b - b.mean(0)
    a /= max(np.sqrt((a * a).sum(1).mean()), 1e-12)
    b /= max(np.sqrt((b * b).sum(1).mean()), 1e-12)
    d = max(a.shape[1], b.shape[1])
    a_pad, b_pad = _pad(a, d), _pad(b, d)
    rotation, _ = orthogonal_procrustes(a_pad, b_pad)
    residual = float(((a_pad @ rotation - b_pad) ** 2).sum() / max((b_pad**2).sum(), 1e-12))
    return rotation, {"explained": 1.0 - residual, "d_a": int(h_a.shape[1]), "d_b": int(h_b.shape[1]), "positions": int(a.shape[0])}


def _pad(x: np.ndarray, d: int) -> np.ndarray:
    return x if x.shape[1] == d else np.concatenate([x, np.zeros((x.shape[0], d - x.shape[1]))], axis=1)


def procrustes_alignment(sae_a, sae_b, h_a: np.ndarray, h_b: np.ndarray, tau: float = 0.8) -> LatentAlignment:
    """Map A's encoder and decoder vectors into B's space with a Procrustes fit, then the cosine rule.

    Args:
        h_a, h_b: paired activations ``(n, d_a)`` and ``(n, d_b)`` (e.g. concatenated from
            :func:`paired_activations`).
    """
    rotation, fit = fit_procrustes(h_a, h_b)
    d = rotation.shape[0]
    vectors_a = {k: _pad(v.astype(np.float64), d) @ rotation for k, v in dictionary_vectors(sae_a).items()}
    vectors_b = {k: _pad(v.astype(np.float64), d) for k, v in dictionary_vectors(sae_b).items()}
    alignment = align_vectors(vectors_a, vectors_b, tau, method="procrustes-decoder-encoder-cosine")
    alignment.info = {"procrustes": fit}
    return alignment


def collect_pairs(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], max_positions: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate paired activations, keeping at most ``max_positions`` rows (a seeded random subset)."""
    blocks_a, blocks_b = [], []
    for h_a, h_b in pairs:
        blocks_a.append(h_a.numpy())
        blocks_b.append(h_b.numpy())
    if not blocks_a:
        raise ValueError("no paired positions: the images hold no brain slices both models see")
    a, b = np.concatenate(blocks_a), np.concatenate(blocks_b)
    if len(a) > max_positions:
        keep = np.sort(np.random.default_rng(seed).choice(len(a), max_positions, replace=False))
        a, b = a[keep], b[keep]
    return a, b
