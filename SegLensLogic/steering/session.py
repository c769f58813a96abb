"""The interactive steering session: one loaded case, its cached activations and codes, edits, undo, export.

This is the object the Slicer module (and the Python console) drives::

    session = SteeringSession.open("models/adult", "saes/adult", "BraTS-GLI-00001-000", labels="latents.json")
    mask = session.segment()                                  # the model's own mask, input grid
    session.top_latents(5, Region.from_mask(mask == 2))       # most active latents in the predicted edema
    heat = session.heatmap(412)                               # a latent's heatmap, input grid
    preview = session.preview(LatentEdit((412,), "scale", 3.0), slice_index=77)   # one slice, fast
    corrected = session.apply(LatentEdit((412,), "scale", 3.0, region=Region.slices(60, 90)))
    session.undo()
    session.export("corrected.nii.gz")                        # + corrected.recipe.json beside it

It never imports Slicer, Qt or VTK. Every method raises :class:`~SegLensLogic.errors.SegLensError` with a clear
message for bad input (a latent id out of range, a region outside the volume, a recipe for another model) and
leaves the session as it was, so an interactive user can correct the input and go on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.io import write_image
from ..errors import InputFileError, SegLensError, refuse_existing
from ..storage import one_line
from ..networks import load_segmenter
from ..networks.segmenter import Segmenter
from ..sae.codes import VolumeCodes
from ..sae.model import BatchTopKSAE, SparseDictionary
from .guided import GuidedFix, GuidedOptions, guided_edits
from .hints import Hint, resolve_hints
from .interventions import LatentEdit, Region, apply_label_rule, check_latent_ids, step_rule
from .recipe import Recipe, edit_from_json, edit_to_json, recipe_path_for
from .encoded import encode_case
from .resegment import DEFAULT_CACHE_MB, CachedForward
from . import selection

if TYPE_CHECKING:
    from ..alignment.files import Alignment
    from ..interpretation.latent_labels import LatentLabels
    from .suggestions import Suggestions


@dataclass
class _State:
    """One step of the edit history: the edits so far, the labels they give (RAS) and their activation changes."""

    edits: tuple[LatentEdit, ...]
    labels_ras: np.ndarray
    deltas: dict[int, torch.Tensor]
    # How many edits each Apply added, in order (a step's label rule reads the labels before it).
    steps: tuple[int, ...] = ()
    # The labels on the input grid, kept for the current state only: previews start from a plain copy of them.
    input_labels: np.ndarray | None = None


class SteeringSession:
    """A case opened for steering with one segmenter and one SAE at its hook point.

    Args:
        model: the segmenter (its device is used).
        sae: the SAE trained at the model's hook point.
        case: a case folder, :class:`~SegLensLogic.data.Case`, :class:`~SegLensLogic.data.CaseImages` (e.g. from
            Slicer volume nodes) or :class:`~SegLensLogic.data.PreparedCase`.
        labels: latent labels (``seglens interpret``; loaded, or its file), for names and categories.
        alignments: alignments (``seglens align``; loaded, or their files) naming which latents are shared or
            population-specific.
        batch_size: slices per forward pass (default: the model's on this device).
        suggestions: loaded suggested corrections (a bundle's ``suggestions.json``), for :meth:`suggest`.

    A bundle opens a session with everything it loaded and checked: :meth:`SegLensLogic.bundle.Bundle.open_session`.
        cache_mb: the most the case's kept encoder outputs may hold, in MB (None: no limit); beyond it the finest
            ones are recomputed when slices are re-run (same labels, slower: see ``benchmarks/steering.py``).

    Raises:
        SegLensError: the SAE does not fit the model's hook point.
    """

    def __init__(
        self,
        model: Segmenter,
        sae: SparseDictionary,
        case,
        labels: "LatentLabels | str | Path | None" = None,
        alignments: "Sequence[Alignment | str | Path]" = (),
        batch_size: int | None = None,
        suggestions: "Suggestions | None" = None,
        cache_mb: float | None = DEFAULT_CACHE_MB,
    ):
        hook = sae.check_fits(model)
        sae.inference_threshold()  # an SAE without an inference threshold cannot encode a case: say so now
        self.model = model
        self.device = next(model.parameters()).device
        self.sae = sae.to(self.device).eval()
        self.hook = hook
        self.case = case
        self.batch_size = batch_size
        self.cache_mb = cache_mb
        self.latent_labels = selection.as_latent_labels(labels)
        self.alignments = [selection.as_alignment(a) for a in alignments]
        # Labels and alignments must be of this SAE (its size, and its weights hash when both know it): a file that
        # names the SAE's hash but another size is refused here, naming the file, not met later as an index error.
        sha = getattr(sae, "weights_sha256", None)
        if self.latent_labels is not None:
            self.latent_labels.check_sae(sae.d_sae, sha)
        if sha is not None:
            for alignment in self.alignments:
                alignment.check_sae(sha, sae.d_sae, sae.config.d_in)
        self.suggestions = None if suggestions is None else suggestions.check_sae(sae.d_sae)
        self.forward: CachedForward | None = None
        self.codes: VolumeCodes | None = None
        self._history: list[_State] = []

    @classmethod
    def open(
        cls,
        model_dir: str | Path,
        sae_dir: str | Path,
        case,
        labels: str | Path | None = None,
        alignments: Sequence[str | Path] = (),
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        cache_mb: float | None = DEFAULT_CACHE_MB,
    ) -> "SteeringSession":
        """Open a session from a model folder and an SAE folder (the form recipes name by hash)."""
        model = load_segmenter(model_dir, device=device)
        sae = BatchTopKSAE.load(sae_dir, device=next(model.parameters()).device)
        return cls(model, sae, case, labels=labels, alignments=alignments, batch_size=batch_size, cache_mb=cache_mb)

    @classmethod
    def of_encoded(cls, model: Segmenter, sae: SparseDictionary, encoded, **kwargs) -> "SteeringSession":
        """A session on a case already encoded by :func:`~SegLensLogic.steering.encoded.encode_case` with this
        model and SAE (nothing is run again); ``kwargs`` as for the constructor."""
        session = cls(model, sae, encoded.prepared.source, **kwargs)
        session.forward, session.codes = encoded.forward, encoded.codes
        session._history = [_State((), encoded.labels_ras, {})]
        return session

    # -- loading and the unedited mask ----------------------------------------------------------------------
    def segment(self, progress: Callable[[int, int], bool | None] | None = None) -> np.ndarray:
        """Run the model once over the case (caching the layers before the hook and encoding the codes).

        Args:
            progress: ``progress(done, total)``; returning False cancels (raises ``PredictionCancelled``).

        Returns:
            The unmodified model's labels, ``uint8`` on the input's voxel grid (file order).
        """
        if self.forward is None:
            encoded = encode_case(self.model, self.sae, self.case, batch_size=self.batch_size, progress=progress, cache_mb=self.cache_mb)
            self.forward, self.codes = encoded.forward, encoded.codes
            self._history = [_State((), encoded.labels_ras, {})]
        return self.base_labels

    def _ready(self) -> CachedForward:
        if self.forward is None:
            self.segment()
        return self.forward

    @property
    def prepared(self):
        return self._ready().prepared

    @property
    def case_id(self) -> str:
        return self.prepared.source.case_id

    @property
    def num_slices(self) -> int:
        """Axial slices of the volume (RAS order: 0 is the most inferior)."""
        return self.prepared.num_slices

    @property
    def d_sae(self) -> int:
        return self.sae.d_sae

    @property
    def class_names(self) -> list[str]:
        return list(self.model.config.class_names)

    @property
    def base_labels(self) -> np.ndarray:
        """The unmodified model's labels on the input grid."""
        self._ready()
        return self.prepared.to_input_grid(self._history[0].labels_ras)

    @property
    def labels(self) -> np.ndarray:
        """The current labels (after the applied edits) on the input grid."""
        self._ready()
        return self._current_on_input_grid().copy()

    def _current_on_input_grid(self) -> np.ndarray:
        """The current state's labels on the input grid, reoriented once per state (not to be modified)."""
        current = self._history[-1]
        if current.input_labels is None:
            for state in self._history[:-1]:
                state.input_labels = None
            current.input_labels = self.prepared.to_input_grid(current.labels_ras)
        return current.input_labels

    @property
    def edits(self) -> list[LatentEdit]:
        """The applied edits, in order."""
        return list(self._history[-1].edits) if self._history else []

    # -- looking at latents ---------------------------------------------------------------------------------
    def heatmap(self, latent: int) -> np.ndarray:
        """Activation of ``latent`` on the input's voxel grid, ``float32`` (0 where it is inactive)."""
        check_latent_ids([latent], self.d_sae)
        self._ready()
        return self.codes.heatmap(int(latent))

    def region_arguments(self, region: Region | None) -> dict:
        """``region=``/``slice_range=`` for :class:`VolumeCodes` methods from a :class:`Region` (checked)."""
        if region is None or region.kind == "volume":
            return {}
        region.check(self.num_slices, self.prepared.source.shape)
        if region.kind == "mask":
            return {"region": region.mask}
        return {"slice_range": (region.start, region.stop)}

    def top_latents(self, k: int = 10, region: Region | None = None) -> list[tuple[int, float]]:
        """The ``k`` latents with the largest summed activation in ``region``: ``[(latent, total), ...]``."""
        self._ready()
        return self.codes.top_latents(k, **self.region_arguments(region))

    def latent_table(self, slice_index: int | None = None) -> list[dict]:
        """One row per latent active in the volume, most active first.

        Keys: ``id``, ``label`` (auto-interp description), ``category``, ``holds`` (the share of the latent's
        heatmap inside its labelled class on held-out cases, when the labels file carries it: a bundle's does;
        else None), ``replicates`` (whether an SAE trained from another seed finds the latent again, when the labels
        file says; with several such replicas, how many find it; None otherwise), ``replicas`` (how many replicas
        the labels were compared with, or None), ``status`` (``universal``, ``shared``, ``specific`` or None without alignment files),
        ``shared_with`` (cohort names), ``slice_activation`` (summed in ``slice_index``, RAS axial; 0 without one)
        and ``volume_activation`` (summed over the volume).
        """
        self._ready()
        codes = self.codes
        volume = np.bincount(codes.latents, weights=codes.values, minlength=self.d_sae)
        in_slice = np.zeros(self.d_sae)
        if slice_index is not None:
            Region.slice(slice_index).check(self.num_slices, self.prepared.source.shape)
            weights = codes.region_weights(slice_range=(slice_index, slice_index + 1))
            in_slice = np.bincount(codes.latents, weights=codes.values * weights[codes.positions_of()], minlength=self.d_sae)
        rows = []
        replicas = selection.replicas_compared(self.latent_labels)
        for j in np.flatnonzero(volume > 0)[np.argsort(-volume[volume > 0], kind="stable")]:
            status, shared_with = selection.population_status(self.alignments, self.sae_sha256, int(j))
            rows.append({
                "id": int(j),
                "label": selection.describe(self.latent_labels, int(j)),
                "category": selection.category_of(self.latent_labels, int(j)),
                "holds": selection.held_out_share(self.latent_labels, int(j)),
                "replicates": selection.replicates(self.latent_labels, int(j)),
                "replicas": replicas,
                "status": status,
                "shared_with": shared_with,
                "slice_activation": float(in_slice[j]),
                "volume_activation": float(volume[j]),
            })  # fmt: skip
        return rows

    def select(self, category: str | None = None, status: str | None = None, top: int | None = None, region: Region | None = None) -> list[int]:
        """Latents by auto-interp category, population status and/or the ``top`` most active in ``region``
        (criteria combine; see :mod:`~SegLensLogic.steering.selection`)."""
        self._ready()
        return selection.select_latents(self.codes, self.latent_labels, self.alignments, self.sae_sha256,
                                        category=category, status=status, top=top, **self.region_arguments(region))  # fmt: skip

    def slice_of_point(self, ras: Sequence[float]) -> int:
        """RAS axial slice index holding the world point ``ras`` (mm), as Slicer's slice views report it."""
        prepared = self.prepared
        ijk = np.linalg.solve(prepared.source.affine, np.array([*ras[:3], 1.0]))[:3]
        ijk = np.rint(ijk).astype(int)
        shape = prepared.source.shape
        if any(not 0 <= v < n for v, n in zip(ijk, shape)):
            raise SegLensError(f"point {tuple(float(v) for v in ras[:3])} mm is outside the volume")
        axis = int(np.flatnonzero(prepared.orientation.to_ras[:, 0] == 2)[0])  # file axis that becomes S
        flip = prepared.orientation.to_ras[axis, 1]
        return int(ijk[axis] if flip > 0 else shape[axis] - 1 - ijk[axis])

    # -- steering -------------------------------------------------------------------------------------------
    def _check(self, edits: Sequence[LatentEdit]) -> None:
        prepared = self.prepared
        for edit in edits:
            edit.check(self.sae)
            edit.region.check(prepared.num_slices, prepared.source.shape)

    def preview_slice(self, edit: LatentEdit | Sequence[LatentEdit], slice_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The current labels of one axial slice (RAS index) and those the current edits plus ``edit`` (or several
        edits) give there, both ``(X, Y)`` in RAS order: one slice through the layers after the hook, fast enough to
        follow a slider; nothing is recorded. (What a viewer needs to draw the change on that slice alone.)"""
        forward = self._ready()
        Region.slice(slice_index).check(self.num_slices, self.prepared.source.shape)
        new = [edit] if isinstance(edit, LatentEdit) else list(edit)
        self._check(new)
        current = self._history[-1]
        z = int(slice_index)
        before = current.labels_ras[:, :, z]
        position = forward.slice_position.get(z)
        if position is None or not new:  # no brain in this slice (or no edit): nothing to recompute
            return before.copy(), before.copy()
        deltas = forward.deltas(self.sae, (*current.edits, *new), positions=np.array([position]))
        after = forward.slice_labels(position, deltas).astype(before.dtype, copy=False)
        rule = step_rule(new)
        if rule != "model":
            after = apply_label_rule(rule, before, after)
        return before.copy(), after

    def preview(self, edit: LatentEdit | Sequence[LatentEdit], slice_index: int) -> np.ndarray:
        """The labels the current edits plus ``edit`` (or several edits) give, recomputed on one axial slice only
        (RAS index), as the whole volume on the input grid (:meth:`preview_slice` gives the slice alone). Other
        slices keep the current labels; nothing is recorded.
        """
        _before, after = self.preview_slice(edit, slice_index)
        out = self._current_on_input_grid().copy()
        self.prepared.orientation.ras_view(out)[:, :, int(slice_index)] = after
        return out

    def apply(self, edit: LatentEdit | Sequence[LatentEdit], progress: Callable[[int, int], bool | None] | None = None) -> np.ndarray:
        """Apply ``edit`` (or several edits, as one step: a fix from :meth:`fix`) on top of the current edits and
        re-segment the slices it changes.

        Args:
            progress: ``progress(batches_done, batches_total)`` while the changed slices are decoded; returning
                False cancels (``PredictionCancelled``) and leaves the session as it was.

        Returns:
            The new labels on the input grid (also :attr:`labels`); :meth:`undo` goes back.
        """
        forward = self._ready()
        new = [edit] if isinstance(edit, LatentEdit) else list(edit)
        if not new:
            raise SegLensError("no edit to apply")
        self._check(new)
        rule = step_rule(new)
        current = self._history[-1]
        edits = (*current.edits, *new)
        touched = {j for e in new for j in e.latents}
        if any(touched & set(e.latents) for e in current.edits):
            # The new edits read codes that earlier edits changed: compute the whole history's change together.
            deltas = forward.deltas(self.sae, edits)
            changed = [p for p in set(deltas) | set(current.deltas)
                       if p not in deltas or p not in current.deltas or not torch.equal(deltas[p], current.deltas[p])]  # fmt: skip
        else:  # only the new edits' change is computed (W_dec^T is linear: changes of disjoint latents add up)
            added = forward.deltas(self.sae, new)
            deltas = dict(current.deltas)
            for p, delta in added.items():
                deltas[p] = deltas[p] + delta if p in deltas else delta
            changed = list(added)
        labels = forward.relabel(current.labels_ras, changed, deltas, progress=progress)
        if rule != "model":  # the step's rule reads the labels before it, on the slices it changed
            slices = forward.slices[np.asarray(sorted(changed), dtype=np.int64)] if changed else np.zeros(0, dtype=np.int64)
            labels[:, :, slices] = apply_label_rule(rule, current.labels_ras[:, :, slices], labels[:, :, slices])
        self._history.append(_State(edits, labels, deltas, steps=(*current.steps, len(new))))
        return self.labels  # reoriented once, and kept for this state

    def fix(self, hints: Sequence[Hint], options: GuidedOptions | None = None, candidates: Sequence[int] | None = None,
            random_seed: int | None = None) -> GuidedFix:  # fmt: skip
        """The latent edit that makes the current mask agree with ``hints`` (:mod:`~SegLensLogic.steering.guided`);
        nothing is applied: preview its ``edits`` or :meth:`apply` them (one step, recorded in the recipe).

        Args:
            hints: :class:`~SegLensLogic.steering.hints.Hint` s (world points in mm, ``+``/``-``, optional class).
            options: the fit's settings (:class:`~SegLensLogic.steering.guided.GuidedOptions`).
            candidates: fit these latents instead of those chosen by attribution.
            random_seed: fit random latents active in the hinted slices instead (the random-latent control).

        Raises:
            SegLensError: a hint outside the volume or the brain, an unknown class, contradicting hints, too many.
        """
        forward = self._ready()
        resolved = resolve_hints(hints, self.prepared, len(self.class_names))
        current = self._history[-1]
        return guided_edits(forward, self.sae, resolved, current.labels_ras, current.deltas, options or GuidedOptions(), candidates,
                            random_seed, codes=self.codes)  # fmt: skip

    def suggest(self, population: str | None = None, method: str = "ground-truth-free",
                progress: Callable[[int, int], bool | None] | None = None):  # fmt: skip
        """A suggested correction for this case (no label of it is read), computed from the unedited mask; apply
        its ``edits`` with :meth:`apply` (or preview them) like any other edit.

        Args:
            population: the case's population (see :attr:`populations`); None: no population-specific latents.
            method: ``ground-truth-free`` (alpha by plausibility on this case) or ``calibrated`` (the build's alpha).
            progress: ``progress(done, total)`` while the alphas are tried; returning False cancels
                (``PredictionCancelled``); the session does not change either way.

        Returns:
            A :class:`~SegLensLogic.steering.suggestions.Suggestion`.
        """
        from .encoded import EncodedCase
        from .suggestions import suggest

        if self.suggestions is None:
            raise SegLensError("this session has no suggestions (open it from a bundle that has suggestions.json)")
        forward = self._ready()
        encoded = EncodedCase(forward, self.codes, self._history[0].labels_ras)
        return suggest(encoded, self.sae, self.suggestions, population, method, progress=progress)

    @property
    def populations(self) -> list[str]:
        """Populations the session's suggestions know."""
        return sorted(self.suggestions.populations) if self.suggestions is not None else []

    def undo(self) -> np.ndarray:
        """Remove the last applied edit; returns the labels before it."""
        self._ready()
        if len(self._history) < 2:
            raise SegLensError("there is no edit to undo")
        self._history.pop()
        return self.labels

    def checkpoint(self) -> tuple:
        """The edit history as it stands, for :meth:`restore` (a caller that may drop what comes next)."""
        self._ready()
        return tuple(self._history)

    def restore(self, checkpoint: tuple) -> np.ndarray:
        """Go back to a :meth:`checkpoint` of this session; returns its labels."""
        self._ready()
        if not checkpoint or checkpoint[0] is not self._history[0]:
            raise SegLensError("this checkpoint belongs to another session or segmentation")
        self._history = list(checkpoint)
        return self.labels

    def reset(self) -> np.ndarray:
        """Remove every edit; returns the unmodified model's labels."""
        self._ready()
        del self._history[1:]
        return self.labels

    # -- recipes and export ---------------------------------------------------------------------------------
    @property
    def model_sha256(self) -> str | None:
        return getattr(self.model, "weights_sha256", None)

    @property
    def sae_sha256(self) -> str | None:
        return getattr(self.sae, "weights_sha256", None)

    def recipe(self) -> Recipe:
        """The recipe of the current labels (model and SAE hashes, the case's grid, the edits in order)."""
        prepared = self.prepared
        state = self._history[-1]
        step_of = [number for number, count in enumerate(state.steps, start=1) for _ in range(count)]
        return Recipe(
            model={"sha256": self.model_sha256, "arch": self.model.config.arch, "hook_point": self.hook},
            sae={"sha256": self.sae_sha256, "d_sae": self.d_sae, "k": self.sae.config.k},
            case={"case_id": self.case_id, "shape": list(prepared.source.shape), "affine": prepared.source.affine.tolist()},
            edits=[edit_to_json(e, getattr(e.swap_sae, "weights_sha256", None), step) for e, step in zip(self.edits, step_of)],
        )

    def apply_recipe(self, recipe: Recipe, swap_saes: Sequence[SparseDictionary] = (), source: str | Path = "<recipe>",
                     progress: Callable[[int, int], bool | None] | None = None) -> np.ndarray:  # fmt: skip
        """Replay a recipe's edits from the unmodified mask; the result is the recipe's mask, bit for bit.

        ``progress(done, total)`` counts the recipe's steps (each by its decoded batches); returning False cancels
        (``PredictionCancelled``) and leaves the session as it was before the replay.

        Raises:
            InputFileError: the recipe names another model, SAE or voxel grid; an edit is malformed.
        """
        self._ready()
        recipe.check_matches(self.model_sha256, self.sae_sha256, source)
        recipe.check_case(self.case_id, self.prepared.source.shape, self.prepared.source.affine, source)
        by_hash = {getattr(s, "weights_sha256", None): s for s in swap_saes}
        shape = self.prepared.source.shape
        edits = [edit_from_json(data, source, by_hash, shape=shape, where=f"edits[{i}]") for i, data in enumerate(recipe.edits)]
        for i, edit in enumerate(edits):  # every edit is checked against this SAE and case before any is applied
            try:
                self._check([edit])
            except SegLensError as exc:
                raise InputFileError(source, f"edits[{i}]: {one_line(exc)}") from None
        steps = [data.get("step") for data in recipe.edits]
        if edits and all(step is None for step in steps):  # a recipe without steps: one step, each slice decoded once
            groups = [edits]
        else:  # the Apply steps as they were made (a step's label rule reads the labels before it)
            groups = []
            for i, edit in enumerate(edits):
                if i == 0 or steps[i] is None or steps[i] != steps[i - 1]:
                    groups.append([])
                groups[-1].append(edit)
        kept = self.checkpoint()
        self.reset()
        try:
            for number, group in enumerate(groups):
                step = None if progress is None else (lambda done, total, n=number: progress(n * total + done, len(groups) * total))
                self.apply(group, progress=step)
        except BaseException:  # cancelled or failed: the edits the user had are back
            self.restore(kept)
            raise
        return self.labels

    def export(self, path: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
        """Write the current labels as NIfTI on the input's exact voxel grid (2023 label values) and the recipe
        beside it (``name.recipe.json``). Neither file replaces an existing one unless ``overwrite``; both are
        checked before either is written.

        Returns:
            ``(mask_path, recipe_path)``.
        """
        path = Path(path)
        recipe_path = recipe_path_for(path)
        refuse_existing(path, overwrite)
        refuse_existing(recipe_path, overwrite)
        labels = self.labels
        write_image(labels, self.prepared.source.reference, path, overwrite=overwrite, dtype=np.uint8)
        recipe = self.recipe()
        recipe.output = {"mask": path.name, "voxels_sha256": hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()).hexdigest()}
        recipe.save(recipe_path, overwrite=overwrite)
        return path, recipe_path
