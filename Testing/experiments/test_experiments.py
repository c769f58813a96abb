"""Experiments: baselines, oracle vs calibrated choices, recovery sweeps, and the experiment commands on phantoms."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from helpers import align_with_half_replaced, assert_one_line_error, seglens
from SegLensLogic.experiments.baselines import connected_component_filter, normalised_entropy, uncertainty_filter
from SegLensLogic.experiments.calibration import CaseSweep, calibrated, choose_setting, oracle, split_folds

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- baselines ------------------------------------------------------------------------------------------------
def _tumour_with_blob() -> np.ndarray:
    labels = np.zeros((30, 30, 20), dtype=np.uint8)
    labels[5:15, 5:15, 5:15] = 2  # edema
    labels[8:12, 8:12, 8:12] = 1  # necrotic core
    labels[7:8, 7:13, 7:13] = 3  # enhancing rim piece, touching the core
    labels[25:27, 25:27, 2:4] = 2  # planted false-positive blob, 8 voxels, far away
    labels[13:14, 13:14, 13:14] = 3  # stray 1-voxel ET inside the edema, not touching the TC
    return labels


def test_ccf_largest_removes_planted_blob_and_stray_enhancing_voxel():
    labels = _tumour_with_blob()
    out = connected_component_filter(labels, mode="largest")
    assert (out[25:27, 25:27, 2:4] == 0).all()  # the blob is gone (WT fallback: background)
    assert out[13, 13, 13] == 2  # the stray ET voxel (its own TC component) falls back to edema
    main = np.zeros_like(labels, dtype=bool)
    main[5:15, 5:15, 5:15] = True
    main[13, 13, 13] = False
    assert (out[main] == labels[main]).all()  # the main tumour is untouched
    assert out.dtype == np.uint8 and labels[25, 25, 2] == 2  # input not modified


def test_ccf_min_size_drops_only_small_components():
    labels = _tumour_with_blob()
    kept = connected_component_filter(labels, mode="min_size", min_size=5)
    assert (kept[25:27, 25:27, 2:4] == 2).all()  # 8 voxels >= 5: kept
    dropped = connected_component_filter(labels, mode="min_size", min_size=9)
    assert (dropped[25:27, 25:27, 2:4] == 0).all()
    with pytest.raises(ValueError, match="unknown connected-component mode"):
        connected_component_filter(labels, mode="biggest")


def test_uf_drops_high_entropy_foreground_voxels_only():
    labels = np.zeros((4, 4, 2), dtype=np.uint8)
    labels[:2] = 2
    probabilities = np.zeros((4, 4, 4, 2), dtype=np.float32)
    probabilities[2] = 0.97  # confident edema
    probabilities[[0, 1, 3]] = 0.01
    probabilities[:, 1] = 0.25  # row 1: uniform, entropy 1
    probabilities[0, 2:] = 0.97  # rows 2-3: confident background
    probabilities[1:, 2:] = 0.01
    entropy = normalised_entropy(probabilities)
    assert entropy[1].max() == pytest.approx(1.0, abs=1e-3) and entropy[0].max() < 0.2
    out = uncertainty_filter(labels, probabilities, threshold=0.5)
    assert (out[0] == 2).all() and (out[1] == 0).all() and (out[2:] == 0).all()
    assert (uncertainty_filter(labels, probabilities, threshold=1.0) == labels).all()
    with pytest.raises(ValueError, match="do not match"):
        uncertainty_filter(labels, probabilities[:, :2])


# -- oracle vs calibrated -------------------------------------------------------------------------------------
class ReadOnlyAt(Mapping):
    """Scores of a test case: reading any setting but ``allowed`` raises (a sentinel for leakage)."""

    def __init__(self, scores: dict, allowed: set | None = None):
        self.scores, self.allowed, self.read = scores, allowed, []

    def __getitem__(self, key):
        if self.allowed is not None and key not in self.allowed:
            raise AssertionError(f"test-split score at setting {key!r} was read")
        self.read.append(key)
        return self.scores[key]

    def __iter__(self):
        return iter(self.scores)

    def __len__(self):
        return len(self.scores)


def _sweep(case: str, dice: dict[float, float], base: float = 0.5, group: str = "all", scores_cls=dict) -> CaseSweep:
    return CaseSweep(case, {"dice_mean": base}, scores_cls({a: {"dice_mean": d} for a, d in dice.items()}), group)


def test_calibrated_alpha_is_chosen_without_touching_the_test_split():
    # Calibration cases prefer alpha 2; the test cases would prefer alpha 5 (an oracle would pick it).
    calibration = [_sweep(f"cal{i}", {1.0: 0.5, 2.0: 0.7, 5.0: 0.4}) for i in range(3)]
    test = [CaseSweep(f"test{i}", {"dice_mean": 0.5}, ReadOnlyAt({a: {"dice_mean": d} for a, d in {1.0: 0.5, 2.0: 0.3, 5.0: 0.9}.items()}, allowed=set()))
            for i in range(2)]  # fmt: skip
    choice = choose_setting(calibration, prefer=1.0)  # never given the test sweeps: raises if they were read
    assert choice.setting == 2.0 and choice.calibration_cases == ("cal0", "cal1", "cal2")
    for sweep in test:
        sweep.scores.allowed = {choice.setting}  # only the chosen alpha may now be read
        assert sweep.scores[choice.setting]["dice_mean"] == 0.3
    test[0].scores.allowed = None
    assert oracle(test[:1])[0]["setting"] == 5.0  # the oracle does read everything (and is labelled so)


def test_cross_fitting_reads_each_test_case_only_at_its_folds_choice():
    sweeps = [_sweep(f"c{i}", {1.0: 0.5, 2.0: 0.5 + 0.1 * (i % 2), 5.0: 0.4}, scores_cls=lambda d: ReadOnlyAt(d)) for i in range(6)]
    rows, choices = calibrated(sweeps, folds=2, prefer=1.0)
    splits = split_folds([s.case_id for s in sweeps], 2)
    assert sorted(c for _, test in splits for c in test) == sorted(s.case_id for s in sweeps)
    for (cal_ids, test_ids), choice in zip(splits, choices):
        assert not set(cal_ids) & set(test_ids)
        assert set(choice.calibration_cases) == set(cal_ids)
        # What the fold's choice would be from its calibration cases alone:
        alone = choose_setting([_sweep(s.case_id, {a: v["dice_mean"] for a, v in s.scores.scores.items()}) for s in sweeps if s.case_id in cal_ids], prefer=1.0)
        assert choice.setting == alone.setting
        for case in test_ids:
            row = next(r for r in rows if r["case"] == case)
            assert row["setting"] == choice.setting and row["method"] == "calibrated"


def test_calibration_by_group_falls_back_when_a_mode_has_no_calibration_case():
    sweeps = [_sweep("a", {1.0: 0.5, 2.0: 0.9}, group="false negatives"), _sweep("b", {1.0: 0.6, 2.0: 0.2}, group="false positives"),
              _sweep("c", {1.0: 0.5, 2.0: 0.8}, group="false negatives"), _sweep("d", {1.0: 0.5, 2.0: 0.1}, group="mixed")]  # fmt: skip
    rows, choices = calibrated(sweeps, folds=2, by_group=True, prefer=1.0)
    assert {r["case"] for r in rows} == {"a", "b", "c", "d"}
    # "mixed" has a single case: in its test fold no calibration case has that mode, so the all-modes choice is used.
    mixed = [c for c in choices if c.group == "mixed"]
    assert len(mixed) == 1 and mixed[0].fallback
    overall = next(c for c in choices if c.group == "all" and c.means["fold"] == mixed[0].means["fold"])
    assert mixed[0].setting == overall.setting and "d" not in mixed[0].calibration_cases
    with pytest.raises(Exception, match="at least 2 cases"):
        split_folds(["only"], 2)


# -- sweeps on a trained pipeline -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_runs(phantom_pipeline):
    from SegLensLogic.experiments.runs import Experiment

    experiment = Experiment(phantom_pipeline.model, phantom_pipeline.sae)
    cases = list(phantom_pipeline.train) + list(phantom_pipeline.test)
    return experiment, experiment.run_cohort(cases[:3])


def test_recovery_sweep_alpha_one_reports_zero_change(phantom_runs):
    from SegLensLogic.experiments.recovery import per_setting_rows, recovery_sweep

    experiment, runs = phantom_runs
    sweeps, latents = recovery_sweep(experiment, runs[:2], alphas=(1.0, 0.0), top=2)
    for sweep in sweeps:
        assert len(latents[sweep.case_id]) == 2
        assert sweep.scores[1.0] == sweep.base  # computed through the steering path, not short-cut
    rows = per_setting_rows(sweeps)
    assert rows[0]["setting"] == 1.0 and rows[0]["delta"] == 0.0 and rows[0]["recovered"] == 0.0
    # The same path with a strong edit does change the segmentation.
    run = runs[0]
    assert (experiment.steer(run, [j for j, _ in run.codes.top_latents(16)], "scale", 10.0) != run.labels).any()
    assert (experiment.steer(run, latents[run.case_id], "scale", 1.0) == run.labels).all()


def test_diagnosis_ranks_cases_and_zscores_usage(phantom_runs):
    from SegLensLogic.experiments.diagnosis import diagnose, usage_zscores

    _, runs = phantom_runs
    rows = diagnose(runs, worst=2, top=3)
    assert [r["rank"] for r in rows] == sorted(r["rank"] for r in rows)
    worst = min(runs, key=lambda r: r.base_scores["dice_mean"])
    assert rows[0]["case"] == worst.case_id
    z, mean, _ = usage_zscores(worst, runs)
    others = np.mean([r.usage() for r in runs if r is not worst], axis=0)
    assert np.allclose(mean, others)
    assert np.sign(z[rows[0]["latent"]]) == np.sign(worst.usage()[rows[0]["latent"]] - others[rows[0]["latent"]]) or z[rows[0]["latent"]] == 0


def _cohort_file(path, cases):
    path.write_text("".join(f"{case.images['t1n'].parent}\n" for case in cases))
    return path


def _degraded(cases, out):
    """The sub-Saharan-like acquisition shift (``seglens degrade --preset ssa``) applied to copies of ``cases``."""
    from SegLensLogic.data.phantoms import degrade_case

    for number, case in enumerate(cases):
        degrade_case(case.images["t1n"].parent, out, preset="ssa", seed=number)
    return out


def test_runs_of_cases_sharing_an_id_keep_their_own_cached_forward(phantom_pipeline, tmp_path):
    """A degraded copy keeps its case's name: its re-segmentations must still come from its own images."""
    from SegLensLogic.data import load_cohort
    from SegLensLogic.experiments.runs import Experiment
    from SegLensLogic.steering import LatentEdit
    from SegLensLogic.steering.resegment import resegment

    case = phantom_pipeline.test.cases[0]
    degraded = load_cohort(_degraded([case], tmp_path / "degraded"))[0]
    assert degraded.case_id == case.case_id
    experiment = Experiment(phantom_pipeline.model, phantom_pipeline.sae)
    runs = [experiment.run_case(case), experiment.run_case(degraded)]
    latent = runs[0].codes.top_latents(1)[0][0]
    steered = [experiment.steer(run, [latent], "scale", 3.0) for run in runs]
    for run, labels in zip(runs, steered):
        assert np.array_equal(labels, resegment(experiment.model, experiment.sae, run.prepared, [LatentEdit((latent,), "scale", 3.0)]))
    assert not np.array_equal(steered[0], steered[1])


def test_failure_recovery_and_diagnose_commands_on_phantoms(phantom_pipeline, capsys, tmp_path):
    common = ["--model", phantom_pipeline.model_dir, "--sae", phantom_pipeline.sae_dir, "--device", "cpu"]
    cohort = _cohort_file(tmp_path / "four.txt", phantom_pipeline.train.cases)  # 2 failures, 2 left for class latents
    out = tmp_path / "recovery"
    code, stdout, err = seglens(capsys, "experiment", "failure-recovery", *common, "--cohort", cohort, "--worst", "2",
                                "--alphas", "0.5,1", "--out", out, "--class-max-dice", "0")  # fmt: skip
    assert code == 0, err
    readme = (out / "README.md").read_text()
    assert "latent steering (oracle" in readme and "latent steering (calibrated)" in readme
    assert "edema latent steering (calibrated, per mode)" in readme and "CCF (calibrated)" in readme
    for name in ("figure6_recovery.png", "figure7_mode_effects.png", "table3_failure_recovery.csv", "table4_class_steering.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "figure6_recovery.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = seglens(capsys, "experiment", "failure-recovery", *common, "--cohort", cohort, "--out", out)
    assert_one_line_error(code, err, "already exists")

    out = tmp_path / "diagnosis"
    code, _, err = seglens(capsys, "diagnose", *common, "--cohort", cohort, "--worst", "2", "--top", "3", "--out", out)
    assert code == 0, err
    assert "z" in (out / "diagnosis.csv").read_text().splitlines()[0].split(",")


def test_adaptation_command_on_degraded_phantoms(phantom_pipeline, capsys, tmp_path):
    target = _degraded(phantom_pipeline.test.cases, tmp_path / "degraded")
    out = tmp_path / "adaptation"
    common = ["--model", phantom_pipeline.model_dir, "--sae", phantom_pipeline.sae_dir, "--device", "cpu"]
    source = _cohort_file(tmp_path / "two.txt", phantom_pipeline.train.cases[:2])
    code, _, err = seglens(capsys, "experiment", "adaptation", *common, "--source", source, "--target", target, "--out", out,
                           "--additive-alphas=-1,0,1", "--multiplicative-alphas=0,1,2")  # fmt: skip
    assert code == 0, err
    table = (out / "table5_adaptation.md").read_text()
    for row in ("base model", "ALS (oracle: best per case)", "ALS (calibrated on the other fold)", "MLS (calibrated on the other fold)", "UF (calibrated"):
        assert row in table
    assert (out / "figure8_adaptation.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = seglens(capsys, "experiment", "adaptation", *common, "--target", target, "--out", tmp_path / "x")
    assert_one_line_error(code, err, "class latents are needed")


def test_population_steering_command_on_phantoms(phantom_pipeline, capsys, tmp_path):
    """Figure 5 on phantoms: a second 'population' SAE shares half of the dictionary (the other half replaced by
    random directions), so the alignment splits latents into shared (universal) and specific; every set is steered
    on two cohorts, and alpha 1 is the unedited model."""
    alignment = align_with_half_replaced(capsys, phantom_pipeline.sae_dir, tmp_path, seed=5)

    own = _cohort_file(tmp_path / "own.txt", phantom_pipeline.train.cases[:2])
    held_out = _cohort_file(tmp_path / "held-out.txt", phantom_pipeline.test.cases)
    out = tmp_path / "population"
    code, _, err = seglens(capsys, "experiment", "population-steering", "--model", phantom_pipeline.model_dir, "--sae", phantom_pipeline.sae_dir,
                           "--cohort", f"own={own}", "--cohort", f"held-out={held_out}", "--alignment", alignment,
                           "--alphas", "0,1,3", "--n-latents", "2", "--out", out, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    rows = (out / "figure5_population_steering.csv").read_text().splitlines()
    header = rows[0].split(",")
    records = [dict(zip(header, row.split(","))) for row in rows[1:]]
    assert {r["set"] for r in records} == {"specific", "universal", "random"}
    assert {r["cohort"] for r in records} == {"own", "held-out"}
    assert all(float(r["delta"]) == 0.0 for r in records if float(r["alpha"]) == 1.0)
    assert (out / "figure5_population_steering.png").read_bytes()[:4] == b"\x89PNG"
    readme = (out / "README.md").read_text()
    assert "oracle" in readme and "calibrated" in readme


def test_failure_recovery_keeps_instance_results_when_no_class_latent_is_found(phantom_pipeline, monkeypatch):
    from SegLensLogic.errors import SegLensError
    from SegLensLogic.experiments import recovery
    from SegLensLogic.experiments.recovery import failure_recovery_report
    from SegLensLogic.experiments.runs import Experiment

    def none_enriched(*_args, **_kwargs):
        raise SegLensError("no latent has 2x the average share of activation on class 2 in the reference cases")

    monkeypatch.setattr(recovery, "class_latents_from_truth", none_enriched)
    experiment = Experiment(phantom_pipeline.model, phantom_pipeline.sae)
    runs = experiment.run_cohort(phantom_pipeline.train.cases[:4])
    report = failure_recovery_report(experiment, runs, worst=2, alphas=(0.5, 1.0))
    assert "table3_failure_recovery" in report.tables and "table4_class_steering" not in report.tables
    assert any(note.startswith("Class-level steering (figure 7, table 4) skipped: no latent has 2x") for note in report.notes)
    assert any(note.startswith("Cohort: 4 labelled cases") for note in report.notes)
