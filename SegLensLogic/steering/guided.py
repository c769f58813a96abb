"""Steering aimed by hints: the latent edit that makes the mask agree with what the user pointed at.

The user places a few hints (:mod:`~SegLensLogic.steering.hints`): ``+`` where tumour was missed, ``-`` where
tumour was wrongly found. :func:`guided_edits` turns them into ordinary :class:`~.interventions.LatentEdit` s, so a
fix is recorded in the recipe, replayed bit for bit and undone like any edit:

1. **Region**: the axial slab of slices within ``margin_mm`` of the hinted slices. The fix acts only there, and
   acts on whatever in the slab carries the latents it edits, not only at the clicked spots: that is what latents
   are for.
2. **Candidates**: the latents active in the hinted slices, ranked by attribution: the gradient of the hint loss
   (below) with respect to each latent's scale at the current state, ``d L / d log(alpha_j)``; the
   ``candidates`` largest in magnitude are kept.
3. **Fit**: one scale ``alpha_j = exp(theta_j)`` per candidate, by Adam through the layers after the hook on the
   hinted slices only (the cached encoder outputs; the edit ``h + sum_j (alpha_j - 1) z_j d_j`` is
   differentiable). The loss: cross-entropy of what each hint says, over a small disk around it; a *keep* term,
   cross-entropy to the current labels elsewhere in those slices, which weighs the current tumour's classes (its
   composition) more than its extent, so that growing a tumour does not scramble its core; and a penalty
   ``l2 * mean(theta^2)`` that keeps the edit small.
4. **Edits**: one ``scale`` edit per latent whose fitted alpha moved, inside the region.

Everything but the region and the hints is computed from the model's own features, never from a label.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SegLensError
from ..sae.activations import feature_map_to_vectors
from ..sae.model import SparseDictionary
from .hints import HintVoxel
from .interventions import LatentEdit, Region


@dataclass(frozen=True)
class GuidedOptions:
    """How hints become an edit (:func:`guided_edits`).

    Attributes:
        margin_mm: half-width of the slab around the hinted slices where the edit applies (mm along S).
        candidates: latents fitted (the strongest by attribution).
        steps, learning_rate: Adam on the log-scales.
        disk_mm: radius of the in-plane disk around each hint whose voxels the hint speaks for.
        keep_composition, keep_extent: weights of the keep term on the current tumour's voxels (keeping their
            class) and on the current background (keeping it background) when the hints ask for more tumour; the
            two swap roles when they ask for less.
        l2: penalty on the mean squared log-scale.
        hint_weight, hint_probability: weight of the hint term, and the probability of what a hint says above
            which its voxels pull no further (a hinge: the edit is as large as the hints need, no larger).
        keep_every_mm: the keep term reads the hinted slices and slices this far apart across the slab.
        max_alpha: log-scales are clipped to ``[-log max_alpha, log max_alpha]``.
        min_change: alphas within this of 1 are dropped from the edit.
        at_hints: candidates only among latents that fire at the hints (a scale acts where its latent fires).
        region: where the edit applies: ``slab`` (the slices within ``margin_mm``), ``near`` (the slab's brain
            within ``near_mm`` of the current tumour or a hint: no reach into healthy tissue far away) or
            ``features`` (the slab's positions whose codes resemble the hinted ones, cosine >= ``similarity``).
        target: ``disk`` (each hint speaks for its disk) or ``region`` (for the feature region on its slice).
        label_rules: extent and composition apart (:func:`rule_for_hints`); False: the edited model's labels.
        backtrack: after the fit, the smallest of these shares of its log-scales that still gives every hint's
            voxel what the hint says is kept (the fit overshoots; a smaller edit spills less); empty: keep the fit.
    """

    margin_mm: float = 20.0
    candidates: int = 6
    steps: int = 25
    learning_rate: float = 0.15
    disk_mm: float = 3.0
    keep_composition: float = 1.0
    keep_extent: float = 0.5
    l2: float = 0.05
    hint_weight: float = 1.0
    hint_probability: float = 0.7
    keep_every_mm: float = 8.0
    max_alpha: float = 8.0
    min_change: float = 0.02
    at_hints: bool = True
    region: str = "near"
    near_mm: float = 15.0
    similarity: float = 0.5
    target: str = "disk"
    label_rules: bool = True
    backtrack: tuple[float, ...] = (0.25, 0.5, 0.75)


@dataclass
class GuidedFix:
    """A fitted fix: its edits and how it was found.

    Attributes:
        edits: one ``scale`` edit per latent, inside ``region`` (apply them in order; together they are the fix).
        latents, alphas: the fitted latents and their scales (also those dropped for moving less than
            ``min_change``).
        region: where the edits apply.
        attribution: the candidates' attribution at the start (``d L / d log alpha``; negative: scaling up helps).
        losses: the fit's loss per step.
        seconds: time to fit.
        rule: the label rule of its edits (:func:`rule_for_hints`).
    """

    edits: list[LatentEdit]
    latents: tuple[int, ...]
    alphas: tuple[float, ...]
    region: Region
    attribution: tuple[float, ...] = ()
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    rule: str = "model"


def rule_for_hints(hints: Sequence[HintVoxel], current_ras: np.ndarray) -> str:
    """The label rule a fix from ``hints`` follows (:func:`apply_label_rule`), from what each hint asks of the
    current labels at its voxel: tumour on background (``grow``), background on tumour (``shrink``), both
    (``extent``), another tumour class inside the tumour (``composition``); hints of both kinds, extent and
    composition, give ``model`` (the edited model's own labels). A hint the labels already agree with asks nothing."""
    extent, grow, shrink, composition = False, False, False, False
    for hint in hints:
        label = int(current_ras[hint.voxel])
        sign, cls = hint.hint.sign, hint.hint.cls
        if sign == "+":
            if label == 0:
                grow = True
            elif cls is not None and label != cls:
                composition = True
        elif label > 0:
            if cls is None:
                shrink = True
            elif label == cls:
                composition = True
    extent = grow or shrink
    if extent and composition:
        return "model"
    if composition:
        return "composition"
    if grow and shrink:
        return "extent"
    return "grow" if grow else "shrink" if shrink else "model"


def hint_region(hints: Sequence[HintVoxel], num_slices: int, slice_mm: float, margin_mm: float) -> Region:
    """The slab of axial slices within ``margin_mm`` of the hinted ones (``slice_mm`` apart), inside the volume."""
    margin = int(round(margin_mm / max(slice_mm, 1e-6)))
    slices = [h.slice for h in hints]
    return Region.slices(max(0, min(slices) - margin), min(num_slices, max(slices) + margin + 1))


def _disk(shape: tuple[int, int], centre: tuple[int, int], radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    xs = (np.arange(shape[0]) - centre[0]) * spacing[0]
    ys = (np.arange(shape[1]) - centre[1]) * spacing[1]
    return (xs[:, None] ** 2 + ys[None, :] ** 2) <= radius_mm**2


@dataclass
class _Targets:
    """Per fitted slice, what the loss reads (RAS in-plane ``(X, Y)``, as ``from_model`` returns logits)."""

    hint_masks: torch.Tensor  # (H, N, X, Y) bool: the disk of each hint on its slice
    hint_kinds: list[tuple[str, int | None]]  # (sign, class) per hint
    keep_labels: torch.Tensor  # (N, X, Y) long: the current labels
    keep_weights: torch.Tensor  # (N, X, Y) float: the keep term's weight per voxel
    composition: bool = False  # the fix's rule keeps the extent: hints and keep term read the tumour classes only


def _targets(hints: Sequence[HintVoxel], slices: np.ndarray, current_ras: np.ndarray, brain: np.ndarray,
             spacing: tuple[float, float, float], options: GuidedOptions, grown: np.ndarray | None = None,
             rule: str = "model") -> _Targets:  # fmt: skip
    shape = current_ras.shape[:2]
    masks = np.zeros((len(hints), len(slices), *shape), dtype=bool)
    for i, hint in enumerate(hints):
        n = int(np.flatnonzero(slices == hint.slice)[0])
        masks[i, n] = _disk(shape, hint.voxel[:2], options.disk_mm, spacing[:2]) & brain[:, :, hint.slice]
        if options.target == "region" and grown is not None and grown[hint.voxel]:
            # The hint speaks for the tissue like it on its slice: the feature region's part connected to it.
            from scipy import ndimage

            part, _ = ndimage.label(grown[:, :, hint.slice])
            masks[i, n] |= part == part[hint.voxel[:2]]
    labels = current_ras[:, :, slices].transpose(2, 0, 1).astype(np.int64)
    inside = brain[:, :, slices].transpose(2, 0, 1) & ~masks.any(axis=0)
    tumour = labels > 0
    # What the rule leaves to the edit is held by the keep term; what the rule keeps anyway is not. More tumour
    # wanted: the background gives way, weakly held (its extent is the fix); less: the tumour gives way.
    if rule == "composition":
        on_tumour, on_background = options.keep_composition, 0.0
    elif rule == "grow":
        on_tumour, on_background = 0.1 * options.keep_composition, options.keep_extent
    elif rule == "shrink":
        on_tumour, on_background = options.keep_extent, 0.1 * options.keep_composition
    else:
        grow = any(h.hint.sign == "+" for h in hints)
        shrink = any(h.hint.sign == "-" for h in hints)
        on_tumour = options.keep_composition if grow and not shrink else options.keep_extent if shrink and not grow else 0.5 * (options.keep_composition + options.keep_extent)
        on_background = options.keep_extent if grow and not shrink else options.keep_composition if shrink and not grow else on_tumour
    weights = np.where(tumour, on_tumour, on_background) * inside
    return _Targets(
        hint_masks=torch.from_numpy(masks),
        hint_kinds=[(h.hint.sign, h.hint.cls) for h in hints],
        keep_labels=torch.from_numpy(labels),
        keep_weights=torch.from_numpy(weights.astype(np.float32)),
        composition=rule == "composition",
    )


def _hint_loss(log_probs: torch.Tensor, targets: _Targets, satisfied: float = 0.0) -> torch.Tensor:
    """Mean over hints of the mean negative log-likelihood of what each says over its disk, less ``satisfied``
    (a hinge: a voxel whose wanted probability exceeds ``exp(-satisfied)`` pulls no further)."""
    losses = []
    for mask, (sign, cls) in zip(targets.hint_masks, targets.hint_kinds):
        lp = log_probs.permute(0, 2, 3, 1)[mask]  # (V, K)
        if targets.composition:  # the extent is kept: only the tumour classes' shares count
            lp = torch.cat([torch.zeros_like(lp[:, :1]), torch.log_softmax(lp[:, 1:], dim=1)], dim=1)
            if cls is None:
                continue
        if sign == "+":
            wanted = lp[:, cls] if cls is not None else torch.logsumexp(lp[:, 1:], dim=1)
        elif cls is None:
            wanted = lp[:, 0]
        else:
            keep = [c for c in range(lp.shape[1]) if c != cls]
            wanted = torch.logsumexp(lp[:, keep], dim=1)
        losses.append(torch.relu(-wanted - satisfied).mean())
    return torch.stack(losses).mean() if losses else log_probs.sum() * 0


def _satisfied(logits: torch.Tensor, targets: _Targets, hint_pixels: list[tuple[int, int, int]]) -> bool:
    """Whether the labels at every hint's own voxel (``(slice number, x, y)``) are what the hint says."""
    labels = torch.argmax(logits, dim=1)
    for (n, x, y), (sign, cls) in zip(hint_pixels, targets.hint_kinds):
        label = int(labels[n, x, y])
        if targets.composition:
            label = int(torch.argmax(logits[n, 1:, x, y])) + 1 if cls is not None else label
        if sign == "+" and not (label == cls if cls is not None else label > 0):
            return False
        if sign == "-" and not (label != cls if cls is not None else label == 0):
            return False
    return True


def _keep_loss(log_probs: torch.Tensor, targets: _Targets) -> torch.Tensor:
    if targets.composition:  # within the tumour's classes (its extent is kept by the rule)
        tumour = torch.log_softmax(log_probs[:, 1:], dim=1)
        log_probs = torch.cat([torch.zeros_like(log_probs[:, :1]), tumour], dim=1)
    nll = torch.nn.functional.nll_loss(log_probs, targets.keep_labels, reduction="none")
    return (nll * targets.keep_weights).sum() / targets.keep_weights.gt(0).sum().clamp(min=1)


def guided_edits(
    forward,
    sae: SparseDictionary,
    hints: Sequence[HintVoxel],
    current_ras: np.ndarray,
    current_deltas: dict[int, torch.Tensor] | None = None,
    options: GuidedOptions = GuidedOptions(),
    candidates: Sequence[int] | None = None,
    random_seed: int | None = None,
    codes=None,
    log: Callable[[str], None] | None = None,
) -> GuidedFix:
    """Fit a latent edit to hints on an encoded case (module docstring).

    Args:
        forward: the case's :class:`~SegLensLogic.steering.resegment.CachedForward`.
        sae: the SAE at its hook point.
        hints: resolved hints (:func:`~SegLensLogic.steering.hints.resolve_hints`).
        current_ras: the current labels ``(X, Y, Z)`` in RAS order (what the keep term holds on to).
        current_deltas: the activation changes of the edits already applied (``{position: (D, h, w)}``).
        candidates: fit these latents instead of choosing them by attribution.
        codes: the case's :class:`~SegLensLogic.sae.codes.VolumeCodes` (needed by ``options.region="features"``).
        random_seed: fit as many latents as the aimed fix would, drawn at random (with this seed) among all those
            active in the fitted slices instead (the random-latent control: the same fit and region, no aim).

    Returns:
        A :class:`GuidedFix`; its ``edits`` are empty when no latent fires in the hinted slices.
    """
    started = time.perf_counter()
    prepared = forward.prepared
    model = forward.model
    spacing = _ras_spacing(prepared)
    slab, region, grown = _fit_region(forward, sae, hints, current_ras, codes, options, spacing)
    slices = _fit_slices(hints, slab, forward, spacing, options)
    positions = np.array([forward.slice_position[int(z)] for z in slices])
    index = torch.as_tensor(positions, dtype=torch.long, device=forward.device)
    with torch.no_grad():
        h, cache = forward.decoder_inputs(index)
        for i, p in enumerate(positions):
            if current_deltas and int(p) in current_deltas:
                h[i] += current_deltas[int(p)]
        weights = forward.region_weights(sae, region, positions).reshape(-1, 1)
        vectors = feature_map_to_vectors(h)
    rule = rule_for_hints(hints, current_ras) if options.label_rules else "model"
    hint_pixels = [(int(np.flatnonzero(slices == h.slice)[0]), h.voxel[0], h.voxel[1]) for h in hints]
    targets = _targets(hints, slices, current_ras, prepared.brain_mask, spacing, options, grown, rule)
    targets = _Targets(targets.hint_masks.to(forward.device), targets.hint_kinds, targets.keep_labels.to(forward.device),
                       targets.keep_weights.to(forward.device))  # fmt: skip
    n, d, *spatial = h.shape

    def logits_of(theta: torch.Tensor, latents: Sequence[int], codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        change = ((torch.exp(theta) - 1) * codes) @ rows
        edited = h + change.reshape(n, -1, d).transpose(1, 2).reshape(n, d, *spatial)
        return prepared.geometry.from_model(model.decode(edited, cache, forward.hook).float())

    satisfied = -float(np.log(options.hint_probability))

    def loss_of(logits: torch.Tensor, theta: torch.Tensor, hints_only: bool = False) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=1)
        if hints_only:
            return _hint_loss(log_probs, targets)
        return (options.hint_weight * _hint_loss(log_probs, targets, satisfied) + _keep_loss(log_probs, targets)
                + options.l2 * theta.pow(2).mean())  # fmt: skip

    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:  # only the scales learn; no gradient is kept for the model's weights
        parameter.requires_grad_(False)
    try:
        with torch.no_grad():
            dense = sae.latent_codes(vectors, range(sae.d_sae)).mul(weights)
            in_slices = torch.nonzero(dense.sum(dim=0) > 0).flatten().tolist()
            active = in_slices
            if options.at_hints:  # only latents that fire where the hints are: a scale acts where its latent fires
                near = _hint_neighbourhood(targets.hint_masks, prepared, slices, forward.grid).reshape(-1).to(dense.device)
                active = torch.nonzero((dense * near[:, None]).sum(dim=0) > 0).flatten().tolist()
        if candidates is not None:
            latents, scores = tuple(int(j) for j in candidates if int(j) in set(in_slices)), ()
        elif random_seed is not None:
            latents, scores = _random_latents(in_slices, active, options.candidates, random_seed), ()
        else:
            attribution = _attribution(sae, vectors, weights, active, logits_of, loss_of, forward.device)
            order = np.argsort(-np.abs(attribution), kind="stable")[: options.candidates]
            latents = tuple(int(active[i]) for i in order)
            scores = tuple(float(attribution[i]) for i in order)
        if not latents:
            return GuidedFix([], (), (), region, scores, [], time.perf_counter() - started, rule)
        with torch.no_grad():
            codes = sae.latent_codes(vectors, latents) * weights
            rows = sae.decode_change(torch.eye(len(latents), device=forward.device), latents)
        theta = torch.zeros(len(latents), device=forward.device, requires_grad=True)
        optimiser = torch.optim.Adam([theta], lr=options.learning_rate)
        bound = float(np.log(options.max_alpha))
        losses = []
        for step in range(options.steps):
            optimiser.zero_grad(set_to_none=True)
            loss = loss_of(logits_of(theta, latents, codes, rows), theta)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                theta.clamp_(-bound, bound)
            losses.append(float(loss.detach()))
            if log is not None and (step % 5 == 0 or step == options.steps - 1):
                log(f"    hint fit step {step:3d}: loss {losses[-1]:.4f}")
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    fitted = theta.detach()
    if options.backtrack:  # the smallest share of the fitted edit that still does what the hints say
        with torch.no_grad():
            for share in options.backtrack:
                if _satisfied(logits_of(fitted * share, latents, codes, rows), targets, hint_pixels):
                    fitted = fitted * share
                    break
    alphas = tuple(float(np.float32(np.exp(float(t)))) for t in fitted.cpu())
    edits = [LatentEdit((j,), "scale", round(a, 4), region=region, labels=rule) for j, a in zip(latents, alphas)
             if abs(a - 1.0) >= options.min_change]  # fmt: skip
    return GuidedFix(edits, latents, alphas, region, scores, losses, time.perf_counter() - started, rule)


def _fit_region(forward, sae: SparseDictionary, hints: Sequence[HintVoxel], current_ras: np.ndarray, codes,
                options: GuidedOptions, spacing) -> tuple[Region, Region, np.ndarray | None]:  # fmt: skip
    """Where the fix may act: ``(slab, region, grown)``: the slab of slices around the hints, the region the
    edit is applied in (the slab, or ``options.region``'s mask grown from the hints, on the input grid) and that
    grown mask in RAS order (None for the slab)."""
    prepared = forward.prepared
    slab = region = hint_region(hints, prepared.num_slices, spacing[2], options.margin_mm)
    grown = None
    if options.region == "near":
        grown = near_region(hints, current_ras, prepared.brain_mask, slab, spacing, options.near_mm)
        region = Region.from_mask(prepared.to_input_grid(grown))
    elif options.region == "features":
        if codes is None:
            raise SegLensError("a feature region needs the case's latent codes")
        grown = feature_region(codes, forward, sae, hints, slab, options.similarity)
        if grown is not None:
            region = Region.from_mask(prepared.to_input_grid(grown))
    return slab, region, grown


def _fit_slices(hints: Sequence[HintVoxel], slab: Region, forward, spacing, options: GuidedOptions) -> np.ndarray:
    """The slices the fit reads: the hinted ones and, for the keep term, slices spread over the slab (so the edit
    is held where no hint speaks)."""
    hinted = np.unique([h.slice for h in hints])
    spread = np.arange(slab.start, slab.stop, max(1, int(round(options.keep_every_mm / spacing[2]))))
    slices = np.unique(np.concatenate([hinted, [z for z in spread if int(z) in forward.slice_position]])).astype(np.int64)
    missing = [int(z) for z in slices if int(z) not in forward.slice_position]
    if missing:
        raise SegLensError(f"hinted slice(s) {missing} hold no brain the model sees")
    return slices


def _random_latents(in_slices: list[int], active: list[int], count: int, seed: int) -> tuple[int, ...]:
    """The random-latent control: as many latents as the aimed fix would fit, drawn with ``seed`` among all that
    fire in the fitted slices (no aim in the choice)."""
    rng = np.random.default_rng(seed)
    count = min(count, len(active) or count, len(in_slices))
    return tuple(int(j) for j in rng.choice(in_slices, size=count, replace=False)) if in_slices else ()


def _attribution(sae, vectors, weights, active, logits_of, loss_of, device) -> np.ndarray:
    """``d L / d log(alpha_j)`` at alpha 1 for every latent in ``active``, in one backward pass."""
    if not active:
        return np.zeros(0)
    with torch.no_grad():
        codes = sae.latent_codes(vectors, active) * weights
        rows = sae.decode_change(torch.eye(len(active), device=device), active)
    theta = torch.zeros(len(active), device=device, requires_grad=True)
    loss = loss_of(logits_of(theta, active, codes, rows), theta, hints_only=True)
    (grad,) = torch.autograd.grad(loss, theta)
    return grad.detach().cpu().numpy()


def _hint_neighbourhood(hint_masks: torch.Tensor, prepared, slices: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """``(N, h, w)``: 1 at the feature-map positions whose patch touches a hint's disk, else 0."""
    from ..sae.activations import mask_fraction_on_grid

    union = hint_masks.any(dim=0).cpu().numpy()  # (N, X, Y)
    volume = np.zeros((*union.shape[1:], len(slices)), dtype=bool)
    volume[...] = union.transpose(1, 2, 0)
    return (mask_fraction_on_grid(volume, prepared.geometry, np.arange(len(slices)), grid) > 0).float()


def near_region(hints: Sequence[HintVoxel], current_ras: np.ndarray, brain: np.ndarray, slab: Region, spacing, near_mm: float) -> np.ndarray:
    """The slab's brain within ``near_mm`` of the current tumour or of a hint (RAS, boolean): where a missed
    tumour can plausibly be grown, or a false one taken back, without reaching healthy tissue far away."""
    from scipy import ndimage

    start, stop = slab.start, slab.stop
    seed = current_ras[:, :, start:stop] > 0
    for hint in hints:
        if start <= hint.slice < stop:
            seed[hint.voxel[0], hint.voxel[1], hint.slice - start] = True
    distance = ndimage.distance_transform_edt(~seed, sampling=spacing)
    out = np.zeros(brain.shape, dtype=bool)
    out[:, :, start:stop] = (distance <= near_mm) & brain[:, :, start:stop]
    return out


def feature_region(codes, forward, sae, hints: Sequence[HintVoxel], slab: Region, threshold: float) -> np.ndarray | None:
    """The tissue that looks, to the SAE, like what the hints point at: feature-map positions of the slab whose code
    vector has cosine similarity at least ``threshold`` with the mean code around a hint, connected (across
    neighbouring positions and slices) to that hint; one region per hint, united. Returns a boolean RAS volume
    ``(X, Y, Z)`` inside the brain, or None when no hint has a code around it."""
    from scipy import ndimage

    from ..sae.activations import mask_fraction_on_grid

    prepared = forward.prepared
    h, w = codes.grid
    in_slab = (codes.slices >= slab.start) & (codes.slices < slab.stop)
    numbers = np.flatnonzero(in_slab)
    if not len(numbers):
        return None
    lo, hi = codes.offsets[numbers[0] * h * w], codes.offsets[(numbers[-1] + 1) * h * w]
    pairs = np.arange(lo, hi)
    positions = codes.positions_of_pairs(pairs) - numbers[0] * h * w
    latents, values = codes.latents[lo:hi], codes.values[lo:hi]
    count = len(numbers) * h * w
    norms = np.sqrt(np.bincount(positions, weights=values.astype(np.float64) ** 2, minlength=count))
    united = np.zeros((len(numbers), h, w), dtype=bool)
    for hint in hints:
        disk = np.zeros(prepared.brain_mask.shape, dtype=bool)
        x, y, z = hint.voxel
        disk[max(0, x - 1) : x + 2, max(0, y - 1) : y + 2, z] = True
        number = int(np.flatnonzero(codes.slices[numbers] == z)[0]) if z in codes.slices[numbers] else None
        if number is None:
            continue
        near = (mask_fraction_on_grid(disk, prepared.geometry, np.array([z]), codes.grid)[0].numpy() > 0).reshape(-1)
        seeds = number * h * w + np.flatnonzero(near)
        query = np.zeros(codes.d_sae)
        hits = np.isin(positions, seeds)
        np.add.at(query, latents[hits], values[hits])
        if not query.any():
            continue
        similarity = np.bincount(positions, weights=values * query[latents], minlength=count) / (norms * np.linalg.norm(query) + 1e-12)
        similar = (similarity >= threshold).reshape(len(numbers), h, w)
        components, _ = ndimage.label(similar)
        keep = np.unique(components.reshape(-1)[seeds])
        united |= np.isin(components, keep[keep > 0])
    if not united.any():
        return None
    size = prepared.geometry.size
    maps = torch.nn.functional.interpolate(torch.from_numpy(united.astype(np.float32))[:, None], size=(size, size), mode="nearest")
    maps = prepared.geometry.from_model(maps, mode="nearest")[:, 0].numpy() > 0.5
    volume = np.zeros(prepared.brain_mask.shape, dtype=bool)
    volume[:, :, codes.slices[numbers]] = maps.transpose(1, 2, 0)
    return volume & prepared.brain_mask


def _ras_spacing(prepared) -> tuple[float, float, float]:
    """Voxel sizes (mm) along the RAS-ordered axes of a prepared case."""
    zooms = np.sqrt((np.asarray(prepared.source.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    out = [1.0, 1.0, 1.0]
    for file_axis, (ras_axis, _flip) in enumerate(prepared.orientation.to_ras):
        out[int(ras_axis)] = float(zooms[file_axis])
    return tuple(out)  # type: ignore[return-value]
