"""``seglens demo --quick`` end to end: every step finishes, its bundles load in one call, a corrected mask's recipe
replays to the same mask, the report has every section, and a second run resumes without redoing any step."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, seglens

from SegLensLogic.app.demo import QUICK_POPULATIONS, STATE_NAME, STEPS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPORT_SECTIONS = ("Cohorts and models", "SAE quality", "Latent galleries", "Shared latents across populations",
                   "Diffing against the planted shift", "Failure recovery", "Population adaptation", "Steered cases: before and after")  # fmt: skip


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick demo, run once for the module on one thread (module fixtures start before ``one_torch_thread``)."""
    import torch

    from SegLensLogic.app import cli

    out = tmp_path_factory.mktemp("demo") / "seglens-demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["demo", "--out", str(out), "--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _state(out):
    return json.loads((out / STATE_NAME).read_text())


def test_quick_demo_outputs(quick_demo, capsys):
    from SegLensLogic.alignment import load_alignment
    from SegLensLogic.bundle import load_bundle
    from SegLensLogic.data import read_image
    from SegLensLogic.data.cases import find_case
    from SegLensLogic.steering import load_recipe

    out = quick_demo
    state = _state(out)
    assert list(state["steps"]) == [name for name, _title, _function in STEPS]
    assert state["options"]["quick"] is True

    # A bundle per population, each loading (hashes verified) with its labels and alignments; a session opens from it.
    bundles = state["steps"]["bundles"]["outputs"]["bundles"]
    assert set(bundles) == set(QUICK_POPULATIONS) == {"adult", "healthy", "pediatric-cyst", "ssa-band"}
    for name, relative in bundles.items():
        bundle = load_bundle(out / relative)
        assert bundle.name == name and bundle.labels_path is not None and bundle.load_labels() is not None
        assert len(bundle.alignment_paths) == (3 if name == "adult" else 1)
    assert load_bundle(out / bundles["healthy"]).label_scheme == "aseg"

    # A corrected mask and its recipe; replaying the recipe from the bundle gives the mask, voxel for voxel.
    steered = state["steps"]["steering"]["outputs"]["cases"]
    assert steered, "no case was steered"
    case = steered[0]
    mask, recipe = out / case["mask"], out / case["recipe"]
    assert mask.is_file() and recipe.is_file() and case["replay_identical"]
    cohort_test = next(c for c in state["steps"]["cohorts"]["outputs"]["cohorts"] if c["name"] == case["population"])["test"]
    session = load_bundle(out / bundles["adult"]).open_session(find_case(out / cohort_test / case["case_id"]))
    replayed = session.apply_recipe(load_recipe(recipe), source=recipe)
    written = read_image(mask).array
    assert replayed.shape == written.shape and np.array_equal(replayed, written)
    # The hint fix of the last simulated click, applied as one step (its edits share their Apply and label rule).
    edits = load_recipe(recipe).edits
    assert len({e.get("step") for e in edits}) <= 1 and len({e.get("labels", "model") for e in edits}) <= 1
    assert all(e["mode"] == "scale" and len(e["latents"]) == 1 for e in edits)
    assert len(case["dice_per_click"]) >= 1 and case["dice_per_click"][0] == case["dice_before"]

    # The report: one file with every section filled in (none replaced by an "Omitted" note), images inline.
    html = (out / state["steps"]["report"]["outputs"]["report"]).read_text(encoding="utf-8")
    for heading in REPORT_SECTIONS:
        assert f">{heading}</h2>" in html.replace("&#x27;", "'").replace("&amp;", "&"), heading
    assert "Omitted:" not in html
    assert html.count("<img") >= 8 and "src=\"http" not in html
    assert "QUICK run" in html  # reduced sizes are said in the report

    assert "precision of chance" in html and "seed floor" in html and "resampling floor" in html

    # Every SAE from its own seed, each with a seed replica and a resampled replica; dead latents counted on the cohort.
    saes = state["steps"]["saes"]["outputs"]
    seeds = {name: saes["saes"][name]["seed"] for name in QUICK_POPULATIONS}
    assert len(set(seeds.values())) == len(seeds)
    for name in QUICK_POPULATIONS:
        seed_replica, resampled = saes["replicas"][name]["seed"], saes["replicas"][name]["resampled"]
        assert saes["saes"][seed_replica]["seed"] != seeds[name] and saes["saes"][resampled]["seed"] == seeds[name]
        assert saes["saes"][resampled]["activations_fraction"] < 1
        assert 0 <= saes["saes"][name]["dead_fraction"] == 1 - saes["saes"][name]["live"] / saes["saes"][name]["d_sae"]

    # Both diffing rules, each with both floors beside every SAE; the rule used follows the cosine seed floor.
    alignment = state["steps"]["alignment"]["outputs"]
    for method in ("cosine", "activation-correlation"):
        floors = alignment["methods"][method]["floors"]
        assert set(floors) == set(QUICK_POPULATIONS) and all(0 <= f[k] <= 1 for f in floors.values() for k in ("seed", "resampled"))
    cosine_floor = alignment["methods"]["cosine"]["floors"]["adult"]["seed"]
    assert alignment["method"] == ("cosine" if cosine_floor >= 0.5 else "activation-correlation")
    assert load_alignment(out / alignment["files"]["ssa-band"]).method == ("decoder-encoder-cosine" if cosine_floor >= 0.5 else "activation-correlation")

    # Diffing was scored against the footprint of every planted feature, by both rules, beside chance.
    rows = state["steps"]["diffing"]["outputs"]["rows"]
    assert {(r["population"], r["method"]) for r in rows} == {(p, m) for p in ("pediatric-cyst", "ssa-band") for m in ("cosine", "activation-correlation")}
    for row in rows:
        assert row["chance_precision"] is None or row["chance_precision"] <= 0.3
        assert row["n_feature"] <= row["n_live"] and row["n_specific"] + row["n_shared"] == row["n_live"]
    assert sum(r["used"] for r in rows) == 2

    # The real part: the shipped reference bundle on a real case under a shift, its top latents, a suggested
    # correction exported with its recipe (replayed identically), in the report with the bundle's arms table.
    real = state["steps"]["reference"]["outputs"]
    assert not real.get("skipped"), real
    assert real["replay_identical"] and (out / real["recipe"]).is_file() and (out / real["mask"]).is_file()
    assert len(real["top_latents"]) == 5 and all(r["category"] for r in real["top_latents"])
    assert "The shipped reference model on a real case" in html and real["case_id"] in html


def test_quick_demo_resumes_without_redoing_steps(quick_demo, capsys):
    out = quick_demo
    before = _state(out)
    code, stdout, stderr = seglens(capsys, "demo", "--out", out, "--quick")
    assert code == 0, stderr
    skipped = [line for line in stdout.splitlines() if "already done" in line]
    assert len(skipped) == len(STEPS), stdout
    after = _state(out)
    assert {k: v["finished"] for k, v in after["steps"].items()} == {k: v["finished"] for k, v in before["steps"].items()}

    # An interruption inside the last step: it is not recorded, and its half-written folder is left behind.
    state = _state(out)
    record = state["steps"].pop("report")
    (out / STATE_NAME).write_text(json.dumps(state))
    partial = out / f".{record['folder']}.tmp"
    partial.mkdir()
    (partial / "report.html").write_text("<html>half written")
    code, stdout, stderr = seglens(capsys, "demo", "--out", out, "--quick")
    assert code == 0, stderr
    assert sum("already done" in line for line in stdout.splitlines()) == len(STEPS) - 1, stdout
    assert not partial.exists() and "Steered cases" in (out / record["folder"] / "report.html").read_text(encoding="utf-8")
    assert _state(out)["steps"]["report"]["finished"] >= record["finished"]


def test_demo_refuses_other_options_and_foreign_folders(quick_demo, tmp_path, capsys):
    code, _, stderr = seglens(capsys, "demo", "--out", quick_demo)  # the folder holds a --quick run
    assert_one_line_error(code, stderr, "--quick", "--overwrite")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a demo")
    code, _, stderr = seglens(capsys, "demo", "--out", foreign, "--quick", "--overwrite")
    assert_one_line_error(code, stderr, str(foreign), "not a SegLens demo folder")
    assert (foreign / "notes.txt").read_text() == "not a demo"
    # A hook the demo's U-Net lacks is refused before anything is written; another hook is another run.
    code, _, stderr = seglens(capsys, "demo", "--out", tmp_path / "hooked", "--quick", "--hook", "stage2")
    assert_one_line_error(code, stderr, "--hook", "stage2", "up_3")
    assert not (tmp_path / "hooked").exists()
    code, _, stderr = seglens(capsys, "demo", "--out", quick_demo, "--quick", "--hook", "up_3")
    assert_one_line_error(code, stderr, "--hook up_3", "--overwrite")


@pytest.mark.slow
def test_quick_demo_on_real_cohorts(brats2018_dir, brats2013_dir, tmp_path, capsys):
    """``--data`` with the real BraTS 2018 and 2013 cohorts: the shared modalities (t1c, t2f), no planted shift to
    score, and every other step as on phantoms (several minutes: real volumes are 240 x 240 x 155)."""
    from SegLensLogic.bundle import load_bundle

    out = tmp_path / "real-demo"
    code, stdout, stderr = seglens(capsys, "demo", "--out", out, "--quick", "--data", brats2018_dir, brats2013_dir)
    assert code == 0, stderr
    state = _state(out)
    bundles = state["steps"]["bundles"]["outputs"]["bundles"]
    assert set(bundles) == {"brats2018", "brats2013"}
    assert load_bundle(out / bundles["brats2018"]).modalities == ["t1c", "t2f"]
    assert state["steps"]["diffing"]["outputs"]["rows"] == []  # real cohorts: no planted shift
    assert state["steps"]["steering"]["outputs"]["cases"][0]["replay_identical"]
    html = (out / state["steps"]["report"]["outputs"]["report"]).read_text(encoding="utf-8")
    assert "real data" in html
