"""The reference bundles shipped in ``Resources/``: each loads, and still does what its model card says.

Every bundle there is checked (the SegFormer reference and, once published, the U-Net beside it). They are part
of the repository, so these tests fail (never skip) when one is missing or broken. They read one held-back test
case from ``../shared/data`` (skipped with a reason where that folder is absent) and compare what the shipped
weights do on it with the figures the build wrote on the card.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from SegLensLogic.bundle import load_bundle
from SegLensLogic.data.cases import find_case, read_case
from SegLensLogic.data.labels import TUMOUR_CLASSES
from SegLensLogic.errors import SegLensError
from SegLensLogic.segmentation.scores import segmentation_scores
from SegLensLogic.resources import REFERENCE_BUNDLE_NAME, resources_folder, shipped_bundles
from SegLensLogic.sae.trainer import evaluate_reconstruction
from SegLensLogic.steering import LatentEdit
from SegLensLogic.steering.encoded import encode_case

TUMOUR_CATEGORIES = ("necrotic core", "edema", "enhancing tumour")


# Every shipped bundle (the reference at least: its absence fails the tests, it does not skip them).
SHIPPED = [p.name for p in shipped_bundles()] or [REFERENCE_BUNDLE_NAME]


@pytest.fixture(scope="module", params=SHIPPED)
def bundle(request):
    return load_bundle(resources_folder() / request.param)  # verifies every file's hash


@pytest.fixture(scope="module")
def test_case(bundle, shared_data):
    """The last held-back test case the card lists (in ``brats2018/`` or ``brats-extra/``)."""
    case_id = bundle.figures["training"]["test_cases"][-1]
    for family in ("brats2018", "brats-extra"):
        if (shared_data / family / case_id).is_dir():
            return find_case(shared_data / family / case_id)
    pytest.skip(f"the shipped bundle's test case {case_id} is not in {shared_data}")


@pytest.fixture(scope="module")
def encoded(bundle, test_case):
    torch.set_num_threads(2)
    model, sae = bundle.load_model(device="cpu"), bundle.load_sae(device="cpu")
    return model, sae, encode_case(model, sae, test_case)


def card_row(bundle, case_id: str) -> dict[str, float]:
    """The card's per-class Dice row for ``case_id`` (first table it appears in: the test cases)."""
    text = bundle.card_path.read_text(encoding="utf-8")
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == case_id:
            return dict(zip(("dice_NC", "dice_ED", "dice_ET", "dice_WT", "dice_TC"), map(float, cells[1:6])))
    raise AssertionError(f"{case_id} has no row on the model card")


def test_the_shipped_bundle_is_complete_and_says_what_it_is(bundle):
    figures = bundle.figures
    assert bundle.name.startswith("adult-glioma") and bundle.modalities == ["t1n", "t1c", "t2w", "t2f"]
    assert bundle.class_names == list(TUMOUR_CLASSES)
    # The folder says which architecture it holds (adult-glioma-segformer, adult-glioma-unet).
    assert bundle.load_model(device="cpu").config.arch.startswith(bundle.root.name.rsplit("-", 1)[1])
    # The model never trained on its test cases, nor on the BraTS 2013 cohort it is measured on.
    training = figures["training"]
    assert not set(training["cases"]) & set(training["test_cases"])
    assert not set(training["cases"]) & set(training["validation_cases"])
    assert training["held_out_cohort"] and training["epochs"] > 0 and training["hardware"]
    # Its SAE, labels for every latent, three population alignments against the same SAE, and suggestions.
    sae = bundle.load_sae(device="cpu")
    labels = bundle.load_labels()
    assert len(labels) == sae.d_sae and sae.config.k == figures["sae"]["k"]
    assert sae.d_sae == figures["sae"]["expansion"] * sae.config.d_in
    populations = {f"adult-vs-{name}.json" for name in ("brats2013", "ssa", "pediatric")}
    assert populations <= {p.name for p in bundle.alignment_paths} and set(bundle.load_suggestions().populations) >= {"ssa", "brats2013"}
    assert any(labels.latents_in_category(c) for c in TUMOUR_CATEGORIES)
    card = bundle.card_path.read_text(encoding="utf-8")
    assert "research only, not clinical use" in card and "BraTS" in card
    if "Do the labels hold on the" in card:  # measured by the build: the shipped labels carry it latent by latent
        held = [labels.held_out(j)["in_class"] for j in range(sae.d_sae) if labels.held_out(j)]
        assert labels.data["held_out"]["case_ids"] == training["test_cases"]
        assert f"inside its class: mean {np.mean(held):.0%} " in card
    for key in ("dice_WT", "dice_TC", "dice_ET", "dice_ED", "dice_NC"):
        assert 0.0 <= figures["dice_test"][key] <= 1.0
        assert f"{figures['dice_test'][key]:.3f}" in card


def test_segments_a_held_back_case_as_the_card_says(bundle, test_case, encoded):
    _model, _sae, item = encoded
    scores = segmentation_scores(item.labels, read_case(test_case).label, bundle.class_names)
    row = card_row(bundle, test_case.case_id)
    assert scores["dice_WT"] == pytest.approx(row["dice_WT"], abs=0.05)
    assert scores["dice_TC"] == pytest.approx(row["dice_TC"], abs=0.05)
    assert scores["dice_WT"] > 0.6  # a real segmentation, not an empty or full mask


def test_the_sae_reconstructs_the_case_as_the_card_says(bundle, encoded):
    model, sae, item = encoded
    forward = item.forward
    vectors = forward.activations.permute(0, 2, 3, 1)[forward.encoded(sae).bool()]
    metrics = evaluate_reconstruction(sae, vectors)
    card = bundle.figures["sae"]
    assert metrics["explained_variance"] == pytest.approx(card["explained_variance"], abs=0.05)
    assert metrics["l0"] == pytest.approx(card["l0"], abs=2.0)
    assert metrics["explained_variance"] > 0.85


def test_steering_tumour_latents_moves_the_mask(bundle, encoded):
    _model, sae, item = encoded
    labels = bundle.load_labels()
    tumour = [j for c in TUMOUR_CATEGORIES for j in labels.latents_in_category(c)]
    # The tumour latents that fire most on this case.
    mass = np.bincount(item.codes.latents, weights=item.codes.values, minlength=sae.d_sae)
    chosen = sorted(tumour, key=lambda j: -mass[j])[:3]
    assert mass[chosen[0]] > 0
    before = item.labels
    tumour_voxels = int((before > 0).sum())
    zeroed = item.steer(sae, [LatentEdit(tuple(chosen), "zero")])
    boosted = item.steer(sae, [LatentEdit(tuple(chosen), "scale", 4.0)])
    # Removing them shrinks the tumour, boosting them grows it, each by a visible amount.
    assert int((zeroed > 0).sum()) < tumour_voxels < int((boosted > 0).sum())
    assert (zeroed != before).sum() > 0.01 * tumour_voxels and (boosted != before).sum() > 0.01 * tumour_voxels
    # An edit that changes nothing leaves the mask as it was.
    assert np.array_equal(item.steer(sae, [LatentEdit(tuple(chosen), "scale", 1.0)]), before)


def test_the_card_records_steering_against_a_random_control(bundle):
    repair = bundle.figures["repair"]
    assert {"oracle (top latents)", "calibrated (top latents)", "ground-truth-free (specific latents)",
            "calibrated (random latents)", "ground-truth-free (random latents)"} <= set(repair)
    for arm, row in repair.items():
        assert row["cases"] > 0 and 0.0 <= row["recovered"] <= 1.0, arm
        assert re.match(r"^[+-]\d\.\d+ \[[+-]?\d\.\d+, [+-]?\d\.\d+\]$", row["dice_mean"]), row["dice_mean"]
    # A suggestion says how its method did on these failures (what the module and `steer --suggest` show).
    suggestions = bundle.load_suggestions()
    for method, arm in (("ground-truth-free", "ground-truth-free (specific latents)"), ("calibrated", "calibrated (top latents)")):
        evidence = suggestions.evidence(method)
        assert evidence is not None and repair[arm]["dice_mean"] in evidence and "against random latents" in evidence


def test_evaluating_a_case_without_some_sequences_matches_the_card(bundle, brats2013_dir):
    """``seglens evaluate`` on a BraTS 2013 case (T1c and FLAIR only) with the shipped model, which was trained to
    accept missing sequences: the case is evaluated (not refused), and its Dice is the card's row for it."""
    from SegLensLogic.data.cohort import Cohort
    from SegLensLogic.segmentation.evaluation import evaluate_cohort

    folder = brats2013_dir / "brats_2013_pat0002_1"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not in ../shared/data")
    torch.set_num_threads(2)
    model = bundle.load_model(device="cpu")
    assert model.config.accepts_missing_modalities
    rows = evaluate_cohort(model, Cohort(name="brats2013", cases=[find_case(folder)]))
    row, card = rows[0], card_row(bundle, folder.name)
    assert row["case"] == folder.name
    for key, value in card.items():
        assert row[key] == pytest.approx(value, abs=0.05), (key, row[key], value)


def test_shipped_references_of_two_architectures_are_aligned_with_each_other():
    """Each shipped reference holds an alignment with every shipped reference of another architecture (made from
    the same images through both models, as cosines between their dictionaries mean nothing across models)."""
    bundles = [load_bundle(resources_folder() / name, verify=False) for name in SHIPPED]
    pairs = [(a, b) for a in bundles for b in bundles if a.manifest["model"]["arch"].split("-")[0] != b.manifest["model"]["arch"].split("-")[0]]
    if not pairs:
        pytest.skip(f"one architecture ships ({', '.join(SHIPPED)}): no cross-architecture alignment to check")
    for a, b in pairs:
        found = [x for x in a.load_alignments() if {x.sae("a").get("sha256"), x.sae("b").get("sha256")} == {a.manifest["sae"]["sha256"], b.manifest["sae"]["sha256"]}]
        assert found, f"{a.root.name} has no alignment with {b.root.name}'s SAE"
        document = found[0].document
        assert document["method"] in ("activation-correlation", "procrustes")
        assert len(document["shared_a"]) == len(document["shared_b"]) and 0.0 <= document["shared_fraction"] <= 1.0


def test_an_alignment_with_another_architecture_does_not_change_population_status(bundle):
    """The cross-architecture file compares two models of one cohort: it is not a population, so a latent's
    status (specific, shared, universal) is what the population alignments alone say, and a latent shared with
    every population it is compared with reads "universal" with the architecture file loaded."""
    from SegLensLogic.steering.selection import latents_with_status, population_status

    alignments = bundle.load_alignments()
    sha, d_sae = bundle.manifest["sae"]["sha256"], bundle.manifest["sae"]["d_sae"]
    populations = [a for a in alignments if a.compares_populations]
    others = [a for a in alignments if not a.compares_populations]
    assert {a.sae_a["cohort"] for a in others} == {a.sae_b["cohort"] for a in others} and populations
    statuses = [population_status(alignments, sha, j) for j in range(d_sae)]
    assert statuses == [population_status(populations, sha, j) for j in range(d_sae)]
    partners = {a.sae("b" if a.side_of(sha) == "a" else "a")["name"] for a in populations}
    assert all(set(shared_with) <= partners for _, shared_with in statuses)
    latent = max(range(d_sae), key=lambda j: len(statuses[j][1]))
    sharing = [a for a in populations if a.status(latent, a.side_of(sha)) == "shared"]
    if len(sharing) < 2:
        pytest.skip(f"{bundle.root.name}: no latent is shared with two populations")
    assert population_status(sharing + others, sha, latent)[0] == "universal"
    with pytest.raises(SegLensError, match="the loaded ones compare models of one cohort"):
        latents_with_status(others, sha, d_sae, "specific")


def test_the_labels_say_which_latents_another_seed_finds_again(bundle):
    """The shipped labels were compared with an SAE of another seed on the same activations: every live latent says
    whether it is found again, and the flags add up to the floor recorded beside them."""
    labels = bundle.load_labels()
    replica = labels.data["replica"]
    assert replica["seed"] == 1 and replica["tau"] == 0.8 and len(replica["sha256"]) == 64
    assert replica["sha256"] != bundle.manifest["sae"]["sha256"]
    flags = [labels.replicates(j) for j in range(bundle.manifest["sae"]["d_sae"])]
    compared = [f for f in flags if f is not None]
    assert len(compared) == replica["live"] and sum(compared) / len(compared) == pytest.approx(replica["live_shared"], abs=1e-4)
    assert all(labels.replicates(j) is None for j in labels.latents_in_category("dead"))
    # Compared with several seeds (the U-Net: seeds 1 to 5): each live latent counts them, each seed's floor adds up.
    replicas = labels.replicas()
    assert replicas[0] == replica and len({r["sha256"] for r in replicas}) == len(replicas)
    found = [labels.found_by(j) for j in range(bundle.manifest["sae"]["d_sae"])]
    assert [f is None for f in found] == [f is None for f in flags]
    assert all(int(flag) <= count <= len(replicas) for flag, count in zip(flags, found) if flag is not None)
    if len(replicas) > 1:
        assert sum(f for f in found if f is not None) / len(compared) == pytest.approx(sum(r["live_shared"] for r in replicas), abs=1e-3)


def test_resources_stay_small_enough_to_ship():
    """Every shipped bundle together (the extension installs ``Resources/`` beside the module): at most 80 MB."""
    total = sum(p.stat().st_size for p in resources_folder().rglob("*") if p.is_file())
    assert total <= 80 * 2**20, f"Resources/ holds {total / 2**20:.1f} MB"
