"""The paper's experiments (sections 5.4, 6 and 7): failure diagnosis, recovery sweeps with oracle and
calibrated results, output-level baselines, population steering and cross-population adaptation."""

from .baselines import connected_component_filter, normalised_entropy, uncertainty_filter
from .calibration import CaseSweep, calibrated, choose_setting, oracle, split_folds
from .diagnosis import diagnose, rank_by_dice
from .runs import CaseRun, Experiment, class_scores

__all__ = [
    "connected_component_filter", "normalised_entropy", "uncertainty_filter",
    "CaseSweep", "calibrated", "choose_setting", "oracle", "split_folds",
    "diagnose", "rank_by_dice", "CaseRun", "Experiment", "class_scores",
]  # fmt: skip
