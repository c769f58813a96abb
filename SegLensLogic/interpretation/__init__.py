"""Automatic interpretation of SAE latents (Med-SegLens section 3.5, appendix C).

For every latent: its top-K activating slices over a cohort (:mod:`.top_slices`), geometry and mask metrics of
its heatmaps (:mod:`.heatmap_metrics`), a category and description from deterministic rules (:mod:`.labeller`),
split-half stability (:mod:`.stability`), the labels file (:mod:`.latent_labels`), figures (:mod:`.figures`), and
whether the labels hold on new cases (:mod:`.label_mass`).

Importing the package (as ``seglens interpret --help`` does) imports neither SciPy nor torch; only
:func:`interpret_sae` pulls in torch and the networks.
"""

# Names are imported on first use (PEP 562).
from ..lazy import lazy_exports

_EXPORTS = {
    "LabellingRules": "labeller",
    "LatentLabel": "labeller",
    "categorise": "labeller",
    "describe": "labeller",
    "label_latent": "labeller",
    "LABELS_KIND": "latent_labels",
    "LatentLabels": "latent_labels",
    "build_labels_document": "latent_labels",
    "load_latent_labels": "latent_labels",
    "write_latent_labels": "latent_labels",
    "MetricOptions": "heatmap_metrics",
    "metric_names": "heatmap_metrics",
    "slice_context": "heatmap_metrics",
    "slice_metrics": "heatmap_metrics",
    "interpret_sae": "interpret",
    "label_mass": "label_mass",
    "annotate_labels": "label_mass",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = list(_EXPORTS)
