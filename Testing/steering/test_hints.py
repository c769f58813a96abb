"""Hints: parsing and checking what a user points at, the simulated user's clicks on masks with known errors, the
output-level baselines, and a hint fix on a real case that is an ordinary recipe (replayed bit for bit, undone)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_one_line_error, seglens
from SegLensLogic.data import read_case
from SegLensLogic.data.preprocessing import prepare_case
from SegLensLogic.errors import SegLensError
from SegLensLogic.experiments.baselines import logit_bias_fix, paint_spheres
from SegLensLogic.experiments.clicks import Click, click_hint, next_click
from SegLensLogic.steering import LatentEdit, SteeringSession, load_recipe
from SegLensLogic.steering.hints import MAX_HINTS, Hint, parse_hint, point_to_ras_voxel, ras_voxel_to_point, resolve_hints

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["background", "necrotic core", "edema", "enhancing tumour"]


# -- hints ------------------------------------------------------------------------------------------------------------
def test_hints_parse_from_the_command_line_form():
    assert parse_hint("10,-20.5,3:+", CLASSES) == Hint((10.0, -20.5, 3.0), "+", None)
    assert parse_hint("1,2,3:-", CLASSES) == Hint((1.0, 2.0, 3.0), "-", None)
    assert parse_hint("1,2,3:+edema", CLASSES).cls == 2
    assert parse_hint("1, 2, 3:+ET", CLASSES).cls == 3
    assert parse_hint("1,2,3:-necrotic", CLASSES) == Hint((1.0, 2.0, 3.0), "-", 1)
    assert parse_hint("1,2,3:+Enhancing Tumour", CLASSES).cls == 3
    assert parse_hint("1,2,3:+edema", CLASSES).describe(CLASSES) == "1,2,3:+edema"


@pytest.mark.parametrize(
    "text, words",
    [
        ("1,2,3", "write it as R,A,S:+"),
        ("1,2,3:x", "write it as R,A,S:+"),
        ("1,2:+", "three numbers"),
        ("a,b,c:+", "three numbers"),
        ("1,nan,3:+", "not a finite number"),
        ("1,2,inf:-", "not a finite number"),
        ("1,2,3:+tumor core", "unknown class 'tumor core'"),
    ],
)
def test_malformed_hints_are_refused_in_one_line(text, words):
    with pytest.raises(SegLensError, match=words) as caught:
        parse_hint(text, CLASSES)
    assert "\n" not in str(caught.value)


def test_hints_are_checked_against_the_case(synthetic_case):
    case = read_case(synthetic_case(), modalities=["t1n", "t1c", "t2w", "t2f"])
    prepared = prepare_case(case, ["t1n", "t1c", "t2w", "t2f"], size=32)
    brain = np.argwhere(prepared.brain_mask)
    inside = tuple(int(v) for v in brain[len(brain) // 2])
    point = ras_voxel_to_point(inside, prepared)
    assert point_to_ras_voxel(point, prepared) == inside  # world point <-> voxel, through an oblique LPS-like affine
    resolved = resolve_hints([Hint(point, "+", 2)], prepared, 4)
    assert resolved[0].voxel == inside
    with pytest.raises(SegLensError, match="outside the volume"):
        resolve_hints([Hint((1e4, 0, 0), "+")], prepared, 4)
    outside = tuple(int(v) for v in np.argwhere(~prepared.brain_mask)[0])
    with pytest.raises(SegLensError, match="outside the brain"):
        resolve_hints([Hint(ras_voxel_to_point(outside, prepared), "-")], prepared, 4)
    with pytest.raises(SegLensError, match="contradict"):
        resolve_hints([Hint(point, "+"), Hint(point, "-")], prepared, 4)
    with pytest.raises(SegLensError, match="contradict"):
        resolve_hints([Hint(point, "+", 1), Hint(point, "+", 3)], prepared, 4)
    resolve_hints([Hint(point, "+", 1), Hint(point, "-", 2)], prepared, 4)  # "necrotic, not edema": consistent
    with pytest.raises(SegLensError, match="does not exist"):
        resolve_hints([Hint(point, "+", 7)], prepared, 4)
    with pytest.raises(SegLensError, match=f"at most {MAX_HINTS}"):
        resolve_hints([Hint(point, "+")] * (MAX_HINTS + 1), prepared, 4)
    with pytest.raises(SegLensError, match="no hint"):
        resolve_hints([], prepared, 4)
    with pytest.raises(SegLensError, match="finite"):
        Hint((0.0, float("nan"), 0.0), "+")


# -- the simulated user ---------------------------------------------------------------------------------------------
def test_the_click_lands_inside_the_largest_error_component_at_its_interior():
    truth = np.zeros((40, 40, 30), dtype=np.uint8)
    truth[5:25, 5:25, 5:25] = 2  # edema, a 20-voxel cube
    truth[30:36, 30:36, 10:16] = 1  # necrotic core, small
    labels = truth.copy()
    labels[5:25, 5:25, 5:15] = 0  # the lower half of the edema missed: 20 x 20 x 10
    labels[30:36, 30:36, 10:16] = 0  # the whole necrotic core missed (6^3, smaller)
    labels[0:3, 30:33, 0:3] = 3  # a small false tumour
    click = next_click(labels, truth)
    assert (click.sign, click.cls, click.component_voxels) == ("+", 2, 4000)
    x, y, z = click.voxel
    assert 14 <= x <= 15 and 14 <= y <= 15 and 9 <= z <= 10  # the centre of the missed slab: farthest from its border
    # Anisotropic voxels: the distance is in mm, so the interior moves along the finely sampled axis only.
    assert next_click(labels, truth, spacing=(1.0, 1.0, 3.0)).voxel[2] in range(5, 15)
    labels[5:25, 5:25, 5:15] = 2
    labels[30:36, 30:36, 10:16] = 1
    labels[0:12, 30:40, 0:10] = 3  # now the false tumour is the largest error
    click = next_click(labels, truth)
    assert (click.sign, click.cls) == ("-", None) and labels[click.voxel] == 3 and truth[click.voxel] == 0
    assert next_click(truth, truth) is None


def test_a_click_becomes_a_hint_at_its_voxel(synthetic_case):
    case = read_case(synthetic_case(), modalities=["t1n", "t1c", "t2w", "t2f"])
    prepared = prepare_case(case, ["t1n", "t1c", "t2w", "t2f"], size=32)
    voxel = tuple(int(v) for v in np.argwhere(prepared.brain_mask)[0])
    hint = click_hint(Click(voxel, "+", 3, 10), prepared)
    assert (hint.sign, hint.cls) == ("+", 3)
    assert resolve_hints([hint], prepared, 4)[0].voxel == voxel


# -- extent and composition apart ------------------------------------------------------------------------------------
def test_label_rules_keep_the_extent_or_the_composition():
    from SegLensLogic.steering.interventions import apply_label_rule

    before = np.array([0, 0, 1, 2, 3, 3], dtype=np.uint8)
    after = np.array([2, 0, 0, 3, 1, 0], dtype=np.uint8)  # grows, loses, relabels
    assert apply_label_rule("model", before, after).tolist() == after.tolist()
    assert apply_label_rule("grow", before, after).tolist() == [2, 0, 1, 2, 3, 3]  # only adds; classes kept
    assert apply_label_rule("shrink", before, after).tolist() == [0, 0, 0, 2, 3, 0]  # only removes
    assert apply_label_rule("extent", before, after).tolist() == [2, 0, 0, 2, 3, 0]  # the border moves, classes stay
    assert apply_label_rule("composition", before, after).tolist() == [0, 0, 1, 3, 1, 3]  # the extent stays


def test_the_rule_follows_what_the_hints_ask():
    from SegLensLogic.steering.guided import rule_for_hints
    from SegLensLogic.steering.hints import HintVoxel

    current = np.zeros((4, 4, 4), dtype=np.uint8)
    current[0, 0, 0], current[1, 1, 1] = 2, 3

    def at(voxel, sign, cls=None):
        return HintVoxel(Hint((0.0, 0.0, 0.0), sign, cls), voxel)

    assert rule_for_hints([at((3, 3, 3), "+", 2)], current) == "grow"
    assert rule_for_hints([at((0, 0, 0), "-")], current) == "shrink"
    assert rule_for_hints([at((3, 3, 3), "+"), at((0, 0, 0), "-")], current) == "extent"
    assert rule_for_hints([at((0, 0, 0), "+", 1)], current) == "composition"  # edema said to be necrotic
    assert rule_for_hints([at((1, 1, 1), "-", 3)], current) == "composition"  # "not enhancing" on enhancing
    assert rule_for_hints([at((0, 0, 0), "+", 1), at((3, 3, 3), "+")], current) == "model"  # both kinds
    assert rule_for_hints([at((0, 0, 0), "+", 2)], current) == "model"  # already right: nothing asked


# -- output-level baselines ---------------------------------------------------------------------------------------------
def test_spheres_paint_balls_of_the_hinted_class_in_millimetres():
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    painted = paint_spheres(labels, [Click((15, 15, 15), "+", 2, 1)], 4.0, spacing=(1.0, 1.0, 2.0))
    assert painted[15, 15, 15] == 2 and painted[19, 15, 15] == 2 and painted[20, 15, 15] == 0
    assert painted[15, 15, 17] == 2 and painted[15, 15, 18] == 0  # 2 mm slices: two slices make 4 mm
    assert set(np.unique(painted)) == {0, 2} and labels.max() == 0  # the input is not modified
    erased = paint_spheres(painted, [Click((15, 15, 15), "-", None, 1)], 2.0, spacing=(1.0, 1.0, 1.0))
    assert erased[15, 15, 15] == 0 and erased[19, 15, 15] == 2


def test_the_logit_bias_moves_the_threshold_inside_its_region_only():
    probabilities = np.zeros((20, 20, 10, 4), dtype=np.float32)
    probabilities[...] = [0.97, 0.01, 0.01, 0.01]  # confidently background everywhere
    labels = np.zeros((20, 20, 10), dtype=np.uint8)
    hint = np.zeros(labels.shape, dtype=bool)
    hint[10, 10, 5] = True
    region = np.zeros(labels.shape, dtype=bool)
    region[:, :, 3:8] = True
    fixed, bias = logit_bias_fix(probabilities, labels, [hint], [("+", 2)], region)
    assert fixed[10, 10, 5] == 2 and bias[2] > bias[0]
    assert (fixed[region] == 2).all() and (fixed[~region] == 0).all()  # a threshold cannot aim: it floods its region


# -- the fix on a real case ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder(real_pipeline, real_decoder_sae):
    """The real pipeline's model with its SAE at the decoder level ``up_4`` (edits at the encoder's ``down_3`` are
    carried around by the skip connections of so small a U-Net: a fix there finds nothing to move)."""
    from SegLensLogic.sae import BatchTopKSAE

    return real_pipeline.model, BatchTopKSAE.load(real_decoder_sae), real_decoder_sae


@pytest.fixture(scope="module")
def hinted(real_pipeline, decoder):
    """A session on a held-out real case, and a hint at the interior of its largest error."""
    from SegLensLogic.steering.guided import _ras_spacing

    model, sae, _ = decoder
    session = SteeringSession(model, sae, real_pipeline.test[0])
    session.segment()
    prepared = session.prepared
    truth = prepared.orientation.apply(read_case(real_pipeline.test[0], modalities=["t1n"]).label)
    click = next_click(prepared.orientation.apply(session.base_labels), truth, _ras_spacing(prepared))
    return session, [click_hint(click, prepared)]


def test_a_fix_is_ordinary_latent_edits_that_replay_bit_for_bit_and_undo(real_pipeline, hinted, tmp_path):
    session, hints = hinted
    session.reset()
    fix = session.fix(hints)
    assert fix.edits and all(isinstance(e, LatentEdit) and e.mode == "scale" for e in fix.edits)
    assert len(fix.losses) > 1 and fix.region.kind in ("slices", "mask")
    fixed = session.apply(fix.edits)
    assert len(session.edits) == len(fix.edits) and not np.array_equal(fixed, session.base_labels)
    mask, recipe = session.export(tmp_path / "fixed.nii.gz")
    replay = SteeringSession(session.model, session.sae, real_pipeline.test[0])
    assert np.array_equal(replay.apply_recipe(load_recipe(recipe), source=recipe), fixed)
    assert np.array_equal(session.undo(), session.base_labels)  # one Apply, one step back
    identity = [LatentEdit(e.latents, "scale", 1.0, region=e.region) for e in fix.edits]
    assert np.array_equal(session.apply(identity), session.base_labels)  # identity edits: the model's own mask
    session.reset()


def test_fixes_applied_in_steps_replay_step_by_step(real_pipeline, hinted, tmp_path):
    """Each Apply's label rule reads the labels before it: a recipe of two fixes replays as two steps, bit for bit."""
    session, hints = hinted
    session.reset()
    first = session.fix(hints)
    edits = first.edits or [LatentEdit((session.top_latents(1)[0][0],), "scale", 2.0, region=first.region, labels="grow")]
    session.apply(edits)
    second = [LatentEdit((session.top_latents(2)[1][0],), "scale", 0.5, labels="composition")]
    labels = session.apply(second)
    _, recipe_path = session.export(tmp_path / "two-steps.nii.gz")
    recipe = load_recipe(recipe_path)
    assert [e.get("step") for e in recipe.edits] == [1] * len(edits) + [2]
    assert recipe.edits[-1]["labels"] == "composition"
    replay = SteeringSession(session.model, session.sae, real_pipeline.test[0])
    assert np.array_equal(replay.apply_recipe(recipe, source=recipe_path), labels)
    with pytest.raises(SegLensError, match="share one label rule"):
        session.apply([LatentEdit((1,), "scale", 2.0, labels="grow"), LatentEdit((2,), "scale", 2.0)])
    session.reset()


def test_the_random_control_fits_other_latents_on_the_same_hints(hinted):
    session, hints = hinted
    session.reset()
    aimed = session.fix(hints)
    control = session.fix(hints, random_seed=1)
    assert control.region == aimed.region and len(control.latents) == len(aimed.latents)
    assert set(control.latents) != set(aimed.latents) and control.attribution == ()
    assert session.fix(hints, random_seed=1).latents == control.latents  # seeded


def test_bad_hints_change_nothing(hinted):
    session, hints = hinted
    session.reset()
    before = session.labels
    for bad in ([Hint((1e4, 1e4, 1e4), "+")], [hints[0], Hint(hints[0].point, "-")], []):
        with pytest.raises(SegLensError):
            session.fix(bad)
    assert session.edits == [] and np.array_equal(session.labels, before)


def test_steer_command_fixes_from_hints_and_refuses_bad_ones(real_pipeline, decoder, hinted, tmp_path, capsys):
    from pathlib import Path

    session, hints = hinted
    case_dir = Path(real_pipeline.test[0].images["t1n"]).parent
    common = ["steer", "--model", real_pipeline.model_dir, "--sae", decoder[2], "--case", case_dir, "--device", "cpu"]
    code, out, err = seglens(capsys, *common, "--hint", hints[0].describe(CLASSES), "--out", tmp_path / "fixed.nii.gz")
    assert code == 0, err
    assert "Fix from 1 hint(s)" in out and load_recipe(tmp_path / "fixed.recipe.json").edits
    code, _, err = seglens(capsys, *common, "--hint", "0,0,0:+tumour core", "--out", tmp_path / "b.nii.gz")
    assert_one_line_error(code, err, "0,0,0:+tumour core", "unknown class")
    code, _, err = seglens(capsys, *common, "--hint", "9999,9999,9999:+", "--out", tmp_path / "c.nii.gz")
    assert_one_line_error(code, err, "9999,9999,9999:+", "outside the volume")
    assert not (tmp_path / "b.nii.gz").exists() and not (tmp_path / "c.nii.gz").exists()
