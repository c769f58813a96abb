"""The paper's experiments (sections 5.4, 6 and 7): failure diagnosis, recovery sweeps with oracle and
calibrated results, output-level baselines, population steering and cross-population adaptation."""

# Names are imported on first use (PEP 562): the experiments' command-line help reads no torch or SciPy.
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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = list(_EXPORTS)
