"""The paper's experiments (sections 5.4, 6 and 7): failure diagnosis, recovery sweeps with oracle and
calibrated results, output-level baselines, population steering and cross-population adaptation."""

# Names are imported on first use (PEP 562): the experiments' command-line help reads no torch or SciPy.
from ..lazy import lazy_exports

_EXPORTS = {
    "connected_component_filter": "baselines",
    "normalised_entropy": "baselines",
    "uncertainty_filter": "baselines",
    "CaseSweep": "calibration",
    "calibrated": "calibration",
    "choose_setting": "calibration",
    "oracle": "calibration",
    "split_folds": "calibration",
    "diagnose": "diagnosis",
    "rank_by_dice": "diagnosis",
    "CaseRun": "runs",
    "Experiment": "runs",
    "class_scores": "runs",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = list(_EXPORTS)
