"""INTERIM: re-segmentation with edited SAE latents through ``predict_volume(activation_edit=...)``.

Stands in for ``SegLensLogic.steering.resegment`` (the lead's package, being written) until it lands; to be
deleted then. Same arithmetic as the contract's ``steer_activations``: ``h' = h + W_dec^T (z' - z)``, so the
SAE's reconstruction error is kept and an edit that changes nothing changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..inference import default_batch_size
from ..sae.activations import brain_fraction_on_grid, feature_map_to_vectors, vectors_to_feature_map


@dataclass(frozen=True)
class Edit:
    """Mirror of the contract's ``LatentEdit`` (volume region only)."""

    latents: tuple[int, ...]
    mode: str = "scale"  # scale | add | zero
    alpha: float = 1.0
    where: str = "active"  # active | everywhere


def _edited_codes(z: torch.Tensor, edit: Edit) -> torch.Tensor:
    z = z.clone()
    idx = torch.as_tensor(edit.latents, dtype=torch.long, device=z.device)
    sub = z[:, idx]
    if edit.mode == "scale":
        new = sub * edit.alpha
    elif edit.mode == "zero":
        new = torch.zeros_like(sub)
    elif edit.mode == "add":
        new = sub + edit.alpha
        if edit.where == "active":
            new = torch.where(sub > 0, new, sub)
    else:
        raise ValueError(f"unknown edit mode '{edit.mode}'")
    z[:, idx] = new
    return z


def changed_slices(codes, edits: list[Edit]) -> np.ndarray:
    """RAS slice indices an edit can change: where an edited latent is active (all brain slices for ``add``
    everywhere). Other slices keep the unedited labels, exactly."""
    if any(e.mode == "add" and e.where == "everywhere" for e in edits):
        return codes.slices
    latents = np.unique(np.concatenate([np.asarray(e.latents, dtype=np.int64) for e in edits]))
    hits = np.flatnonzero(np.isin(codes.latents, latents))
    per_slice = codes.grid[0] * codes.grid[1]
    return codes.slices[np.unique(codes.positions_of_pairs(hits) // per_slice)]


@torch.no_grad()
def resegment(model, sae, prepared, edits: list[Edit], base_labels: np.ndarray, codes, min_brain_fraction: float = 0.5) -> np.ndarray:
    """Labels on the input grid with ``edits`` applied at the SAE's hook point; only the slices an edit can change
    are run again (``base_labels``: the unedited prediction on the input grid; ``codes``: its volume codes)."""
    device = next(model.parameters()).device
    sae = sae.to(device)
    theta = sae._theta()
    labels = prepared.orientation.apply(base_labels).copy()
    slices = changed_slices(codes, edits)
    step = default_batch_size(model)
    for start in range(0, len(slices), step):
        batch = slices[start : start + step]
        activations, cache = model.encode(prepared.model_input(batch).to(device))
        n, _, *spatial = activations.shape
        h = feature_map_to_vectors(activations).float()
        pre = sae.pre_activations(h)
        # Positions mostly outside the brain carry no codes (as in encode_volume): left untouched.
        inside = (brain_fraction_on_grid(prepared, batch, tuple(spatial)).flatten().to(device) >= min_brain_fraction)[:, None]
        z = pre * (pre > theta) * inside
        z_new = z
        for edit in edits:
            z_new = _edited_codes(z_new, edit) * inside
        delta = ((z_new - z) @ sae.W_dec) / sae.norm_scale
        logits = model.decode(vectors_to_feature_map(h + delta, n, tuple(spatial)).to(activations.dtype), cache)
        logits = prepared.geometry.from_model(logits.float())
        labels[:, :, batch] = logits.max(dim=1).indices.to(torch.uint8).cpu().numpy().transpose(1, 2, 0)
    labels[~prepared.brain_mask] = 0
    return prepared.to_input_grid(labels)
