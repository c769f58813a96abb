"""``seglens demo``: the way a volume travels, end to end, on a machine with no data and no GPU.

Without ``--data`` it writes a synthetic cohort of brain-tumour phantoms (BraTS 2023 naming, exact labels); with
``--data`` it uses a real labelled cohort. Then: train a small U-Net for a few minutes, evaluate it on held-out
cases, segment one of them onto its exact voxel grid, and capture the activations at the model's mid-encoder
hook point (the vectors the sparse autoencoders of Med-SegLens decompose) as a map on the same grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .data.cases import read_case
from .data.cohort import Cohort, load_cohort
from .data.io import write_image
from .data.phantoms import write_phantom_cohort
from .errors import OutputExistsError
from .evaluation import evaluate_cohort, format_table, write_csv
from .inference import prepare_for_model, segment_case
from .training import TrainingOptions, train_segmenter

DEMO_UNET_FEATURES = [16, 16, 32, 64, 128, 16]


def hook_activation_norm(model, case) -> np.ndarray:
    """L2 norm of the hook-point activation vector at every position, upsampled onto the case's voxel grid."""
    prepared = prepare_for_model(model, case)
    device = next(model.parameters()).device
    volume = np.zeros(prepared.brain_mask.shape, dtype=np.float32)
    slices = prepared.brain_slices()
    with torch.no_grad():
        for start in range(0, len(slices), 16):
            batch = slices[start : start + 16]
            _, activations = model.capture(prepared.model_input(batch).to(device))
            norm = activations.norm(dim=1, keepdim=True)
            norm = torch.nn.functional.interpolate(norm, size=(model.config.image_size,) * 2, mode="bilinear", align_corners=False)
            volume[:, :, batch] = prepared.geometry.from_model(norm)[:, 0].cpu().numpy().transpose(1, 2, 0)
    volume[~prepared.brain_mask] = 0
    return prepared.to_input_grid(volume)


def run_demo(
    out: str | Path,
    data: str | Path | None = None,
    minutes: float = 2.0,
    n_phantoms: int = 8,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run the demo into ``out``; returns the files it wrote by role."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    if data is None:
        cohort_dir = out / "phantom-cohort"
        log(f"1. Writing {n_phantoms} synthetic brain-tumour phantoms to {cohort_dir} (BraTS 2023 naming)")
        if not cohort_dir.exists():
            write_phantom_cohort(cohort_dir, n_phantoms, seed=0)
        cohort = load_cohort(cohort_dir, name="phantoms")
        image_size, val_cases = 96, 2
    else:
        cohort = load_cohort(data)
        log(f"1. Using cohort '{cohort.name}' from {data} ({len(cohort)} cases)")
        image_size, val_cases = 128, max(1, round(0.25 * len(cohort)))
    train_cohort, test_cohort = Cohort(cohort.name, cohort.cases[:-val_cases]), Cohort(f"{cohort.name}-test", cohort.cases[-val_cases:])

    log(f"2. Training a small U-Net for {minutes:g} min on {len(train_cohort)} cases")
    model_dir = out / "model"
    result = train_segmenter(
        train_cohort,
        model_dir,
        arch="unet",
        image_size=image_size,
        arch_options={"features": DEMO_UNET_FEATURES},
        options=TrainingOptions(epochs=None, minutes=minutes, batch_size=16, learning_rate=3e-3, slices_per_epoch=256, val_cases=1),
        overwrite=True,
        log=log,
    )
    model = result.model
    written["model"] = model_dir

    log(f"3. Evaluating on {len(test_cohort)} held-out case(s)")
    rows = evaluate_cohort(model, test_cohort, log=log)
    log(format_table(rows))
    written["evaluation"] = write_csv(rows, out / "evaluation.csv", overwrite=True)

    case = test_cohort[0]
    log(f"4. Segmenting {case.case_id} onto its own voxel grid")
    mask_path = out / f"{case.case_id}-seglens.nii.gz"
    prediction = segment_case(model, case, mask_path, overwrite=True)
    written["segmentation"] = mask_path

    hook = model.config.hook_point
    channels, height, width = model.hook_points()[hook]
    log(f"5. Activations at hook point '{hook}': {channels} channels at {height}x{width} positions per slice")
    norm = hook_activation_norm(model, prediction.prepared)
    written["activations"] = write_image(norm, prediction.prepared.source.reference, out / f"{case.case_id}-{hook}-norm.nii.gz", overwrite=True)

    log("Done. Files written:")
    for role, path in written.items():
        log(f"  {role:12s} {path}")
    return written
