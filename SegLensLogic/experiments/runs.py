"""One case as every experiment sees it: the unedited prediction, its softmax, its SAE codes, its ground truth,
and re-segmentation with edited latents; plus the per-class scores the tables report.

A :class:`CaseRun` is computed once per case and reused by every sweep, baseline and table, so an experiment
costs one unedited forward pass per case plus one partial forward pass per (case, edit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data.cases import Case, read_case
from ..data.cohort import Cohort
from ..data.preprocessing import PreparedCase
from ..errors import SegLensError
from ..segmentation.scores import confusion_matrix, overlap_scores
from ..networks.segmenter import Segmenter
from ..sae.codes import VolumeCodes
from ..sae.model import BatchTopKSAE

# Short names of the tumour classes (BraTS 2023 scheme), used as table columns.
TUMOUR_SHORT = {1: "NC", 2: "ED", 3: "ET"}


def class_short_names(class_names: Sequence[str]) -> dict[int, str]:
    """Column name of each foreground class: ``NC/ED/ET`` for the 4-class tumour scheme, else the class name."""
    if len(class_names) == 4:
        return dict(TUMOUR_SHORT)
    return {i: name.replace(" ", "_") for i, name in enumerate(class_names) if i > 0}


def class_scores(prediction: np.ndarray, truth: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Per-class Dice, precision and recall and their mean Dice (BraTS conventions for empty structures).

    Returns:
        ``dice_<c>``, ``precision_<c>``, ``recall_<c>`` for each foreground class ``c`` (``NC, ED, ET`` for
        tumours) and ``dice_mean`` over the foreground classes; all in [0, 1].
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in shape")
    names = class_short_names(class_names)
    top = int(max(prediction.max(initial=0), truth.max(initial=0))) + 1
    confusion = confusion_matrix(prediction, truth, max(len(class_names), top))
    scores: dict[str, float] = {}
    for index, short in names.items():
        scores[f"dice_{short}"], scores[f"precision_{short}"], scores[f"recall_{short}"] = overlap_scores(confusion, (index,))
    scores["dice_mean"] = float(np.mean([scores[f"dice_{s}"] for s in names.values()]))
    return scores


def error_counts(prediction: np.ndarray, truth: np.ndarray, cls: int) -> tuple[int, int]:
    """``(false positives, false negatives)`` voxel counts of class ``cls``."""
    pred, true = prediction == cls, truth == cls
    return int((pred & ~true).sum()), int((~pred & true).sum())


@dataclass
class CaseRun:
    """A labelled case segmented once by the unedited model.

    Attributes:
        case_id: the case's name.
        prepared: the preprocessed case (RAS arrays, geometry), reused by every re-segmentation.
        truth: ground-truth SegLens classes on the input grid (file order).
        labels: the unedited prediction on the input grid, ``uint8``.
        probabilities: its softmax ``(C, I, J, K)`` float16 (for uncertainty filtering).
        codes: sparse SAE codes of the volume.
        class_names: the model's classes.
    """

    case_id: str
    prepared: PreparedCase = field(repr=False)
    truth: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    probabilities: np.ndarray = field(repr=False)
    codes: VolumeCodes = field(repr=False)
    class_names: tuple[str, ...] = ()
    _base_scores: dict | None = field(default=None, repr=False)
    # The case's encoder outputs for re-segmentation (a CachedForward), kept with the run itself: cohorts of
    # different populations may hold cases of the same id (degraded copies keep their names).
    forward: object | None = field(default=None, repr=False)

    def score(self, labels: np.ndarray) -> dict[str, float]:
        """Per-class scores of ``labels`` against this case's ground truth (:func:`class_scores`)."""
        return class_scores(labels, self.truth, self.class_names)

    @property
    def base_scores(self) -> dict[str, float]:
        """Scores of the unedited prediction."""
        if self._base_scores is None:
            self._base_scores = self.score(self.labels)
        return self._base_scores

    def usage(self) -> np.ndarray:
        """Mean activation of every latent over the case's encoded positions, ``(d_sae,)`` float64."""
        totals = np.bincount(self.codes.latents, weights=self.codes.values, minlength=self.codes.d_sae)
        return totals / max(self.codes.num_positions, 1)

    def class_fraction(self, cls: int) -> tuple[np.ndarray, np.ndarray]:
        """``(fraction, total)`` per latent: the share of its activation mass that falls on ground-truth class
        ``cls`` (positions weighted by the fraction of their patch in that class), and its total mass."""
        weights = self.codes.region_weights(region=self.truth == cls)
        values = self.codes.values
        inside = np.bincount(self.codes.latents, weights=values * weights[self.codes.positions_of()], minlength=self.codes.d_sae)
        total = np.bincount(self.codes.latents, weights=values, minlength=self.codes.d_sae)
        return np.divide(inside, total, out=np.zeros_like(total), where=total > 0), total


class Experiment:
    """A segmenter and its SAE, ready to segment cases with and without latent edits.

    Args:
        model: the segmenter (on its device, eval mode).
        sae: the SAE trained at the model's hook point.
        log: progress messages (one line per case).
    """

    def __init__(self, model: Segmenter, sae: BatchTopKSAE, log: Callable[[str], None] | None = None):
        if sae.config.hook_point and sae.config.hook_point != model.config.hook_point:
            raise SegLensError(
                f"the SAE was trained at hook '{sae.config.hook_point}' but the model's hook is '{model.config.hook_point}'"
            )
        self.model = model
        self.sae = sae.to(next(model.parameters()).device)
        self.class_names = tuple(model.config.class_names)
        self.log = log or (lambda message: None)

    def run_case(self, case: Case) -> CaseRun:
        """Read, segment (with softmax) and encode one labelled case: its encoder runs once (an
        :class:`~SegLensLogic.steering.encoded.EncodedCase`, kept for every later re-segmentation)."""
        from ..steering.encoded import encode_case

        config = self.model.config
        images = read_case(case, modalities=config.modalities, allow_missing=config.accepts_missing_modalities)
        if images.label is None:
            raise SegLensError(f"case '{case.case_id}' has no ground-truth label map; experiments need labelled cases")
        encoded = encode_case(self.model, self.sae, images, probabilities=True)
        run = CaseRun(
            case_id=case.case_id,
            prepared=encoded.prepared,
            truth=images.label,
            labels=encoded.labels,
            probabilities=encoded.probabilities,
            codes=encoded.codes,
            class_names=self.class_names,
            forward=encoded.forward,
        )
        self.log(f"  {case.case_id}: mean Dice {run.base_scores['dice_mean']:.3f}")
        return run

    def run_cohort(self, cohort: Cohort | Iterable[Case]) -> list[CaseRun]:
        """:meth:`run_case` for every labelled case of a cohort (unlabelled ones are skipped with a message)."""
        runs = []
        for case in cohort:
            if case.label is None:
                self.log(f"  {case.case_id}: no label map, skipped")
                continue
            runs.append(self.run_case(case))
        if not runs:
            raise SegLensError(f"cohort '{getattr(cohort, 'name', '?')}' has no labelled case")
        return runs

    def steer(self, run: CaseRun, latents: Sequence[int], mode: str, alpha: float = 1.0, where: str = "active") -> np.ndarray:
        """Labels of ``run`` re-segmented with ``latents`` edited (``mode`` scale / add / zero by ``alpha``)."""
        return self.steer_many(run, [(tuple(int(j) for j in latents), mode, float(alpha), where)])

    def steer_many(self, run: CaseRun, edits: Sequence[tuple[tuple[int, ...], str, float, str]]) -> np.ndarray:
        """Labels with several edits applied together: ``[(latents, mode, alpha, where), ...]``.

        Goes through the steering package's cached partial forward: the case's encoder outputs are kept (one
        :class:`~SegLensLogic.steering.resegment.CachedForward` per case) and only slices whose activations an
        edit changes are decoded again; the others keep the unedited labels.
        """
        from ..steering import LatentEdit
        from ..steering.resegment import CachedForward

        if run.forward is None:
            run.forward = CachedForward(self.model, run.prepared, hook=self.sae.config.hook_point)
        forward = run.forward
        latent_edits = [LatentEdit(tuple(int(j) for j in latents), mode=m, alpha=float(a), where=w).check(self.sae) for latents, m, a, w in edits]
        deltas = forward.deltas(self.sae, latent_edits)
        base = run.prepared.orientation.apply(run.labels)
        return run.prepared.to_input_grid(forward.relabel(base, list(deltas), deltas))

    def forget(self, run: CaseRun) -> None:
        """Drop the cached encoder outputs of a case (memory) once its sweeps are done."""
        run.forward = None
