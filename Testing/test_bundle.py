"""Model bundles: built from a model folder and an SAE folder, loaded in one call, validated on load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, save_tiny_unet, seglens
from SegLensLogic.bundle import MANIFEST_NAME, build_bundle, load_bundle
from SegLensLogic.errors import InputFileError, OutputExistsError
from SegLensLogic.networks import weights_sha256
from SegLensLogic.sae import BatchTopKSAE, SAEConfig, sae_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODALITIES = ["t1n", "t1c", "t2w", "t2f"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny untrained U-Net, an SAE on its default hook (32 channels), latent labels and an alignment for it."""
    root = tmp_path_factory.mktemp("bundle-parts")
    model_dir = save_tiny_unet(root / "model", MODALITIES)
    torch.manual_seed(0)
    sae = BatchTopKSAE(SAEConfig(d_in=32, expansion=4, k=8, threshold=0.5, hook_point="down_3", model_sha256=weights_sha256(model_dir)))
    sae.save(root / "sae")
    sha = sae_sha256(root / "sae")
    labels = root / "latents.json"
    labels.write_text(json.dumps({"format_version": 1, "kind": "seglens-latent-labels", "sae": {"path": "x", "sha256": sha},
                                  "latents": [{"id": 0, "category": "edema"}]}))  # fmt: skip
    alignment = root / "adult-vs-pediatric.json"
    alignment.write_text(json.dumps({"format_version": 1, "kind": "seglens-alignment", "method": "decoder-encoder-cosine", "tau": 0.8,
                                     "sae_a": {"name": "adult", "sha256": sha, "d_sae": 128, "d_in": 32},
                                     "sae_b": {"name": "pediatric", "sha256": "0" * 64, "d_sae": 128, "d_in": 32},
                                     "pairs": [], "shared_a": [], "shared_b": []}))  # fmt: skip
    return root, model_dir, root / "sae", labels, alignment


@pytest.fixture(scope="module")
def bundle_dir(parts, tmp_path_factory):
    _, model_dir, sae_dir, labels, alignment = parts
    out = tmp_path_factory.mktemp("bundles") / "adult"
    build_bundle(model_dir, sae_dir, out, "adult", labels=labels, alignments=[alignment], cohort="adult")
    return out


def broken_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    return copy


def edit_manifest(folder: Path, change) -> Path:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


def test_bundle_loads_in_one_call_with_everything(bundle_dir, parts):
    _, model_dir, sae_dir, _, _ = parts
    bundle = load_bundle(bundle_dir)
    assert bundle.name == "adult" and bundle.cohort == "adult"
    assert bundle.hook_point == "down_3"
    assert bundle.modalities == MODALITIES and bundle.image_size == 64 and bundle.label_scheme == "brats2023"
    assert bundle.class_names == ["background", "necrotic core", "edema", "enhancing tumour"]
    assert bundle.colours[0] == (0, 0, 0) and bundle.colours[1] == (255, 0, 0) and len(bundle.colours) == 4
    assert bundle.labels_path == bundle_dir / "latents.json"
    assert bundle.alignment_paths == [bundle_dir / "alignments" / "adult-vs-pediatric.json"]
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1 and manifest["kind"] == "seglens-bundle"
    assert set(manifest["files"]) == {"model/config.json", "model/model.safetensors", "sae/sae_config.json",
                                      "sae/sae.safetensors", "latents.json", "alignments/adult-vs-pediatric.json"}  # fmt: skip
    assert manifest["model"]["sha256"] == weights_sha256(model_dir) == weights_sha256(bundle.model_dir)
    model, sae = bundle.load_model(device="cpu"), bundle.load_sae()
    x = torch.randn(2, 4, 64, 64)
    activations, _ = model.encode(x)
    assert activations.shape[1] == sae.config.d_in
    original = BatchTopKSAE.load(sae_dir)
    assert torch.equal(sae.W_dec, original.W_dec) and float(sae.threshold) == 0.5


def test_bundle_path_may_be_the_manifest(bundle_dir):
    assert load_bundle(bundle_dir / MANIFEST_NAME).root == bundle_dir


def test_missing_bundle_or_manifest_or_file(bundle_dir, tmp_path):
    with pytest.raises(InputFileError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="bundle.json.*missing"):
        load_bundle(tmp_path / "empty")
    copy = broken_copy(bundle_dir, tmp_path)
    (copy / "sae" / "sae.safetensors").unlink()
    with pytest.raises(InputFileError, match="sae.safetensors: missing from the bundle"):
        load_bundle(copy)


def test_wrong_hash_is_refused(bundle_dir, tmp_path):
    copy = broken_copy(bundle_dir, tmp_path)
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="model.safetensors: SHA-256 does not match"):
        load_bundle(copy)
    assert load_bundle(copy, verify=False).name == "adult"  # paths still checked, hashes skipped


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_or_unknown_version_is_refused(bundle_dir, tmp_path, version):
    copy = broken_copy(bundle_dir, tmp_path)
    edit_manifest(copy, lambda m: m.update(format_version=version))
    with pytest.raises(InputFileError, match=r"bundle.json: bundle format_version .* is not supported"):
        load_bundle(copy)


def test_malformed_or_foreign_manifest(bundle_dir, tmp_path):
    copy = broken_copy(bundle_dir, tmp_path)
    (copy / MANIFEST_NAME).write_text('{"format_version": 1, "kind": ')
    with pytest.raises(InputFileError, match="bundle.json: is not valid JSON"):
        load_bundle(copy)
    edit_path = copy / MANIFEST_NAME
    edit_path.write_text(json.dumps({"format_version": 1, "kind": "seglens-alignment"}))
    with pytest.raises(InputFileError, match="not a SegLens bundle manifest"):
        load_bundle(copy)


@pytest.mark.parametrize(
    "where, value",
    [
        ("model", "/etc"),
        ("model", "../model"),
        ("labels", "sae/../../latents.json"),
        ("file", "../outside.json"),
        ("file", "/tmp/outside.json"),
    ],
)
def test_paths_escaping_the_bundle_are_refused(bundle_dir, tmp_path, where, value):
    copy = broken_copy(bundle_dir, tmp_path)

    def change(m):
        if where == "model":
            m["model"]["path"] = value
        elif where == "labels":
            m["labels"] = value
        else:
            m["files"][value] = "0" * 64

    edit_manifest(copy, change)
    with pytest.raises(InputFileError, match=r"bundle.json: .*(absolute path|leaves the bundle)"):
        load_bundle(copy)


def test_symlink_out_of_the_bundle_is_refused(bundle_dir, tmp_path):
    copy = broken_copy(bundle_dir, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(copy / "sae", outside)
    os.symlink(outside, copy / "sae")
    with pytest.raises(InputFileError, match="resolves outside the bundle"):
        load_bundle(copy)


def test_unlisted_file_and_foreign_labels(bundle_dir, tmp_path):
    copy = broken_copy(bundle_dir, tmp_path)
    edit_manifest(copy, lambda m: m["files"].pop("latents.json"))
    with pytest.raises(InputFileError, match="'latents.json' is used but not listed"):
        load_bundle(copy)
    copy2 = tmp_path / "b2"
    shutil.copytree(bundle_dir, copy2)
    labels = json.loads((copy2 / "latents.json").read_text())
    labels["sae"]["sha256"] = "f" * 64
    (copy2 / "latents.json").write_text(json.dumps(labels))
    edit_manifest(copy2, lambda m: m["files"].update({"latents.json": __import__("SegLensLogic.data.io", fromlist=["x"]).file_sha256(copy2 / "latents.json")}))
    with pytest.raises(InputFileError, match="latents.json: latent labels were made for another SAE"):
        load_bundle(copy2)


def test_build_refuses_existing_and_mismatched_inputs(parts, bundle_dir, tmp_path):
    root, model_dir, sae_dir, labels, alignment = parts
    with pytest.raises(OutputExistsError):
        build_bundle(model_dir, sae_dir, bundle_dir, "adult")
    # An SAE for another hook width cannot be bundled with this model.
    BatchTopKSAE(SAEConfig(d_in=16, expansion=2, k=4, threshold=0.1, hook_point="down_2")).save(tmp_path / "sae16")
    other = tmp_path / "other"
    build_bundle(model_dir, tmp_path / "sae16", other, "other")  # down_2 has 16 channels: fine
    BatchTopKSAE(SAEConfig(d_in=16, expansion=2, k=4, threshold=0.1, hook_point="down_3")).save(tmp_path / "sae-bad")
    with pytest.raises(InputFileError, match="SAE takes 16 channels but hook 'down_3' has 32"):
        build_bundle(model_dir, tmp_path / "sae-bad", tmp_path / "bad", "bad")
    # An alignment between two other SAEs does not belong in this bundle; nothing is left behind.
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**json.loads(alignment.read_text()), "sae_a": {"sha256": "1" * 64, "d_sae": 128},
                                   "sae_b": {"sha256": "2" * 64, "d_sae": 128}}))  # fmt: skip
    with pytest.raises(InputFileError, match="alignment does not involve the bundle's SAE"):
        build_bundle(model_dir, sae_dir, tmp_path / "bad2", "bad2", alignments=[foreign])
    assert not (tmp_path / "bad2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad2")]


def test_bundle_command_builds_and_checks(capsys, parts, tmp_path):
    _, model_dir, sae_dir, labels, alignment = parts
    out = tmp_path / "b"
    code, stdout, err = seglens(capsys, "bundle", "--model", model_dir, "--sae", sae_dir, "--labels", labels,
                                "--alignment", alignment, "--name", "adult", "--out", out)  # fmt: skip
    assert code == 0, err
    assert "all SHA-256 verified" in stdout and load_bundle(out).labels_path is not None
    code, _, err = seglens(capsys, "bundle", "--model", model_dir, "--sae", sae_dir, "--name", "adult", "--out", out)
    assert_one_line_error(code, err, str(out), "already exists")
    code, stdout, err = seglens(capsys, "bundle", "--check", out)
    assert code == 0 and "bundle 'adult'" in stdout
    edit_manifest(out, lambda m: m.update(format_version=9))
    code, _, err = seglens(capsys, "bundle", "--check", out)
    assert_one_line_error(code, err, "bundle.json", "format_version 9")


def test_alignments_are_added_to_a_finished_bundle_atomically(capsys, parts, bundle_dir, tmp_path):
    """A cross-architecture alignment made after both bundles were built joins each bundle with its hash; an
    alignment of other SAEs, or one already there, is refused and leaves the bundle as it was."""
    _, _, _, _, alignment = parts
    bundle = broken_copy(bundle_dir, tmp_path)
    before = (bundle / MANIFEST_NAME).read_bytes()
    cross = tmp_path / "unet-vs-segformer.json"
    document = json.loads(alignment.read_text())
    # The bundle's SAE on side b this time, as in an alignment made from the other bundle's point of view.
    cross.write_text(json.dumps({**document, "method": "activation-correlation", "sae_a": document["sae_b"], "sae_b": document["sae_a"]}))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**document, "sae_a": {"sha256": "1" * 64, "d_sae": 128}, "sae_b": {"sha256": "2" * 64, "d_sae": 128}}))
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--alignment", cross, "--alignment", foreign)
    assert_one_line_error(code, err, "foreign.json", "does not involve the SAE of the bundle")
    assert (bundle / MANIFEST_NAME).read_bytes() == before and not (bundle / "alignments" / "unet-vs-segformer.json").exists()
    code, stdout, err = seglens(capsys, "bundle", "--add-to", bundle, "--alignment", cross)
    assert code == 0, err
    assert "alignments: 2" in stdout and "all SHA-256 verified" in stdout
    loaded = load_bundle(bundle)
    assert [p.name for p in loaded.alignment_paths] == ["adult-vs-pediatric.json", "unet-vs-segformer.json"]
    assert loaded.load_alignments()[1].document["method"] == "activation-correlation"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no staging folder left
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--alignment", cross)
    assert_one_line_error(code, err, "unet-vs-segformer.json", "already exists")
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle)
    assert_one_line_error(code, err, "--add-to", "--alignment")
    # With --overwrite the same name is replaced, and listed once.
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--alignment", cross, "--overwrite")
    assert code == 0, err
    assert len(load_bundle(bundle).alignment_paths) == 2


def test_bundle_of_the_real_pipeline(real_pipeline, tmp_path):
    """A bundle of the model and SAE trained on real BraTS cases computes what its source folders compute."""
    from SegLensLogic.segmentation.inference import prepare_for_model

    bundle = build_bundle(real_pipeline.model_dir, real_pipeline.sae_dir, tmp_path / "real", "adult")
    assert bundle.cohort == real_pipeline.model.config.training.get("cohort")
    model, sae = bundle.load_model(device="cpu"), bundle.load_sae()
    assert sae.config.threshold == real_pipeline.sae.config.threshold
    prepared = prepare_for_model(model, real_pipeline.test[0])
    brain = prepared.brain_slices()
    x = prepared.model_input(brain[len(brain) // 2 - 2 : len(brain) // 2 + 2])
    with torch.no_grad():
        ours, theirs = model.capture(x), real_pipeline.model.capture(x)
        assert torch.equal(ours[0], theirs[0])
        vectors = ours[1].permute(0, 2, 3, 1).reshape(-1, sae.config.d_in)
        codes = sae.encode(vectors)
        assert torch.equal(codes, real_pipeline.sae.encode(vectors)) and (codes > 0).any()
    assert (ours[0].argmax(1) > 0).any()  # the real model finds tumour in these middle slices


def test_replica_comparison_is_added_to_a_finished_bundle(capsys, parts, bundle_dir, tmp_path):
    """``bundle --add-to B --replica SAE --store STORE`` marks in the bundle's labels which latents an SAE of another
    seed finds again, with their hashes; a replica of other activations, the SAE itself, a missing store or a second
    comparison without --overwrite is refused and leaves the bundle as it was."""
    from helpers import write_synthetic_case
    from SegLensLogic.data.cohort import load_cohort
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.sae import ExtractionOptions, extract_activations

    _, model_dir, sae_dir, _, _ = parts
    write_synthetic_case(tmp_path / "cases")
    store = tmp_path / "store"
    extract_activations(load_segmenter(model_dir), load_cohort(tmp_path / "cases"), store, ExtractionOptions(hook="down_3"), log=lambda m: None)
    torch.manual_seed(1)
    replica, other = tmp_path / "replica", tmp_path / "other"
    BatchTopKSAE(SAEConfig(d_in=32, expansion=4, k=8, threshold=0.5, hook_point="down_3")).save(replica)
    BatchTopKSAE(SAEConfig(d_in=16, expansion=4, k=8, threshold=0.5, hook_point="down_2")).save(other)
    bundle = broken_copy(bundle_dir, tmp_path)
    before = (bundle / "latents.json").read_bytes()
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--replica", replica)
    assert_one_line_error(code, err, "--replica", "--store")
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--replica", other, "--store", store)
    assert_one_line_error(code, err, "other", "not the same activations")
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--replica", sae_dir, "--store", store)
    assert_one_line_error(code, err, "sae", "is the SAE itself")
    assert (bundle / "latents.json").read_bytes() == before
    code, stdout, err = seglens(capsys, "bundle", "--add-to", bundle, "--replica", replica, "--store", store)
    assert code == 0, err
    assert "that seed finds" in stdout and "all SHA-256 verified" in stdout
    labels = load_bundle(bundle).load_labels()
    assert labels.data["replica"]["sha256"] == sae_sha256(replica) and labels.data["replica"]["tau"] == 0.8
    assert labels.data["latents"][0]["category"] == "edema"  # the labels themselves are kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--replica", replica, "--store", store)
    assert_one_line_error(code, err, "latents.json", "already compared", "--overwrite")
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--replica", replica, "--store", store, "--overwrite")
    assert code == 0, err
    # Several seeds: each live latent counts the replicas that find it; one listed twice is refused.
    torch.manual_seed(2)
    second = tmp_path / "replica2"
    BatchTopKSAE(SAEConfig(d_in=32, expansion=4, k=8, threshold=0.5, hook_point="down_3")).save(second)
    code, _, err = seglens(capsys, "bundle", "--add-to", bundle, "--replica", replica, "--replica", replica, "--store", store, "--overwrite")
    assert_one_line_error(code, err, "replica", "same SAE as an earlier --replica")
    code, stdout, err = seglens(capsys, "bundle", "--add-to", bundle, "--replica", replica, "--replica", second, "--store", store, "--overwrite")
    assert code == 0, err
    assert "how many of the 2 seeds find each latent" in stdout
    labels = load_bundle(bundle).load_labels()
    assert [r["sha256"] for r in labels.replicas()] == [sae_sha256(replica), sae_sha256(second)]
    for j in (int(e["id"]) for e in labels.data["latents"]):  # counted exactly where the first replica compared it
        flag, found = labels.replicates(j), labels.found_by(j)
        assert (flag is None) == (found is None) and (found is None or int(flag) <= found <= 2)
    code, _, err = seglens(capsys, "bundle", "--replica", replica, "--store", store, "--model", model_dir)
    assert_one_line_error(code, err, "--replica", "--add-to")
