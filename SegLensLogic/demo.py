"""``seglens demo``: the way a volume travels, end to end, on a machine with no data and no GPU.

Without ``--data`` it writes a synthetic cohort of brain-tumour phantoms (BraTS 2023 naming, exact labels); with
``--data`` it uses a real labelled cohort. Then: train a small U-Net for a few minutes, evaluate it on held-out
cases, segment one of them onto its exact voxel grid, capture the activations at the model's mid-encoder hook
point, train a BatchTopK sparse autoencoder on them, measure the Dice kept with SAE reconstructions, and write
the heatmap of the latent most active in the predicted tumour on the case's grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .data.cohort import Cohort, load_cohort
from .data.io import write_image
from .data.phantoms import write_phantom_cohort
from .errors import OutputExistsError
from .evaluation import evaluate_cohort, format_table, write_csv
from .inference import prepare_for_model, segment_case
from .sae import ExtractionOptions, SAETrainingOptions, extract_activations, train_sae
from .sae.codes import encode_volume, save_heatmap
from .sae.evaluation import dice_recovered
from .sae.training import save_training_report
from .training import TrainingOptions, train_segmenter

DEMO_UNET_FEATURES = [16, 16, 32, 64, 128, 16]
# MNI152 phantoms at about 2 x 2 x 2.4 mm: small enough to train on within the demo's minutes on two CPU cores.
DEMO_PHANTOM_SHAPE = (80, 96, 64)


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
            write_phantom_cohort(cohort_dir, n_phantoms, seed=0, shape=DEMO_PHANTOM_SHAPE, population="adult")
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

    log(f"6. Sparse autoencoder on '{hook}': extracting activations of the training cases")
    store = extract_activations(model, train_cohort, out / "activations", ExtractionOptions(), model_dir=model_dir, overwrite=True, log=log)
    sae, report = train_sae(store, SAETrainingOptions(k=32, expansion=16, batch_size=1024, epochs=20, learning_rate=1e-3, log_every=100), log=log)
    sae.save(out / "sae", overwrite=True)
    save_training_report(report, out / "sae")
    written["sae"] = out / "sae"
    recovered = dice_recovered(model, sae, Cohort("test", [case]))
    log(
        f"   Dice with SAE reconstructions at the hook: {recovered['dice_sae']:.3f} "
        f"(model {recovered['dice_model']:.3f}, mask agreement {recovered['mask_agreement']:.3f})"
    )
    codes = encode_volume(model, sae, prediction.prepared)
    tumour = prediction.labels > 0
    top = codes.top_latents(5, region=tumour if tumour.any() else None)
    log(
        f"7. Sparse codes of {case.case_id}: mean {codes.mean_l0():.1f} active latents per position, "
        f"{codes.nbytes / 1e6:.2f} MB ({100 * codes.nbytes / codes.dense_nbytes:.1f}% of dense)"
    )
    log("   Most active latents inside the predicted tumour: " + ", ".join(f"{j} ({v:.0f})" for j, v in top))
    if top:
        written["heatmap"] = save_heatmap(codes, top[0][0], out / f"{case.case_id}-latent{top[0][0]:05d}.nii.gz", overwrite=True)

    log("8. Bundle: model, SAE, classes and preprocessing in one folder that loads in one call")
    from .bundle import build_bundle
    from .report import render_report

    bundle = build_bundle(model_dir, out / "sae", out / "bundle", name=cohort.name, overwrite=True)
    written["bundle"] = bundle.root
    mean = next(row for row in rows if row.get("case") == "mean")
    holdout = report.get("holdout", {})
    results = {
        "title": "SegLens demo audit report",
        "subtitle": f"Cohort '{cohort.name}' ({'synthetic phantoms' if data is None else data}).",
        "cohorts": [{"name": cohort.name, "population": cohort.name if data is None else "-", "n_cases": len(cohort),
                     "source": "MNI152 phantoms" if data is None else str(data)}],
        "models": [{"name": cohort.name, "cohort": train_cohort.name, "arch": model.config.arch,
                    "dice": {test_cohort.name: mean.get("dice_mean")}}],
        "sae_quality": [{"model": cohort.name, "d_sae": sae.config.d_sae, "k": sae.config.k,
                         "explained_variance": holdout.get("explained_variance"), "l0": holdout.get("l0"),
                         "dead_fraction": holdout.get("dead_fraction"),
                         "dice_recovered": recovered["dice_sae"] / recovered["dice_model"] if recovered["dice_model"] else None}],
    }  # fmt: skip
    if top:
        z = int(np.argmax(codes.heatmap(top[0][0]).sum(axis=(0, 1))))
        image = prediction.prepared.source.images[model.config.modalities[-1]][:, :, z]
        gallery = [{"id": j, "image": image.T[::-1], "heatmap": codes.heatmap(j)[:, :, z].T[::-1]} for j, _ in top[:3]]
        results["latent_galleries"] = [{"model": cohort.name, "categories": {"most active in the predicted tumour (not yet labelled)": gallery}}]
    written["report"] = render_report(results, out / "report.html", overwrite=True)

    log("Done. Files written:")
    for role, path in written.items():
        log(f"  {role:12s} {path}")
    return written
