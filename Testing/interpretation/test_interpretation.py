"""Automatic interpretation of latents: slice metrics on maps of known geometry, the labeller, top-K over a
cohort, the labels file, split-half stability, and ``seglens interpret`` on real BraTS 2018 cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, seglens
from pipelines import REAL_TEST_CASES, REAL_TRAIN_CASES

from SegLensLogic.data.labels import HEALTHY_CLASSES, TUMOUR_CLASSES
from SegLensLogic.errors import InputFileError
from SegLensLogic.interpretation import (
    LABELS_KIND,
    LabellingRules,
    categorise,
    describe,
    label_latent,
    load_latent_labels,
    metric_names,
    slice_context,
    slice_metrics,
)
from SegLensLogic.interpretation.top_slices import TopK
from SegLensLogic.interpretation.stability import category_agreement, split_halves
from SegLensLogic.sae import sae_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A synthetic axial slice in RAS order: a disc of brain, an edema region right of centre and anterior, with a
# necrotic core inside it.
SIZE = 160
XS, YS = np.meshgrid(np.arange(SIZE, dtype=float), np.arange(SIZE, dtype=float), indexing="ij")
CENTRE = (80.0, 80.0)
RADIUS = 66.0
R = np.hypot(XS - CENTRE[0], YS - CENTRE[1])
BRAIN = R <= RADIUS
TUMOUR_CENTRE = (105.0, 95.0)
R_TUMOUR = np.hypot(XS - TUMOUR_CENTRE[0], YS - TUMOUR_CENTRE[1])
LABEL = np.zeros((SIZE, SIZE), dtype=np.uint8)
LABEL[R_TUMOUR <= 20] = 2
LABEL[R_TUMOUR <= 7] = 1


def blob(x, y, sigma):
    return np.exp(-0.5 * ((XS - x) ** 2 + (YS - y) ** 2) / sigma**2) * BRAIN


def measure(heatmap, label=LABEL, classes=TUMOUR_CLASSES, brain=BRAIN):
    context = slice_context(label, brain, len(classes))
    return dict(zip(metric_names(classes), slice_metrics(heatmap, context)[0].tolist()))


def test_ring_at_the_brain_edge_is_a_ring_like_brain_edge_latent():
    ring = np.exp(-0.5 * ((R - (RADIUS - 3)) / 2.5) ** 2) * BRAIN
    m = measure(ring)
    assert m["edge_ratio"] > 0.9 and m["area_edge"] < 0.4  # mass in the edge band, far above its share
    assert m["depth"] < 0.1
    assert m["edge_coverage"] == 1.0  # every angular sector
    assert abs(m["centroid_lr"]) < 0.05 and abs(m["lateralisation"]) < 0.05
    category, _ = categorise(m, TUMOUR_CLASSES)
    assert category == "brain edge"
    assert "ring-like" in describe(category, m) and "superficial" in describe(category, m)
    # Half a ring on the left: still brain edge, no longer ring-like, and on the left.
    half = ring * (XS < CENTRE[0])
    h = measure(half)
    assert 0.3 < h["edge_coverage"] < 0.6 and h["centroid_lr"] < -0.5
    text = describe(categorise(h, TUMOUR_CLASSES)[0], h)
    assert text.startswith("brain edge") and "ring-like" not in text and "left hemisphere" in text


def test_blob_inside_a_labelled_region_gets_its_class():
    m = measure(blob(*TUMOUR_CENTRE, 3.0))  # inside the necrotic core
    assert m["p_necrotic core"] > 0.9 and m["r_inside"] > 0.99
    assert m["r_boundary"] < 0.01  # far from the tumour's border
    assert m["depth"] > 0.5 and m["edge_ratio"] < 1e-6
    assert categorise(m, TUMOUR_CLASSES)[0] == "necrotic core"
    text = describe("necrotic core", m)
    assert text == "necrotic core, localised, deep, right hemisphere, anterior"
    # A blob in the edema ring (between core and border).
    e = measure(blob(TUMOUR_CENTRE[0] + 13, TUMOUR_CENTRE[1], 2.5))
    assert e["p_edema"] > 0.8 and categorise(e, TUMOUR_CLASSES)[0] == "edema"
    # Class association sums to one with the background.
    assert sum(e[f"p_{c}"] for c in TUMOUR_CLASSES) == pytest.approx(1.0, abs=1e-4)


def test_left_side_blob_is_left_and_right_side_blob_is_right():
    left = measure(blob(35, 80, 6))
    right = measure(blob(125, 80, 6))
    assert left["centroid_lr"] < -0.4 and left["lateralisation"] < -0.99
    assert right["centroid_lr"] > 0.4 and right["lateralisation"] > 0.99
    assert abs(left["centroid_ap"]) < 0.05
    assert categorise(left, TUMOUR_CLASSES)[0] == "healthy tissue"
    assert "left hemisphere" in describe("healthy tissue", left)
    assert "right hemisphere" in describe("healthy tissue", right)
    posterior = measure(blob(80, 30, 6))
    assert posterior["centroid_ap"] < -0.4 and "posterior" in describe("healthy tissue", posterior)


def test_tumour_border_outside_brain_and_uniform_maps():
    rim = np.exp(-0.5 * ((R_TUMOUR - 20) / 2.0) ** 2) * BRAIN
    m = measure(rim)
    assert m["r_boundary"] > 0.6 and categorise(m, TUMOUR_CLASSES)[0] == "tumour boundary"
    outside = np.exp(-0.5 * ((R - RADIUS - 6) / 3) ** 2) * ~BRAIN
    assert categorise(measure(outside), TUMOUR_CLASSES)[0] == "background"
    uniform = measure(BRAIN.astype(float))
    assert uniform["extent"] == pytest.approx(1.0, abs=1e-3) and uniform["entropy_norm"] == pytest.approx(1.0, abs=1e-3)
    assert categorise(uniform, TUMOUR_CLASSES)[0] == "diffuse"
    # A uniform map scores each class's share of the brain: the base rates.
    assert uniform["p_edema"] == pytest.approx(uniform["area_edema"], rel=1e-3)


def test_healthy_structure_by_enrichment():
    label = np.zeros((SIZE, SIZE), dtype=np.uint8)
    label[np.hypot(XS - 65, YS - 80) <= 6] = HEALTHY_CLASSES.index("thalamus")
    label[np.hypot(XS - 95, YS - 80) <= 6] = HEALTHY_CLASSES.index("thalamus")
    heat = blob(65, 80, 6)  # wider than the structure: only ~40 % of the mass falls in it
    m = measure(heat, label, HEALTHY_CLASSES)
    assert 0.25 < m["p_thalamus"] < 0.5 and m["p_thalamus"] > 3 * m["area_thalamus"]
    assert categorise(m, HEALTHY_CLASSES)[0] == "thalamus"
    # The "tumour boundary" rule is for tumour schemes only.
    rim = measure(np.exp(-0.5 * ((np.hypot(XS - 65, YS - 80) - 6) / 1.5) ** 2) * BRAIN, label, HEALTHY_CLASSES)
    assert rim["r_boundary"] > 0.5 and categorise(rim, HEALTHY_CLASSES)[0] != "tumour boundary"


def test_label_latent_confidence_and_dead():
    names = metric_names(TUMOUR_CLASSES)
    edema = measure(blob(TUMOUR_CENTRE[0] + 13, TUMOUR_CENTRE[1], 2.5))
    left = measure(blob(35, 80, 6))
    rows = np.array([[edema[n] for n in names]] * 3 + [[left[n] for n in names]])
    label = label_latent(rows, np.array([4.0, 3.0, 2.0, 1.0]), TUMOUR_CLASSES)
    assert label.category == "edema"
    assert label.confidence == pytest.approx(0.9)  # 9 of 10 units of activation in agreeing examples
    assert label.description.startswith("edema")
    dead = label_latent(np.zeros((0, len(names))), np.zeros(0), TUMOUR_CLASSES)
    assert dead.category == "dead" and dead.metrics == {}
    # Thresholds are data: a stricter class rule turns the same latent into something else.
    strict = LabellingRules(class_mass=0.99, class_mass_enriched=0.99)
    assert label_latent(rows, np.ones(4), TUMOUR_CLASSES, strict).category != "edema"


def test_slice_inputs_are_checked():
    with pytest.raises(ValueError, match="differ in shape"):
        slice_context(LABEL[:10], BRAIN, 4)
    with pytest.raises(ValueError, match="label values"):
        slice_context(LABEL + 5, BRAIN, 4)
    with pytest.raises(ValueError, match="on a slice of shape"):
        slice_metrics(np.zeros((2, 5, 5)), slice_context(LABEL, BRAIN, 4))


def test_running_top_k_equals_the_global_top_k():
    rng = np.random.default_rng(0)
    d_sae, k, cases, slices = 7, 4, 5, 9
    everything = rng.random((cases, slices, d_sae)) * (rng.random((cases, slices, d_sae)) > 0.4)
    acc = TopK.empty(d_sae, k, 1)
    for c in range(cases):
        scores = everything[c]
        best = np.argsort(-scores, axis=0, kind="stable")[:k].T
        cand = np.take_along_axis(scores.T, best, axis=1)
        cand = np.where(cand > 0, cand, -np.inf)
        metrics = (cand * 10)[:, :, None].astype(np.float32)  # a metric that remembers its example
        acc.merge(cand, c, best, metrics, None)
    for j in range(d_sae):
        flat = everything[:, :, j].reshape(-1)
        expected = np.sort(flat[flat > 0])[::-1][:k]
        n = acc.count(j)
        np.testing.assert_allclose(acc.scores[j, :n], expected)
        for i in range(n):
            assert everything[acc.case[j, i], acc.slice[j, i], j] == pytest.approx(acc.scores[j, i])
            assert acc.metrics[j, i, 0] == pytest.approx(10 * acc.scores[j, i], rel=1e-5)


def test_split_halves_and_agreement():
    splits = split_halves(7, 3, seed=1)
    assert len(splits) == 3
    for a, b in splits:
        assert sorted(a + b) == list(range(7)) and len(a) == 3 and not set(a) & set(b)
    assert split_halves(1, 3) == []
    compared, agree = category_agreement(["edema", "dead", "brain edge", "edema"], ["edema", "edema", "diffuse", "dead"])
    assert compared.tolist() == [True, False, True, False] and agree.tolist() == [True, False, False, False]


def _document(**changes):
    doc = {"format_version": 1, "kind": LABELS_KIND, "sae": {"path": "s", "sha256": "abc"}, "model": {"path": "m", "sha256": "def"},
           "cohort": "adult", "top_k": 2, "class_names": list(TUMOUR_CLASSES), "stability": None,
           "latents": [{"id": 0, "category": "edema", "description": "edema, deep", "confidence": 0.6},
                       {"id": 1, "category": "dead", "description": "dead", "confidence": 1.0},
                       {"id": 2, "category": "edema", "description": "edema, superficial", "confidence": 0.9}]}  # fmt: skip
    doc.update(changes)
    return doc


def test_labels_file_reader(tmp_path):
    path = tmp_path / "latents.json"
    path.write_text(json.dumps(_document()))
    labels = load_latent_labels(path)
    assert labels.sae_sha256 == "abc" and labels.model_sha256 == "def" and len(labels) == 3
    assert labels.category(2) == "edema" and labels.description(0) == "edema, deep"
    assert labels.category(99) is None and labels.entry(99) is None and labels.description(99) is None
    assert labels.latents_in_category("edema") == [2, 0]  # most confident first
    assert labels.categories() == {"edema": [2, 0], "dead": [1]}
    bad = {
        "missing.json": None,
        "kind.json": _document(kind="seglens-alignment"),
        "version.json": _document(format_version=2),
        "twice.json": _document(latents=[{"id": 0, "category": "edema"}, {"id": 0, "category": "dead"}]),
        "entry.json": _document(latents=[{"id": "zero", "category": "edema"}]),
    }
    for name, doc in bad.items():
        if doc is not None:
            (tmp_path / name).write_text(json.dumps(doc))
        with pytest.raises(InputFileError) as info:
            load_latent_labels(tmp_path / name)
        assert name in str(info.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputFileError, match="not valid JSON"):
        load_latent_labels(tmp_path / "broken.json")


# --- on real BraTS 2018 cases ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(real_pipeline, tmp_path_factory):
    """``seglens interpret`` run once, as a user would, with figures, on the real cases the SAE was trained on
    (as the paper interprets each SAE on its own cohort)."""
    import contextlib
    import io

    from SegLensLogic.app import cli

    out = tmp_path_factory.mktemp("interpret")
    # Three of the four training cases (a cohort listed in a text file) keep the run within the time budget.
    cohort = out / "cohort.txt"
    cohort.write_text("".join(f"{real_pipeline.root / 'adult-train' / name}\n" for name in REAL_TRAIN_CASES[:3]))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["interpret", "--model", str(real_pipeline.model_dir), "--sae", str(real_pipeline.sae_dir),
                         "--cohort", str(cohort), "--out", str(out / "latents.json"),
                         "--figures", str(out / "figures"), "--gallery-max", "2", "--splits", "2"])  # fmt: skip
    return out, code, stdout.getvalue()


def test_interpret_real_cases(real_pipeline, interpreted):
    out, code, stdout = interpreted
    assert code == 0, stdout
    labels = load_latent_labels(out / "latents.json")
    doc = labels.data
    assert labels.sae_sha256 == sae_sha256(real_pipeline.sae_dir) and labels.model_sha256 == real_pipeline.sae.config.model_sha256
    assert doc["top_k"] == 16 and labels.class_names == list(TUMOUR_CLASSES) and len(labels) == real_pipeline.sae.d_sae
    # The stability figure is printed and stored.
    stability = doc["stability"]
    assert stability["n_compared"] > 0 and 0.0 <= stability["agreement"] <= 1.0
    assert f"{stability['agreement']:.1%}" in stdout and "Split-half stability" in stdout
    assert any(e["stable"] is False for e in doc["latents"]) or stability["agreement"] == 1.0
    # Latents labelled with a tumour class put far more of their activation on that class than its share of the
    # brain; the SAE must have found at least one tumour class.
    tumour = {name: labels.latents_in_category(name) for name in TUMOUR_CLASSES[1:]}
    assert any(tumour.values()), labels.categories()
    for name, ids in tumour.items():
        if not ids:
            continue
        base = doc["base_rates"][name]
        assert 0.0005 < base < 0.2
        p_class = np.array([labels.entry(j)["metrics"][f"p_{name}"] for j in ids])
        assert p_class.mean() > 3 * base and p_class.min() > 1.5 * base
        # Non-tumour latents do not: the association is the latent's, not the metric's.
        others = [e["metrics"][f"p_{name}"] for e in doc["latents"] if e["category"] in ("brain edge", "background", "healthy tissue")]
        assert not others or np.mean(others) < p_class.mean() / 2
        for j in ids:
            entry = labels.entry(j)
            assert entry["description"].startswith(name) and 0 < entry["confidence"] <= 1
            assert 1 <= len(entry["top_examples"]) <= 16 and entry["frequency"] > 0
            acts = [x["activation"] for x in entry["top_examples"]]
            assert acts == sorted(acts, reverse=True)
    assert {x["case_id"] for e in doc["latents"] for x in e["top_examples"]} == set(REAL_TRAIN_CASES[:3])


def test_label_mass_on_held_out_cases(real_pipeline, interpreted):
    """How much of a tumour-labelled latent's whole-volume heatmap falls inside its class on cases the labeller
    never saw: shares in [0, 1], at most the tumour share, checked for one latent against its heatmaps directly."""
    from SegLensLogic.interpretation import label_mass
    from SegLensLogic.sae.codes import encode_volume
    from SegLensLogic.segmentation.inference import prepare_for_model

    out, code, _ = interpreted
    assert code == 0
    labels = load_latent_labels(out / "latents.json")
    held_out = list(real_pipeline.test)[:2]
    measured = label_mass(real_pipeline.model, real_pipeline.sae, labels, held_out)
    assert json.loads(json.dumps(measured)) == measured  # a build step records it as JSON
    assert measured["cases"] == 2 and measured["tumour_latents"] == sum(len(labels.latents_in_category(c)) for c in TUMOUR_CLASSES[1:])
    assert measured["fired"] == len(measured["latents"]) > 0 and set(measured["chance"]) == set(TUMOUR_CLASSES[1:])
    for row in measured["latents"]:
        assert 0.0 <= row["in_class"] <= row["in_tumour"] <= 1.0 and labels.category(row["id"]) == row["category"]
        assert row["top_slices"] == labels.entry(row["id"])["metrics"][f"p_{row['category']}"]
    assert measured["holding"] == sum(r["in_class"] >= measured["holds_at"] for r in measured["latents"])
    # An ideal latent (each cell's share of the class, upsampled as heatmaps are) beats chance and stays below 1.
    assert measured["ideal"] and all(measured["chance"][c] < share < 1.0 for c, share in measured["ideal"].items())
    first = measured["latents"][0]
    inside = total = 0.0
    for case in held_out:
        prepared = prepare_for_model(real_pipeline.model, case)
        heat = encode_volume(real_pipeline.model, real_pipeline.sae, prepared).heatmap(first["id"])
        truth = prepared.to_input_grid(prepared.label)
        inside += heat[truth == TUMOUR_CLASSES.index(first["category"])].sum()
        total += heat.sum()
    assert first["in_class"] == pytest.approx(inside / total, rel=1e-5)
    # The ideal latent: a region covering every voxel keeps all of its mass, an empty one has none, and a class's
    # share falls as its grid coarsens (the same heatmap drawing as the panel's).
    from SegLensLogic.interpretation.label_mass import ideal_latent_mass

    slices = prepared.brain_slices()
    everything = ideal_latent_mass(prepared, np.ones_like(prepared.brain_mask), slices, (16, 16))
    assert everything[1] > 0 and everything[0] == pytest.approx(everything[1], rel=1e-6)
    assert not ideal_latent_mass(prepared, np.zeros_like(prepared.brain_mask), slices, (16, 16)).any()
    edema = prepared.label == TUMOUR_CLASSES.index("edema")
    shares = [np.divide(*ideal_latent_mass(prepared, edema, slices, (g, g))) for g in (8, 16, 32)]
    assert shares == sorted(shares) and 0 < shares[0] < shares[-1] < 1
    assert measured["case_ids"] == [case.case_id for case in held_out]

    # A bundle's labels carry the measure: each measured latent's shares, the cases, the bar; others none.
    from SegLensLogic.interpretation import annotate_labels

    document = json.loads((out / "latents.json").read_text())
    annotated = annotate_labels(document, measured)
    assert "held_out" not in document["latents"][first["id"]]  # the input is not modified
    (out / "annotated.json").write_text(json.dumps(annotated))
    again = load_latent_labels(out / "annotated.json")
    assert again.data["held_out"]["case_ids"] == measured["case_ids"] and again.data["held_out"]["holds_at"] == 0.4
    assert again.data["held_out"]["ideal"] == measured["ideal"]
    for row in measured["latents"]:
        assert again.held_out(row["id"])["in_class"] == pytest.approx(row["in_class"], abs=1e-4)
    unmeasured = [j for j in range(real_pipeline.sae.d_sae) if j not in {r["id"] for r in measured["latents"]}]
    assert all(again.held_out(j) is None for j in unmeasured)
    annotated["latents"][first["id"]]["held_out"]["in_class"] = "high"
    (out / "annotated.json").write_text(json.dumps(annotated))
    with pytest.raises(InputFileError, match=rf"latents\[{first['id']}\]\.held_out\.in_class"):
        load_latent_labels(out / "annotated.json")


def test_interpret_figures(interpreted):
    out, code, _ = interpreted
    assert code == 0
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) == 3 and pngs[0].name == "categories.png"  # the chart and two galleries
    labels = load_latent_labels(out / "latents.json")
    shown = [int(p.stem.split("_")[1]) for p in pngs[1:]]
    assert all(labels.category(j) != "dead" for j in shown)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_interpret_cli_errors(real_pipeline, interpreted, brats2023_case, capsys, tmp_path):
    out, code, _ = interpreted
    assert code == 0
    labels = out / "latents.json"
    before = labels.read_bytes()

    def refused(cohort, out_file, *extra, fragments):
        code, _, err = seglens(capsys, "interpret", "--model", real_pipeline.model_dir, "--sae", real_pipeline.sae_dir,
                               "--cohort", cohort, "--out", out_file, *extra)  # fmt: skip
        assert_one_line_error(code, err, *fragments)

    # An existing labels file is kept unless --overwrite.
    refused(brats2023_case, labels, fragments=(labels, "--overwrite"))
    assert labels.read_bytes() == before
    # A cohort with an unlabelled case is refused before any work, naming the case.
    refused(brats2023_case, tmp_path / "x.json", fragments=(brats2023_case, "has no label map"))
    assert not (tmp_path / "x.json").exists()
    refused(brats2023_case, tmp_path / "x.json", "--gallery-max", "2", fragments=("--figures",))
    refused(brats2023_case, tmp_path / "x.json", "--top-k", "0", fragments=("--top-k",))
    refused(tmp_path / "nowhere", tmp_path / "x.json", fragments=("nowhere",))
    # Held-out cases must be new to the labeller.
    train_case = real_pipeline.root / "adult-train" / REAL_TRAIN_CASES[0]
    refused(train_case, tmp_path / "x.json", "--held-out", out / "cohort.txt", fragments=("--held-out", REAL_TRAIN_CASES[0], "also in the labelling cohort"))
    assert not (tmp_path / "x.json").exists()


def test_interpret_measures_the_labels_on_held_out_cases(real_pipeline, capsys, tmp_path):
    """``--held-out``: the labels file carries each tumour label's hold on the new cases, as a bundle's does."""
    train_case = real_pipeline.root / "adult-train" / REAL_TRAIN_CASES[0]
    held_out = real_pipeline.root / "adult-test" / REAL_TEST_CASES[0]
    code, out, err = seglens(capsys, "interpret", "--model", real_pipeline.model_dir, "--sae", real_pipeline.sae_dir, "--cohort", train_case,
                             "--out", tmp_path / "latents.json", "--splits", "0", "--held-out", held_out)  # fmt: skip
    assert code == 0, err
    labels = load_latent_labels(tmp_path / "latents.json")
    assert labels.data["held_out"]["case_ids"] == [REAL_TEST_CASES[0]]
    measured = [j for j in range(len(labels)) if labels.held_out(j) is not None]
    assert measured and all(labels.category(j) in TUMOUR_CLASSES[1:] for j in measured)
    assert all(0.0 <= labels.held_out(j)["in_class"] <= labels.held_out(j)["in_tumour"] <= 1.0 for j in measured)
    assert "Held out: tumour-labelled latents put" in out + err


def test_real_aseg_structures_and_sides(bert_case):
    """FreeSurfer's own Left-/Right-Thalamus labels (aseg 10 / 49) land on the left / right of the RAS arrays the
    metrics read, and a blob on a real thalamus is labelled with that structure."""
    from SegLensLogic.data import find_case, prepare_case, read_case, read_image

    case = find_case(bert_case)
    images = read_case(case)
    prepared = prepare_case(images, images.case.modalities[:1], 64)
    raw = prepared.orientation.apply(read_image(case.label).array.astype(np.int32))
    spacing = (1.0, 1.0)
    for code, sign in ((10, -1), (49, 1)):
        z = int(np.argmax((raw == code).sum(axis=(0, 1))))
        xs, ys = np.nonzero(raw[:, :, z] == code)
        grid_x, grid_y = np.meshgrid(np.arange(raw.shape[0]), np.arange(raw.shape[1]), indexing="ij")
        heat = np.exp(-0.5 * ((grid_x - xs.mean()) ** 2 + (grid_y - ys.mean()) ** 2) / 4.0**2) * prepared.brain_mask[:, :, z]
        context = slice_context(prepared.label[:, :, z], prepared.brain_mask[:, :, z], len(HEALTHY_CLASSES), spacing)
        m = dict(zip(metric_names(HEALTHY_CLASSES), slice_metrics(heat, context)[0].tolist()))
        assert categorise(m, HEALTHY_CLASSES)[0] == "thalamus", m
        assert sign * m["lateralisation"] > 0.9 and sign * m["centroid_lr"] > 0.05
        assert m["depth"] > 0.5  # the thalamus is deep
