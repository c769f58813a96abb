"""Automatic interpretation of SAE latents (Med-SegLens section 3.5, appendix C).

For every latent: its top-K activating slices over a cohort (:mod:`.cohort`), geometry and mask metrics of its
heatmaps (:mod:`.metrics`), a category and description from deterministic rules (:mod:`.labeller`), split-half
stability (:mod:`.stability`), the labels file (:mod:`.labels`) and figures (:mod:`.figures`).

The names below are imported on first use (PEP 562): importing the package (as ``seglens interpret --help`` does)
imports neither SciPy nor torch, and only :func:`interpret_sae` pulls in torch and the networks.
"""

__all__ = [
    "LabellingRules", "LatentLabel", "categorise", "describe", "label_latent",
    "LABELS_KIND", "LatentLabels", "build_labels_document", "load_latent_labels", "write_latent_labels",
    "MetricOptions", "metric_names", "slice_context", "slice_metrics", "interpret_sae",
]  # fmt: skip


def __getattr__(name: str):
    if name in ("LabellingRules", "LatentLabel", "categorise", "describe", "label_latent"):
        from . import labeller as module
    elif name in ("LABELS_KIND", "LatentLabels", "build_labels_document", "load_latent_labels", "write_latent_labels"):
        from . import labels as module
    elif name in ("MetricOptions", "metric_names", "slice_context", "slice_metrics"):
        from . import metrics as module
    elif name == "interpret_sae":
        from . import interpret as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
