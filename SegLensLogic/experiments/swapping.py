"""Feature swapping (Med-SegLens section 5.3, appendix E): do aligned latents carry over between cohorts?

Both SAEs encode the *same* activations ``h`` of one model's hook point (so they must share its activation space).
For latents ``I`` of SAE A with aligned partners ``pi(I)`` in SAE B::

    z~_i = z^B_pi(i)  for i in I,   z~_i = z^A_i otherwise
    h~   = h + W_dec^A^T (z~ - z^A)          (the SAE's reconstruction error stays in h~)

and ``h~`` runs through the rest of the network. Reported per group of latents (shared, specific):

- ``spatial_correlation``: per swapped latent, the Pearson correlation over positions between its original map
  ``z^A_i`` and the map swapped in, ``z^B_pi(i)``; the mean over latents active on the images. Shared latents
  should keep their spatial structure (high), specific ones not (figure 4);
- ``dice_original`` / ``dice_swapped`` / ``dice_change``: mean class Dice against the ground truth without and
  with the swap, and ``mask_agreement``: Dice overlap of the tumour voxels of the two predictions.

The swap is a steering edit (``LatentEdit(mode="swap")``) on the case encoded once
(:func:`~SegLensLogic.steering.encoded.encode_case`), so feature swapping and interactive steering edit activations
in exactly the same way, and each group re-runs only the layers after the hook.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..data.cases import CaseImages, read_case
from ..segmentation.scores import segmentation_scores
from ..sae.activations import feature_map_to_vectors


def swap_codes(encoded, sae_a, sae_b, latents: tuple[int, ...], partners: tuple[int, ...], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z^A_I, z^B_pi(I))`` at every position of an encoded case's cached hook activations, ``(P, |I|)`` each."""
    activations = encoded.forward.activations
    z_a, z_b = [], []
    for start in range(0, len(activations), chunk):
        vectors = feature_map_to_vectors(activations[start : start + chunk].float())
        z_a.append(sae_a.latent_codes(vectors, latents).cpu())
        z_b.append(sae_b.latent_codes(vectors, partners).cpu())
    return torch.cat(z_a), torch.cat(z_b)


def _spatial_correlations(record: list) -> np.ndarray:
    """Per swapped latent, the correlation over all positions of its original and swapped-in maps (NaN if flat)."""
    z_a = torch.cat([r[0] for r in record]).double()
    z_b = torch.cat([r[1] for r in record]).double()
    z_a, z_b = z_a - z_a.mean(0), z_b - z_b.mean(0)
    denom = (z_a.norm(dim=0) * z_b.norm(dim=0)).numpy()
    cov = (z_a * z_b).sum(0).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 1e-12, cov / denom, np.nan)


def swap_groups(alignment, n_latents: int | None = None, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"shared": (latents_a, partners_b), "specific": (...)}`` from a :class:`LatentAlignment`.

    Specific latents take their matched (not shared) partner. Both groups have the same size (``n_latents``, or
    the smaller group's size), drawn with a seeded generator so that the comparison is fair.
    """
    partner = alignment.partner
    shared = alignment.shared_mask()
    groups = {"shared": np.flatnonzero(shared), "specific": np.flatnonzero(~shared & (partner >= 0))}
    size = min(len(g) for g in groups.values()) if n_latents is None else n_latents
    rng = np.random.default_rng(seed)
    out = {}
    for name, latents in groups.items():
        chosen = np.sort(rng.choice(latents, min(size, len(latents)), replace=False)) if len(latents) else latents
        out[name] = (chosen, partner[chosen])
    return out


@torch.no_grad()
def feature_swap(model, sae_a, sae_b, alignment, cases: Iterable, n_latents: int | None = None, seed: int = 0) -> list[dict]:
    """Swap shared and specific latents of A for their partners in B on labelled cases; one row per group.

    Args:
        model: the segmenter whose hook activations both SAEs encode.
        sae_a, sae_b: the two SAEs (same ``d_in`` as the hook point).
        alignment: a :class:`~SegLensLogic.alignment.latent_alignment.LatentAlignment` of A (rows) to B.
        cases: case folders or :class:`Case` objects (a :class:`Cohort` works).
        n_latents: latents per group (default: the smaller group's size).

    Returns:
        ``[{"group", "latents", "spatial_correlation", "latents_active", "dice_original", "dice_swapped",
        "dice_change", "mask_agreement", "cases"}]``.
    """
    from ..steering.encoded import encode_case
    from ..steering.interventions import LatentEdit

    device = next(model.parameters()).device
    sae_a, sae_b = sae_a.to(device), sae_b.to(device)
    groups = swap_groups(alignment, n_latents, seed)
    # Each case runs through the encoder once; every group's swap re-runs only the layers after the hook.
    encoded_cases = []
    for case in cases:
        images = case if isinstance(case, CaseImages) else read_case(case, modalities=model.config.modalities)
        encoded_cases.append((images, encode_case(model, sae_a, images)))
    rows = []
    for name, (latents, partners) in groups.items():
        if len(latents) == 0:
            rows.append({"group": name, "latents": 0, "spatial_correlation": float("nan"), "latents_active": 0,
                         "dice_original": float("nan"), "dice_swapped": float("nan"), "dice_change": float("nan"),
                         "mask_agreement": float("nan"), "cases": len(encoded_cases)})  # fmt: skip
            continue
        latents, partners = tuple(int(j) for j in latents), tuple(int(j) for j in partners)
        edit = LatentEdit(latents=latents, mode="swap", swap_sae=sae_b, partners=partners).check(sae_a)
        record: list = []
        dice_before, dice_after, agreement = [], [], []
        for images, encoded in encoded_cases:
            record.append(swap_codes(encoded, sae_a, sae_b, latents, partners))
            plain, swapped = encoded.labels, encoded.steer(sae_a, [edit])
            fg_a, fg_b = plain > 0, swapped > 0
            total = fg_a.sum() + fg_b.sum()
            agreement.append(1.0 if total == 0 else float(2 * (fg_a & fg_b).sum() / total))
            if images.label is not None:
                dice_before.append(segmentation_scores(plain, images.label, model.config.class_names)["dice_mean"])
                dice_after.append(segmentation_scores(swapped, images.label, model.config.class_names)["dice_mean"])
        correlations = _spatial_correlations(record)
        active = np.isfinite(correlations)
        before = float(np.mean(dice_before)) if dice_before else float("nan")
        after = float(np.mean(dice_after)) if dice_after else float("nan")
        rows.append({
            "group": name, "latents": int(len(latents)),
            "spatial_correlation": float(np.mean(correlations[active])) if active.any() else float("nan"),
            "latents_active": int(active.sum()),
            "dice_original": before, "dice_swapped": after, "dice_change": after - before,
            "mask_agreement": float(np.mean(agreement)), "cases": len(encoded_cases),
        })  # fmt: skip
    return rows
