"""Whole-volume prediction, slice by slice, back on the input's exact voxel grid.

A volume travels: read the case -> :func:`~SegLensLogic.data.preprocessing.prepare_case` (RAS, brain mask,
z-score, slices at model size) -> the segmenter on batches of axial slices that contain brain -> logits resized
back to each slice -> argmax -> labels reoriented to the input file's voxel order -> written with its affine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.cases import Case, CaseImages, find_case, read_case
from ..data.io import write_image
from ..data.preprocessing import PreparedCase, prepare_case
from ..errors import SegLensError, refuse_existing
from ..networks.segmenter import Segmenter

# progress(done, total) -> False cancels the prediction.
ProgressCallback = Callable[[int, int], "bool | None"]


def default_batch_size(model: Segmenter) -> int:
    """Axial slices per forward pass: 16 on a GPU; on the CPU the architecture's own ``cpu_batch_size``
    (U-Net 1, SegFormer 4): there, batches of full-resolution feature maps fall out of cache and a U-Net runs
    slower per slice in a batch than alone (measured with ``benchmarks/segment_volume.py``)."""
    device = next(model.parameters()).device
    return 16 if device.type == "cuda" else model.cpu_batch_size


class PredictionCancelled(SegLensError):
    """The progress callback asked to stop."""


@dataclass
class VolumePrediction:
    """A segmenter's output for one volume.

    Attributes:
        labels: ``uint8`` class per voxel on the input's grid, shape ``prepared.source.shape`` (file order).
        probabilities: softmax ``(K, I, J, K)`` float16 on the input's grid when requested, else None.
        prepared: the preprocessed case (RAS arrays, slice geometry, inverse mapping).
        slices_run: axial slice indices (RAS order) the model ran on.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    prepared: PreparedCase = field(repr=False)
    slices_run: np.ndarray = field(repr=False)


def prepare_for_model(
    model: Segmenter, case: Case | CaseImages | PreparedCase | str | Path, with_label: bool = True
) -> PreparedCase:
    """Read and preprocess ``case`` (a folder, a :class:`Case`, or images already read) for ``model``.

    ``with_label=False`` leaves a case's label file unread (segmenting needs only the images the model takes)."""
    if isinstance(case, PreparedCase):
        if (
            case.modalities != tuple(model.config.modalities)
            or case.geometry.size != model.config.image_size
            or (case.geometry.crop is not None and not model.config.crop_to_brain)
        ):
            raise ValueError("the prepared case was made for another model's inputs")
        return case
    if isinstance(case, str | Path):
        case = find_case(case)
    if isinstance(case, Case):
        case = read_case(case, modalities=model.config.modalities, with_label=with_label,
                         allow_missing=model.config.accepts_missing_modalities)  # fmt: skip
    return prepare_case(case, model.config.modalities, model.config.image_size, crop_to_brain=model.config.crop_to_brain)


def labels_from_logits(logits: torch.Tensor) -> np.ndarray:
    """Class per pixel of logits ``(N, K, X, Y)`` already on the slice grid: ``uint8 (X, Y, N)``, ready to be
    written into a RAS volume ``[:, :, slices]``. Shared by whole-volume prediction and steering so that both
    turn logits into labels the same way, bit for bit."""
    # max().indices: torch's CPU argmax over the channel axis is several times slower.
    return logits.max(dim=1).indices.to(torch.uint8).cpu().numpy().transpose(1, 2, 0)


@torch.no_grad()
def predict_volume(
    model: Segmenter,
    case: Case | CaseImages | PreparedCase | str | Path,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    skip_empty: bool = True,
    return_probabilities: bool = False,
    activation_edit: Callable[[torch.Tensor, np.ndarray], torch.Tensor] | None = None,
) -> VolumePrediction:
    """Segment a whole volume slice by slice, in batches, on the model's device.

    Args:
        model: a segmenter (its device is used; load it with ``device=`` to choose).
        case: a case folder, :class:`Case`, :class:`CaseImages` or :class:`PreparedCase`.
        batch_size: axial slices per forward pass (default: :func:`default_batch_size` of the model's device).
        progress: called as ``progress(slices_done, slices_total)``; returning False cancels.
        skip_empty: run only slices that contain brain (the rest is background). ``False`` runs every slice.
        return_probabilities: also return softmax probabilities on the input grid (float16).
        activation_edit: ``edit(activations, slice_indices) -> activations`` applied at the model's hook point
            before the rest of the network runs (SAE reconstruction, steering).

    Returns:
        A :class:`VolumePrediction`; voxels outside the brain mask are background.
    """
    prepared = prepare_for_model(model, case)
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(model)
    model.eval()
    slices = prepared.brain_slices() if skip_empty else np.arange(prepared.num_slices)
    x_size, y_size, z_size = prepared.brain_mask.shape
    labels = np.zeros((x_size, y_size, z_size), dtype=np.uint8)
    probabilities = None
    if return_probabilities:
        probabilities = np.zeros((x_size, y_size, z_size, model.config.num_classes), dtype=np.float16)
        probabilities[..., 0] = 1.0
    total = len(slices)
    for start in range(0, total, batch_size):
        batch = slices[start : start + batch_size]
        x = prepared.model_input(batch).to(device)
        if activation_edit is None:
            logits = model(x)
        else:
            activations, cache = model.encode(x)
            logits = model.decode(activation_edit(activations, batch), cache)
        logits = prepared.geometry.from_model(logits.float())  # (N, K, X, Y)
        labels[:, :, batch] = labels_from_logits(logits)
        if probabilities is not None:
            probs = torch.softmax(logits, dim=1).cpu().numpy().transpose(2, 3, 0, 1)
            probabilities[:, :, batch, :] = probs.astype(np.float16)
        if progress is not None and progress(min(start + batch_size, total), total) is False:
            raise PredictionCancelled("segmentation cancelled")
    labels[~prepared.brain_mask] = 0
    if probabilities is not None:
        probabilities[~prepared.brain_mask] = np.eye(model.config.num_classes, dtype=np.float16)[0]
        probabilities = np.moveaxis(prepared.to_input_grid(probabilities), 3, 0)
    return VolumePrediction(
        labels=prepared.to_input_grid(labels),
        probabilities=probabilities,
        prepared=prepared,
        slices_run=slices,
    )


def segment_case(
    model: Segmenter,
    case: Case | CaseImages | str | Path,
    out_path: str | Path,
    overwrite: bool = False,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
) -> VolumePrediction:
    """Segment a case and write the label map (2023 scheme) as NIfTI on the input's exact voxel grid.

    The output's existence is checked before any work, so a refused overwrite costs nothing. Only the images the
    model takes are read (not the case's label file).
    """
    out_path = refuse_existing(out_path, overwrite)
    prepared = prepare_for_model(model, case, with_label=False)
    prediction = predict_volume(model, prepared, batch_size=batch_size, progress=progress)
    write_image(prediction.labels, prediction.prepared.source.reference, out_path, overwrite=overwrite, dtype=np.uint8)
    return prediction
