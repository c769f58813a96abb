"""Automatic interpretation of SAE latents (Med-SegLens section 3.5, appendix C).

For every latent: its top-K activating slices over a cohort (:mod:`.cohort`), geometry and mask metrics of its
heatmaps (:mod:`.metrics`), a category and description from deterministic rules (:mod:`.labeller`), split-half
stability (:mod:`.stability`), the labels file (:mod:`.labels`) and figures (:mod:`.figures`).
"""

from .labeller import LabellingRules, LatentLabel, categorise, describe, label_latent
from .labels import LABELS_KIND, LatentLabels, build_labels_document, load_latent_labels, write_latent_labels
from .metrics import MetricOptions, metric_names, slice_context, slice_metrics

__all__ = [
    "LabellingRules", "LatentLabel", "categorise", "describe", "label_latent",
    "LABELS_KIND", "LatentLabels", "build_labels_document", "load_latent_labels", "write_latent_labels",
    "MetricOptions", "metric_names", "slice_context", "slice_metrics", "interpret_sae",
]  # fmt: skip


def __getattr__(name):
    # interpret_sae pulls in torch and the networks; the labels reader (used by steering, Slicer) does not need them.
    if name == "interpret_sae":
        from .interpret import interpret_sae

        return interpret_sae
    raise AttributeError(name)
