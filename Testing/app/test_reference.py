"""The reference build (``seglens build-reference``), leverage, the failure-repair arms and suggested corrections.

A tiny rebuild (a small SegFormer at 64 px, two training cases, short schedules) runs every step of the real build
on the real BraTS cases in about three minutes, in the default suite (issue 25: the tiny rebuild stays there); the
full rebuild is ``slow``-marked.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, seglens
from SegLensLogic.bundle import load_bundle
from SegLensLogic.resources import reference_bundle_path
from SegLensLogic.errors import SegLensError
from SegLensLogic.experiments.leverage import choose_hook
from SegLensLogic.experiments.repair import (
    CaseSweeps,
    ShiftedCase,
    arm_rows,
    bootstrap_interval,
    fit_correction,
    fit_data,
    fitted_edits,
    fitted_latents,
    is_failure,
    patient_folds,
)
from SegLensLogic.steering.plausibility import ReferenceStatistics, plausibility
from SegLensLogic.app.build_reference import ReferenceSettings, build_reference, split_cases
from SegLensLogic.steering import SteeringSession
from SegLensLogic.steering.encoded import encode_case
from SegLensLogic.steering.suggestions import Suggestions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny_build(shared_data, tmp_path_factory):
    """``build_reference(--tiny)`` on the real cases, published as a bundle folder with its log."""
    root = tmp_path_factory.mktemp("reference")
    lines: list[str] = []
    build = build_reference(shared_data, root / "build", ReferenceSettings.tiny(), publish=root / "published", log=lines.append)
    return build, root, lines


def test_split_holds_out_one_case_per_acquisition_group(brats2018_dir):
    from SegLensLogic.data import load_cohort

    cohort = load_cohort(brats2018_dir)
    splits = split_cases(cohort, seed=0)
    assert splits == split_cases(cohort, seed=0)  # deterministic
    assert splits["test"] == ["Brats18_2013_3_1", "Brats18_CBICA_ALU_1", "Brats18_TCIA02_370_1"]  # the shipped bundle's
    assert len(splits["test"]) == 3 and len(splits["validation"]) == 1
    assert {g for g in ("Brats18_2013_", "Brats18_CBICA_", "Brats18_TCIA") if any(t.startswith(g) for t in splits["test"])} == {
        "Brats18_2013_", "Brats18_CBICA_", "Brats18_TCIA"}
    everything = splits["train"] + splits["validation"] + splits["test"]
    assert sorted(everything) == sorted(c.case_id for c in cohort) and len(set(everything)) == len(everything)


def test_the_second_edition_split_holds_out_four_cases_of_three_groups_with_brats_extra(brats2018_dir, shared_data):
    from SegLensLogic.data import Cohort, load_cohort
    from SegLensLogic.app.build_reference import acquisition_group

    extra = shared_data / "brats-extra"
    if not extra.is_dir():
        pytest.skip(f"{extra} is not here")
    cohort = Cohort("all", [*load_cohort(brats2018_dir), *load_cohort(extra)])
    splits = split_cases(cohort, seed=0, test_cases=4, validation_cases=2)
    assert len(splits["test"]) == 4 and len(splits["validation"]) == 2
    assert {acquisition_group(t) for t in splits["test"]} == {"2013 cohort", "CBICA", "TCIA"}
    assert "BraTS2021_00006" in splits["train"]  # a group of one case always trains
    everything = splits["train"] + splits["validation"] + splits["test"]
    assert sorted(everything) == sorted(c.case_id for c in cohort) and len(set(everything)) == len(everything)


def test_tiny_rebuild_writes_a_bundle_whose_card_is_the_builds_measurement(tiny_build):
    build, root, lines = tiny_build
    state = json.loads((root / "build" / "build.json").read_text())
    assert list(state["steps"]) == ["split", "base", "leverage", "sae", "interpret", "populations", "evaluation", "repair", "hints", "bundle"]
    bundle = load_bundle(root / "published")
    assert (root / "published" / "build.log").read_text().count("[10/10]") == 1
    history = json.loads((root / "published" / "training_history.json").read_text())
    assert len(history) == state["steps"]["base"]["outputs"]["epochs"]  # every epoch of the base model, beside the log
    # the figures on the card are the evaluation step's numbers, for the weights in the bundle
    evaluation = state["steps"]["evaluation"]["outputs"]
    assert bundle.figures["dice_test"] == pytest.approx(evaluation["segmentation"]["test"]["mean"])
    assert bundle.figures["sae"]["explained_variance"] == pytest.approx(evaluation["sae"]["explained_variance"])
    card = bundle.card_path.read_text()
    assert f"{evaluation['segmentation']['test']['mean']['dice_WT']:.3f}" in card
    assert "research only, not clinical use" in card
    # every mean of held-out cases comes with its number of cases and a bootstrap interval
    n_test = len(evaluation["segmentation"]["test"]["cases"])
    assert f"Means over n = {n_test} cases with 95 % bootstrap intervals over the cases: WT " in card
    # the labels' hold on the test cases was measured, and is on the card when a tumour-labelled latent fired there
    measured = state["steps"]["interpret"]["outputs"]["label_mass"]
    assert measured["cases"] == n_test
    assert ("Do the labels hold on the" in card) == bool(measured["latents"])
    # ... and in the shipped labels, latent by latent, for the panel's "Holds %" column
    shipped = bundle.load_labels()
    assert shipped.data["held_out"]["case_ids"] == measured["case_ids"] == state["steps"]["split"]["outputs"]["test"]
    assert all(shipped.held_out(row["id"])["in_class"] == pytest.approx(row["in_class"], abs=1e-4) for row in measured["latents"])
    # the grid's bound (an ideal latent's share per class) is measured beside them, and above chance
    assert set(measured["ideal"]) <= set(measured["chance"]) and measured["ideal"]
    assert all(measured["chance"][c] < share <= 1.0 for c, share in measured["ideal"].items())
    assert shipped.data["held_out"]["ideal"] == measured["ideal"]
    # which latents the seed replica finds again: measured once, on the card and in the labels (the "Other seed" column)
    replicated = state["steps"]["interpret"]["outputs"]["replication"]
    assert shipped.data["replica"]["live_shared"] == pytest.approx(replicated["live_shared"], abs=1e-4) and replicated["live"] > 0
    assert [shipped.replicates(j) for j in range(bundle.manifest["sae"]["d_sae"])] == replicated["replicates"]
    assert f"{replicated['tumour_replicating']} of the {replicated['tumour_live']} live tumour-labelled latents" in card
    # the SAE setting was chosen with every setting's readability measured
    assert all("tumour_latents" in row and "label_agreement" in row for row in state["steps"]["sae"]["outputs"]["sweep"])
    assert "| k | expansion | explained_variance | dead_fraction | l0 | seed_shared | live | steps | tumour_latents |" in card
    # dead latents were resampled as the settings say, and the card says so
    assert state["steps"]["sae"]["outputs"]["resample_every"] == build.settings.sae_resample_every == 50
    assert "dead latents resampled every 50 steps in the first half of training" in card
    report = json.loads((root / "build" / "sae" / "sae" / "training_report.json").read_text())
    assert [r["step"] for r in report["resamples"]] == [50, 100, 150][: len(report["resamples"])] and report["resamples"]
    for case_id in state["steps"]["split"]["outputs"]["test"]:
        assert case_id in card
    # the hook the leverage step chose is the bundle's, in its model's config too
    hook = state["steps"]["leverage"]["outputs"]["hook"]
    assert bundle.hook_point == hook and bundle.load_model(device="cpu").config.hook_point == hook
    assert {p.name for p in bundle.alignment_paths} == {"adult-vs-brats2013.json", "adult-vs-ssa.json", "adult-vs-pediatric.json"}
    assert isinstance(bundle.load_suggestions(), Suggestions)
    assert bundle.manifest["preprocessing"]["crop_to_brain"] is True
    # the hook was chosen by aim: every hook's hint fixes were measured; the hint benchmark is on the card and in the
    # figures the Slicer panel shows beside Fix
    summary = state["steps"]["leverage"]["outputs"]["summary"]
    assert all("aim_gain" in row for row in summary)
    assert hook == max(summary, key=lambda r: (r["aim_gain"], r["moved"], r["oracle_gain_mean"]))["hook"]
    hints = state["steps"]["hints"]["outputs"]["results"]
    assert "## Fixing by pointing (hints)" in card and bundle.figures["hints"]["summary_line"].startswith("Measured on")
    assert bundle.figures["hints"]["cases"] == sum(f["failure"] for f in hints["failures"])

    # a second run finds every step done and redoes nothing
    again: list[str] = []
    start = time.monotonic()
    build_reference(build.data, root / "build", ReferenceSettings.tiny(), log=again.append)
    assert sum("skipped" in line for line in again) == 10 and time.monotonic() - start < 30
    # other settings are refused rather than mixed into the same build
    with pytest.raises(SegLensError, match="other options"):
        build_reference(build.data, root / "build", ReferenceSettings(), log=QUIET)


def test_segment_and_steer_default_to_the_reference_bundle(tiny_build, brats2018_case, tmp_path, capsys, monkeypatch):
    _, root, _ = tiny_build
    monkeypatch.setenv("SEGLENS_RESOURCES", str(root))
    monkeypatch.setattr("SegLensLogic.resources.REFERENCE_BUNDLE_NAME", "published")
    code, out, err = seglens(capsys, "segment", "--case", brats2018_case, "--out", tmp_path / "mask.nii.gz")
    assert code == 0, err
    assert "Using the shipped reference bundle" in out and (tmp_path / "mask.nii.gz").exists()
    code, out, err = seglens(capsys, "steer", "--case", brats2018_case, "--suggest", "--population", "ssa", "--out", tmp_path / "fixed.nii.gz")
    assert code == 0, err
    assert "Suggested: ground-truth-free" in out and (tmp_path / "fixed.recipe.json").exists()
    assert "failure cases this method changed mean Dice by" in out  # the build's evidence, beside the suggestion
    # the suggestion's recipe replays to the same mask
    code, out, err = seglens(capsys, "steer", "--case", brats2018_case, "--recipe", tmp_path / "fixed.recipe.json", "--out", tmp_path / "again.nii.gz")
    assert code == 0, err
    import nibabel as nib

    assert np.array_equal(np.asarray(nib.load(tmp_path / "fixed.nii.gz").dataobj), np.asarray(nib.load(tmp_path / "again.nii.gz").dataobj))
    session = load_bundle(reference_bundle_path()).open_session(brats2018_case)
    assert session.populations == ["brats2013", "pediatric", "ssa"]
    code, _, err = seglens(capsys, "steer", "--case", brats2018_case, "--suggest", "--population", "martian", "--out", tmp_path / "x.nii.gz")
    assert_one_line_error(code, err, "no suggestion for population 'martian'")
    monkeypatch.setenv("SEGLENS_RESOURCES", str(tmp_path / "nowhere"))
    code, _, err = seglens(capsys, "segment", "--case", brats2018_case, "--out", tmp_path / "other.nii.gz")
    assert_one_line_error(code, err, "the reference bundle is not at")


# -- leverage and repair, on small hand-made inputs -------------------------------------------------------------
@pytest.mark.parametrize("arch", ["segformer", "unet"])
def test_a_build_started_before_resampling_continues_with_its_architectures_default(arch, shared_data, tmp_path):
    """A build whose state predates ``sae_resample_every`` continues, taking the option at its architecture's
    default: never for the U-Net (so that its rebuild reproduces the shipped U-Net), every 1000 steps for the
    SegFormer; another value is refused, naming the option."""
    settings = ReferenceSettings.unet() if arch == "unet" else ReferenceSettings()
    build_reference(shared_data, tmp_path / "build", settings, until="split", log=lambda m: None)
    state_path = tmp_path / "build" / "build.json"
    state = json.loads(state_path.read_text())
    del state["options"]["settings"]["sae_resample_every"]
    state_path.write_text(json.dumps(state))
    lines: list[str] = []
    build = build_reference(shared_data, tmp_path / "build", settings, until="split", log=lines.append)
    assert "Options added since this run started, taken at their defaults: settings.sae_resample_every" in lines
    assert build.settings.sae_resample_every == (None if arch == "unet" else 1000)
    assert build.pipeline.data["options"]["settings"]["sae_resample_every"] == build.settings.sae_resample_every
    state["options"]["settings"]["sae_resample_every"] = 7
    state_path.write_text(json.dumps(state))
    with pytest.raises(SegLensError, match="sae_resample_every|settings"):
        build_reference(shared_data, tmp_path / "build", settings, until="split", log=lambda m: None)


def test_leverage_chooses_the_hook_that_moves_the_mask_most_among_fine_enough_grids():
    rows = [
        {"hook": "stage1", "grid": "48x48", "moved": 0.30, "oracle_gain_mean": 0.01},
        {"hook": "stage2", "grid": "24x24", "moved": 0.45, "oracle_gain_mean": 0.02},
        {"hook": "stage3", "grid": "12x12", "moved": 0.20, "oracle_gain_mean": 0.05},
        {"hook": "stage4", "grid": "6x6", "moved": 0.90, "oracle_gain_mean": 0.09},
    ]
    assert choose_hook(rows) == "stage2"  # stage4 moves more but its 6x6 heatmaps are too coarse
    assert choose_hook(rows, min_side=4) == "stage4"


def _sweeps(values: dict[str, dict[float, float]], population="ssa") -> list[CaseSweeps]:
    """Synthetic per-case sweeps: case -> alpha -> mean Dice (all classes alike)."""
    out = []
    for number, (case, grid) in enumerate(values.items()):
        def scores(v):
            return {k: v for k in ("dice_NC", "dice_ED", "dice_ET", "dice_WT", "dice_TC", "dice_mean")}

        base = scores(grid[1.0])
        sets = {name: {a: {**scores(v), "plausibility": abs(a - 2.0), "voxels_changed": int(a * 10)} for a, v in grid.items()}
                for name in ("top", "specific", "random")}  # fmt: skip
        item = CaseSweeps(ShiftedCase(case=None, population=population, patient=f"p{number}", name=case), base, {})
        item.scores = sets
        item.baselines = {"CCF": {("none", 0): {**base, "voxels_changed": 0}}, "UF": {1.0: {**base, "voxels_changed": 0}}}
        out.append(item)
    return out


def test_arms_run_on_identical_cases_and_calibration_never_reads_a_test_case():
    cases = _sweeps({
        "a": {0.0: 0.2, 1.0: 0.3, 2.0: 0.5, 4.0: 0.4},
        "b": {0.0: 0.2, 1.0: 0.3, 2.0: 0.45, 4.0: 0.35},
        "c": {0.0: 0.1, 1.0: 0.3, 2.0: 0.2, 4.0: 0.9},
        "d": {0.0: 0.1, 1.0: 0.3, 2.0: 0.25, 4.0: 0.8},
    })  # fmt: skip
    folds = patient_folds(cases, 2)
    assert all(not set(c) & set(t) for c, t in folds) and sorted(i for _, t in folds for i in t) == [0, 1, 2, 3]
    arms = arm_rows(cases, folds)
    for rows in arms.values():  # every arm on the same cases
        assert sorted(r["case"] for r in rows) == ["a", "b", "c", "d"]
    oracle = {r["case"]: r["setting"] for r in arms["oracle (top latents)"]}
    assert oracle == {"a": 2.0, "b": 2.0, "c": 4.0, "d": 4.0}
    free = {r["case"]: r["setting"] for r in arms["ground-truth-free (specific latents)"]}
    assert set(free.values()) == {2.0}  # the label-free criterion, not the labels
    # sentinel: a test case's own scores never move its calibrated choice
    calibrated = {r["case"]: r["setting"] for r in arms["calibrated (top latents)"]}
    for calibration, test in folds:
        poisoned = _sweeps({c.case.label: {a: (100.0 if i in test and a == 0.0 else v["dice_mean"]) for a, v in c.scores["top"].items()}
                            for i, c in enumerate(cases)})  # fmt: skip
        again = {r["case"]: r["setting"] for r in arm_rows(poisoned, folds)["calibrated (top latents)"]}
        assert all(again[cases[i].case.label] == calibrated[cases[i].case.label] for i in test)
    # the random control shares the grid and the count of cases
    assert {r["setting"] for r in arms["oracle (random latents)"]} <= {0.0, 1.0, 2.0, 4.0}


def test_failure_rule_plausibility_and_bootstrap():
    assert is_failure({"dice_mean": 0.5}, None) and not is_failure({"dice_mean": 0.7}, None)
    assert is_failure({"dice_mean": 0.7}, 0.85) and not is_failure({"dice_mean": 0.7}, 0.75)
    label = np.zeros((20, 20, 20), np.uint8)
    brain = np.ones_like(label, dtype=bool)
    label[5:10, 5:10, 5:10] = 2
    label[6:9, 6:9, 6:9] = 1
    reference = ReferenceStatistics.from_labels([(label, brain)])
    assert plausibility(label, brain, reference) == pytest.approx(0.0, abs=1e-9)
    grown = label.copy()
    grown[2:14, 2:14, 2:14][grown[2:14, 2:14, 2:14] == 0] = 2
    assert plausibility(grown, brain, reference) > 0.5
    assert plausibility(np.zeros_like(label), brain, reference) == float("inf")
    low, high = bootstrap_interval(np.array([0.1, 0.2, 0.3, 0.4]))
    assert 0.1 <= low < 0.25 < high <= 0.4


def test_fitted_correction_lowers_its_calibration_loss_and_replays_from_its_recipe(real_pipeline, tmp_path):
    from SegLensLogic.data.cases import read_case

    model, sae = real_pipeline.model, real_pipeline.sae
    cases = list(real_pipeline.test)[:2]
    encoded = [encode_case(model, sae, read_case(c)) for c in cases]
    latents = fitted_latents(encoded, 4)
    assert len(latents) == 4
    data = [fit_data(e, sae, read_case(c).label, latents) for e, c in zip(encoded, cases)]
    alphas, losses = fit_correction(model, sae, data, latents, steps=15, learning_rate=0.2)
    assert losses[-1] < losses[0]
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was
    again, _ = fit_correction(model, sae, data, latents, steps=15, learning_rate=0.2)
    np.testing.assert_allclose(alphas, again, rtol=1e-5)  # deterministic
    session = SteeringSession(model, sae, cases[0])
    session.segment()
    for edit in fitted_edits(latents, alphas):
        session.apply(edit)
    mask, recipe = session.export(tmp_path / "fitted.nii.gz")
    replay = SteeringSession(model, sae, cases[0])
    replay.segment()
    from SegLensLogic.steering.recipe import load_recipe

    assert np.array_equal(replay.apply_recipe(load_recipe(recipe)), session.labels)
    with torch.no_grad():
        assert np.array_equal(encoded[0].steer(sae, fitted_edits(latents, alphas)), session.labels)


@pytest.mark.slow
def test_full_reference_rebuild(shared_data, tmp_path):
    """The shipped bundle's build, from scratch (hours on two CPU cores; minutes on a GPU)."""
    build = build_reference(shared_data, tmp_path / "build", ReferenceSettings(), publish=tmp_path / "bundle", log=print)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.figures["dice_test"]["dice_WT"] > 0.7
    assert build.hook in bundle.load_model(device="cpu").hook_points()


def test_leverage_command_on_a_unet_encoder_and_decoder_level(real_pipeline, tmp_path, capsys):
    """``seglens experiment leverage`` trains a quick SAE per requested hook (an encoder and a decoder level of the
    U-Net), measures on real cases, writes the table and plots, and names the hook it would choose."""
    cohort = tmp_path / "cases.txt"
    cohort.write_text(f"{real_pipeline.test[0].images['t1c'].parent}\n")
    code, out, err = seglens(capsys, "experiment", "leverage", "--model", real_pipeline.model_dir, "--cohort", cohort,
                             "--hooks", "down_3,up_3", "--sae-cohort", real_pipeline.root / "adult-train", "--sae-steps", "60",
                             "--alphas", "0,4", "--out", tmp_path / "leverage")  # fmt: skip
    assert code == 0, err
    assert "Chosen hook:" in out
    rows = (tmp_path / "leverage" / "leverage.csv").read_text().splitlines()
    assert rows[0].startswith("hook,") and {r.split(",")[0] for r in rows[1:]} == {"down_3", "up_3"}
    assert (tmp_path / "leverage" / "leverage_moved.png").exists()
    code, _, err = seglens(capsys, "experiment", "leverage", "--model", real_pipeline.model_dir, "--cohort", cohort, "--hooks", "up_9",
                           "--out", tmp_path / "x")  # fmt: skip
    assert_one_line_error(code, err, "unknown hook point")


def test_leverage_keeps_each_hook_and_a_rerun_measures_only_what_changed(real_pipeline, tmp_path, monkeypatch):
    """The build's leverage step keeps every hook's measurement: a rerun with the same SAE, cases and grid loads
    it (no case is measured again), one with another grid measures again."""
    import SegLensLogic.experiments.leverage as leverage

    case = real_pipeline.test[0]
    saes = {"down_3": real_pipeline.sae}
    first, chosen, summary = leverage.leverage_report(real_pipeline.model, saes, [case], (0.0, 4.0), log=QUIET, cache=tmp_path / "hooks")
    assert (tmp_path / "hooks" / "down_3.json").is_file()
    measured = []
    real_case_leverage = leverage.case_leverage
    monkeypatch.setattr(leverage, "case_leverage", lambda *a, **k: measured.append(1) or real_case_leverage(*a, **k))
    again, chosen_again, summary_again = leverage.leverage_report(real_pipeline.model, saes, [case], (0.0, 4.0), log=QUIET,
                                                                  cache=tmp_path / "hooks")  # fmt: skip
    assert measured == [] and chosen_again == chosen
    assert json.loads(json.dumps(summary_again)) == json.loads(json.dumps(summary, default=float))
    leverage.leverage_report(real_pipeline.model, saes, [case], (0.0, 2.0), log=QUIET, cache=tmp_path / "hooks")
    assert measured == [1]


def test_card_states_the_steering_goals_from_the_arms_table():
    from SegLensLogic.reference.card import steering_verdict

    rows = [
        {"arm": "oracle (top latents)", "recovered": 0.6, "dice_mean": "+0.080 [+0.030, +0.120]", "vs random control": "+0.050 [+0.010, +0.090]"},
        {"arm": "calibrated (top latents)", "recovered": 0.2, "dice_mean": "+0.040 [+0.010, +0.070]", "vs random control": "+0.030 [+0.005, +0.060]"},
        {"arm": "ground-truth-free (specific latents)", "recovered": 0.0, "dice_mean": "-0.010 [-0.030, +0.010]", "vs random control": "-0.004 [-0.020, +0.012]"},
        {"arm": "CCF (calibrated)", "recovered": 0.0, "dice_mean": "+0.010 [+0.000, +0.020]"},
        {"arm": "UF (calibrated)", "recovered": 0.0, "dice_mean": "-0.002 [-0.006, -0.001]"},
    ]
    oracle, calibrated, free = steering_verdict(rows)
    assert "60%" in oracle and "meets" in oracle
    assert "a real gain" in calibrated and "above both" in calibrated
    assert "not distinguishable" in free and "not above" in free
    rows[0]["recovered"] = 0.4
    assert "below the goal" in steering_verdict(rows)[0]


def test_card_places_each_population_against_the_floors():
    """A population sharing less than both floors differs from the reference by more than retraining does; one between
    them does not; the column says which, row by row."""
    from SegLensLogic.reference.card import _populations_section

    floors = {"seed": 0.117, "resample": 0.067}
    populations = {"floors": floors, "populations": {"brats2013": {"live_shared": 0.013, "shared_fraction": 0.012},
                                                     "ssa": {"live_shared": 0.092, "shared_fraction": 0.086},
                                                     "same": {"live_shared": 0.2, "shared_fraction": 0.19}}}  # fmt: skip
    lines = "\n".join(_populations_section(populations)).splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in lines if line.startswith("| ")}
    assert rows["brats2013"] == "below both floors" and rows["ssa"] == "between the floors" and rows["same"] == "at or above both floors"


def test_card_says_which_labels_to_read_as_named_and_which_as_tumour():
    """From the measured hold per class: classes at the goal read as named, those under it but mostly inside tumour
    read as "fires on tumour", the rest are not listed; nothing is listed when no class qualifies."""
    from SegLensLogic.reference.card import _label_mass_lines

    def measured(**by_category):
        return {"cases": 4, "mean_in_class": 0.3, "holds_at": 0.4, "holding": 2, "fired": 9, "mean_in_tumour": 0.7,
                "chance": {}, "latents": [{}], "by_category": {c: {"latents": 3, "in_class": a, "in_tumour": b} for c, (a, b) in by_category.items()}}  # fmt: skip

    line = _label_mass_lines(measured(**{"edema": (0.44, 0.57), "necrotic core": (0.07, 0.85), "enhancing tumour": (0.2, 0.3)}))[0]
    assert line.endswith('Read as named: edema (at least 40% in class on average). Read as "fires on tumour", not as the class: '
                         "necrotic core (under 40% in class, at least half inside tumour).")  # fmt: skip
    assert "enhancing tumour (" not in line.split("Read as")[1]
    assert _label_mass_lines(measured(edema=(0.1, 0.2)))[0].endswith("heatmap layer shows on a new case.")
    # The grid's own bound beside each class, when measured: what an ideal latent of this hook reaches.
    with_ideal = {**measured(edema=(0.3, 0.6)), "chance": {"edema": 0.05}, "ideal": {"edema": 0.61}}
    lines = _label_mass_lines(with_ideal)
    assert "edema 30% over 3 latent(s) (chance 5.0%, an ideal latent at this grid 61%)" in lines[0]
    assert len(lines) == 2 and "most a latent of this hook can put inside the class" in lines[1]
    assert len(_label_mass_lines(measured(edema=(0.3, 0.6)))) == 1


def test_a_resumed_build_reuses_its_activation_store_only_when_it_is_the_same(real_pipeline, tmp_path, monkeypatch):
    """The sae step's store is kept between reruns: the same weights, cases and options reuse it; other options
    (another subsample) extract again."""
    import SegLensLogic.sae as sae_package
    from SegLensLogic.app.build_reference import _extract
    from SegLensLogic.data.cohort import Cohort

    cohort = Cohort(name="one", cases=list(real_pipeline.test)[:1])
    model, model_dir = real_pipeline.model, real_pipeline.model_dir
    first = _extract(None, model, model_dir, cohort, "down_3", tmp_path / "store")
    calls = []
    extract = sae_package.extract_activations
    monkeypatch.setattr(sae_package, "extract_activations", lambda *a, **k: calls.append(1) or extract(*a, **k))
    again = _extract(None, model, model_dir, cohort, "down_3", tmp_path / "store")
    assert calls == [] and len(again) == len(first) > 0
    other = _extract(None, model, model_dir, cohort, "down_3", tmp_path / "store", subsample=0.5, seed=3)
    assert calls == [1] and 0 < len(other) < len(first)
