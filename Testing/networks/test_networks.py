"""Tests of SegLensLogic.networks and slice-wise prediction (SegLensLogic.segmentation.inference).

Every model here is tiny (image size 64, narrow layers) so the whole file runs in seconds on a CPU:
the split forward pass at every hook point, agreement with Hugging Face's own SegFormer forward, the
safetensors-only model folder and the errors users get for broken ones, and batched whole-volume prediction.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import SYNTHETIC_BRAIN_SLICES, write_synthetic_case
from SegLensLogic.errors import InputFileError, OutputExistsError
from SegLensLogic.segmentation.inference import PredictionCancelled, predict_volume
from SegLensLogic.networks import (
    ARCHITECTURES,
    SegFormerSegmenter,
    Segmenter,
    SegmenterConfig,
    UNetSegmenter,
    build_segmenter,
    load_segmenter,
)
from SegLensLogic.networks.segformer import SEGFORMER_VARIANTS, segformer_config

SIZE = 64
TUMOUR_CLASSES = ["background", "necrotic core", "edema", "enhancing tumour"]
TINY_OPTIONS = {
    "unet": {"features": [8, 8, 16, 32, 64, 8]},
    "segformer-b0": {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64, "num_attention_heads": [1, 1, 2, 4]},
}
MODALITY_SETS = {2: ["t1c", "t2f"], 4: ["t1n", "t1c", "t2w", "t2f"]}

# Hook shapes (channels, height, width) of the tiny models for a 64x64 input.
EXPECTED_HOOKS = {
    "unet": {
        "conv_0": (8, 64, 64),
        "down_1": (8, 32, 32),
        "down_2": (16, 16, 16),
        "down_3": (32, 8, 8),
        "down_4": (64, 4, 4),
        "up_4": (32, 8, 8),
        "up_3": (16, 16, 16),
        "up_2": (8, 32, 32),
        "up_1": (8, 64, 64),
    },
    "segformer-b0": {
        "stage1": (16, 16, 16),
        "stage2": (32, 8, 8),
        "stage3": (64, 4, 4),
        "stage4": (128, 2, 2),
    },
}
DEFAULT_HOOK = {"unet": "down_3", "segformer-b0": "stage2"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(arch: str = "unet", channels: int = 4, class_names=None, **overrides) -> SegmenterConfig:
    fields = dict(
        arch=arch,
        modalities=list(MODALITY_SETS[channels]),
        class_names=list(class_names or TUMOUR_CLASSES),
        image_size=SIZE,
        arch_options=dict(TINY_OPTIONS[arch]),
    )
    fields.update(overrides)
    return SegmenterConfig(**fields)


def tiny_model(arch: str = "unet", channels: int = 4, seed: int = 0, **kwargs) -> Segmenter:
    torch.manual_seed(seed)
    return build_segmenter(tiny_config(arch, channels, **kwargs)).eval()


_MODELS: dict = {}


@pytest.fixture(params=[(arch, ch) for arch in ("segformer-b0", "unet") for ch in (2, 4)], ids=lambda p: f"{p[0]}-{p[1]}ch")
def model_and_input(request):
    """A tiny eval-mode model (built once per arch/channels) and a random batch of 3 slices for it."""
    arch, channels = request.param
    if request.param not in _MODELS:
        _MODELS[request.param] = tiny_model(arch, channels)
    model = _MODELS[request.param]
    x = torch.randn(3, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return arch, channels, model, x


# ---------------------------------------------------------------------------------------------------------------
# The split forward pass
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_forward_shape(model_and_input):
    arch, channels, model, x = model_and_input
    logits = model(x)
    assert logits.shape == (3, len(TUMOUR_CLASSES), SIZE, SIZE)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_hook_points_and_default(model_and_input):
    arch, channels, model, x = model_and_input
    hooks = model.hook_points()
    assert list(hooks) == list(model.hook_names)
    assert hooks == EXPECTED_HOOKS[arch]
    assert model.default_hook == DEFAULT_HOOK[arch]
    assert model.config.hook_point == DEFAULT_HOOK[arch]
    # hook_points() must not leave the model in another mode than it found it.
    assert not model.training


@torch.no_grad()
def test_capture_matches_forward(model_and_input):
    arch, channels, model, x = model_and_input
    reference = model(x)
    for hook, (c, h, w) in EXPECTED_HOOKS[arch].items():
        logits, activations = model.capture(x, hook)
        assert torch.equal(logits, reference), hook
        assert activations.shape == (3, c, h, w), hook
    # No hook given: the default one.
    logits, activations = model.capture(x)
    assert torch.equal(logits, reference)
    assert activations.shape[1:] == EXPECTED_HOOKS[arch][DEFAULT_HOOK[arch]]


@torch.no_grad()
def test_encode_decode_every_hook(model_and_input):
    arch, channels, model, x = model_and_input
    reference = model(x)
    for hook in model.hook_names:
        activations, cache = model.encode(x, hook)
        # the cache holds what the layers after the hook read: earlier encoder levels, or the remaining skips
        expected = model.hook_names.index(hook) if not hook.startswith("up_") else int(hook[3:]) - 1
        assert len(cache) == expected, hook
        assert torch.equal(model.decode(activations, cache, hook), reference), hook


@torch.no_grad()
def test_decode_uses_edited_activations(model_and_input):
    """Steering: editing the hook's activations changes the output (the decoder really reads them)."""
    arch, channels, model, x = model_and_input
    activations, cache = model.encode(x)
    edited = model.decode(activations + 5.0 * torch.randn_like(activations), cache)
    assert not torch.allclose(edited, model(x))


def test_unknown_hook_rejected(model_and_input):
    arch, channels, model, x = model_and_input
    with pytest.raises(ValueError, match="unknown hook point"):
        model.encode(x, "no_such_hook")


@pytest.mark.parametrize("channels", [2, 4])
@torch.no_grad()
def test_segformer_matches_huggingface_forward(channels):
    model = tiny_model("segformer-b0", channels, seed=3)
    assert isinstance(model, SegFormerSegmenter)
    x = torch.randn(2, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    hf_logits = model.model(pixel_values=x).logits
    assert hf_logits.shape == (2, len(TUMOUR_CLASSES), SIZE // 4, SIZE // 4)
    expected = F.interpolate(hf_logits, scale_factor=4, mode="bilinear", align_corners=False)
    ours = model(x)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(SEGFORMER_VARIANTS))
def test_segformer_variant_configs(variant):
    config = SegmenterConfig(arch=f"segformer-{variant}", modalities=["t1c", "t2f", "t2w"], class_names=TUMOUR_CLASSES)
    hf = segformer_config(config)
    assert hf.num_channels == 3
    assert hf.num_labels == 4
    assert list(hf.hidden_sizes) == SEGFORMER_VARIANTS[variant]["hidden_sizes"]
    assert list(hf.depths) == SEGFORMER_VARIANTS[variant]["depths"]
    assert hf.decoder_hidden_size == SEGFORMER_VARIANTS[variant]["decoder_hidden_size"]


def test_all_architectures_listed():
    assert set(ARCHITECTURES) == {f"segformer-b{i}" for i in range(6)} | {"unet"}


@pytest.mark.parametrize("variant", ["b0", "b1"])  # b2 ... b5 differ in depth only: checked on their configs above
@torch.no_grad()
def test_segformer_full_size_variants_build_and_run(variant):
    config = SegmenterConfig(arch=f"segformer-{variant}", modalities=["t1c", "t2f"], class_names=TUMOUR_CLASSES, image_size=SIZE)
    model = build_segmenter(config).eval()
    hidden = SEGFORMER_VARIANTS[variant]["hidden_sizes"]
    assert [c for c, _, _ in model.hook_points().values()] == hidden
    assert model(torch.zeros(1, 2, SIZE, SIZE)).shape == (1, 4, SIZE, SIZE)


def test_unet_default_features_build():
    config = SegmenterConfig(arch="unet", modalities=["t1c"], class_names=TUMOUR_CLASSES, image_size=SIZE)
    model = build_segmenter(config)
    assert isinstance(model, UNetSegmenter)
    assert model.hook_points()["down_3"] == (128, 8, 8)


@pytest.mark.parametrize("arch", ["resnet", "segformer-b9", "segformer", "UNet3D"])
def test_build_rejects_unknown_arch(arch):
    config = SegmenterConfig(arch=arch, modalities=["t1c"], class_names=TUMOUR_CLASSES, image_size=SIZE)
    with pytest.raises(ValueError, match="unknown"):
        build_segmenter(config)


@pytest.mark.parametrize(
    "arch,size",
    [("unet", 72), ("unet", 30), ("segformer-b0", 48), ("segformer-b0", 100)],
)
def test_build_rejects_bad_image_size(arch, size):
    with pytest.raises(ValueError, match=f"image_size {size}"):
        build_segmenter(tiny_config(arch, 2, image_size=size))


def test_unet_accepts_multiple_of_16():
    model = tiny_model("unet", 2, image_size=48)
    assert model(torch.zeros(1, 2, 48, 48)).shape == (1, 4, 48, 48)


def test_build_rejects_bad_unet_features_and_hook():
    with pytest.raises(ValueError, match="six integers"):
        build_segmenter(tiny_config("unet", 2, arch_options={"features": [8, 8, 16]}))
    with pytest.raises(ValueError, match="unknown hook point"):
        build_segmenter(tiny_config("unet", 2, hook_point="stage2"))


# ---------------------------------------------------------------------------------------------------------------
# Model folders: save_pretrained / from_pretrained
# ---------------------------------------------------------------------------------------------------------------


def _forbid_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model folder must be loaded without torch.load / pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("arch,channels", [("unet", 4), ("segformer-b0", 2)])
@torch.no_grad()
def test_save_load_round_trip(tmp_path, monkeypatch, arch, channels):
    model = tiny_model(arch, channels, seed=7)
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    _forbid_pickle(monkeypatch)
    loaded = Segmenter.from_pretrained(folder, device="cpu")
    assert type(loaded) is type(model)
    assert not loaded.training
    assert loaded.config.to_dict() == model.config.to_dict()
    x = torch.randn(2, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(x), model(x))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # The one-call loader gives the same model.
    again = load_segmenter(folder, device="cpu")
    assert torch.equal(again(x), model(x))


def test_weights_file_is_safetensors(tmp_path):
    from safetensors import safe_open

    model = tiny_model("unet", 2)
    folder = model.save_pretrained(tmp_path / "model")
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert 0 < header_len < len(raw) - 8
    header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    assert header["__metadata__"]["arch"] == "unet"
    assert not raw.startswith(b"PK")  # not a torch.save zip archive
    assert b"\x80\x02" != raw[:2]  # nor a raw pickle
    with safe_open(str(weights), framework="pt") as handle:
        keys = set(handle.keys())
        assert keys == set(model.state_dict())
        for key in keys:
            assert torch.equal(handle.get_tensor(key), model.state_dict()[key]), key
    config = json.loads((folder / "config.json").read_text())
    assert config["arch"] == "unet"
    assert config["modalities"] == ["t1c", "t2f"]
    assert config["hook_point"] == "down_3"


def test_save_refuses_to_overwrite(tmp_path):
    first = tiny_model("unet", 2, seed=1)
    second = tiny_model("unet", 2, seed=2)
    folder = first.save_pretrained(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(OutputExistsError, match="already exists"):
        second.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    second.save_pretrained(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    x = torch.randn(1, 2, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(load_segmenter(folder, device="cpu")(x), second(x))


def test_save_refuses_when_only_weights_exist(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        tiny_model("unet", 2).save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == b"keep me"


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory) -> Path:
    """A tiny 4-channel U-Net model folder (read-only: tests copy it before breaking it)."""
    return tiny_model("unet", 4, seed=5).save_pretrained(tmp_path_factory.mktemp("saved") / "unet")


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _break_missing_folder(folder):
    return folder.parent / "no-such-model", folder.parent / "no-such-model", "not found"


def _break_missing_config(folder):
    (folder / "config.json").unlink()
    return folder, folder / "config.json", "missing"


def _break_missing_weights(folder):
    (folder / "model.safetensors").unlink()
    return folder, folder / "model.safetensors", "missing"


def _break_config_not_json(folder):
    (folder / "config.json").write_text('{"arch": "unet", "modalities": [')
    return folder, folder / "config.json", "not valid JSON"


def _break_config_not_object(folder):
    (folder / "config.json").write_text("[1, 2, 3]")
    return folder, folder / "config.json", "not a JSON object"


def _break_config_unknown_field(folder):
    _edit_config(folder, learning_rate=0.1)
    return folder, folder / "config.json", "unknown config field"


def _break_config_missing_field(folder):
    _edit_config(folder, class_names=None)
    return folder, folder / "config.json", "missing config field"


def _break_config_bad_arch(folder):
    _edit_config(folder, arch="resnet50")
    return folder, folder / "config.json", "does not describe a valid model"


def _break_config_other_arch(folder):
    _edit_config(folder, arch="segformer-b0", hook_point="stage2", arch_options=TINY_OPTIONS["segformer-b0"])
    return folder, folder / "model.safetensors", "do not match"


def _break_config_other_classes(folder):
    _edit_config(folder, class_names=["background", "tumour", "edema"])
    return folder, folder / "model.safetensors", "do not match"


def _break_config_other_channels(folder):
    _edit_config(folder, modalities=["t1c", "t2f"])
    return folder, folder / "model.safetensors", "do not match"


def _break_weights_truncated(folder):
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    return folder, weights, "cannot be read as safetensors"


def _break_weights_header_cut(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    return folder, weights, "cannot be read as safetensors"


def _break_weights_garbage(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 40) + b"this is not a safetensors json header!!!" + b"\0" * 64)
    return folder, weights, "cannot be read as safetensors"


def _break_weights_pickle(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(pickle.dumps({"net.weight": [1.0, 2.0]}))
    return folder, weights, "cannot be read as safetensors"


BREAKERS = [
    _break_missing_folder,
    _break_missing_config,
    _break_missing_weights,
    _break_config_not_json,
    _break_config_not_object,
    _break_config_unknown_field,
    _break_config_missing_field,
    _break_config_bad_arch,
    _break_config_other_arch,
    _break_config_other_classes,
    _break_config_other_channels,
    _break_weights_truncated,
    _break_weights_header_cut,
    _break_weights_garbage,
    _break_weights_pickle,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__[len("_break_") :])
def test_bad_model_folder(tmp_path, monkeypatch, saved_unet, breaker):
    folder = _copy_model(saved_unet, tmp_path / "model")
    target, named, problem = breaker(folder)
    _forbid_pickle(monkeypatch)
    with pytest.raises(InputFileError) as info:
        Segmenter.from_pretrained(target, device="cpu")
    message = str(info.value)
    assert str(named) in message
    assert info.value.path == named
    assert problem in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------------
# Whole-volume prediction
# ---------------------------------------------------------------------------------------------------------------

CASE_SHAPE = (40, 36, 24)


@pytest.fixture(scope="module")
def small_case(tmp_path_factory) -> Path:
    """A synthetic BraTS-2023-named case (oblique LPS-like affine, brain on axial slices 3..20)."""
    return write_synthetic_case(tmp_path_factory.mktemp("cases"), "BraTS-SYN-00007-000", shape=CASE_SHAPE)


@pytest.fixture(scope="module")
def small_case_brain(small_case) -> np.ndarray:
    image = nib.load(str(next(small_case.glob("*-t1n.nii.gz"))))
    return np.asanyarray(image.dataobj) > 0


@pytest.fixture(scope="module", params=["unet", "segformer-b0"])
def predictor(request) -> Segmenter:
    return tiny_model(request.param, 4, seed=11)


def test_batched_equals_per_slice(predictor, small_case, small_case_brain):
    batched = predict_volume(predictor, small_case, batch_size=8)
    single = predict_volume(predictor, small_case, batch_size=1, skip_empty=False)
    assert batched.labels.shape == CASE_SHAPE
    assert batched.labels.dtype == np.uint8
    np.testing.assert_array_equal(batched.labels, single.labels)
    assert len(single.slices_run) == CASE_SHAPE[2]
    assert len(batched.slices_run) == SYNTHETIC_BRAIN_SLICES[1] - SYNTHETIC_BRAIN_SLICES[0]
    # A random model predicts something inside the brain, and nothing outside it.
    assert set(np.unique(batched.labels)) <= {0, 1, 2, 3}
    assert not batched.labels[~small_case_brain].any()
    k0, k1 = SYNTHETIC_BRAIN_SLICES
    assert not batched.labels[:, :, :k0].any() and not batched.labels[:, :, k1:].any()


def test_probabilities(predictor, small_case, small_case_brain):
    prediction = predict_volume(predictor, small_case, batch_size=8, return_probabilities=True)
    probs = prediction.probabilities
    assert probs.shape == (4, *CASE_SHAPE)
    assert probs.dtype == np.float16
    total = probs.astype(np.float32).sum(axis=0)
    np.testing.assert_allclose(total, 1.0, atol=5e-3)
    assert (probs >= 0).all()
    # Outside the brain: certain background. Inside: labels are the argmax of the probabilities.
    assert (probs[0][~small_case_brain] == 1).all()
    # (Compared as values: a random model's near-uniform probabilities tie in float16, where argmax picks the first.)
    p32 = probs.astype(np.float32)
    at_label = np.take_along_axis(p32, prediction.labels[None].astype(np.int64), axis=0)[0]
    assert np.abs(p32.max(axis=0) - at_label).max() <= 1e-3
    # Same labels with or without probabilities.
    np.testing.assert_array_equal(prediction.labels, predict_volume(predictor, small_case, batch_size=8).labels)


def test_progress_and_cancel(predictor, small_case):
    calls = []

    def progress(done, total):
        calls.append((done, total))

    predict_volume(predictor, small_case, batch_size=8, progress=progress)
    n = SYNTHETIC_BRAIN_SLICES[1] - SYNTHETIC_BRAIN_SLICES[0]
    assert calls == [(8, n), (16, n), (n, n)]

    seen = []

    def cancel(done, total):
        seen.append(done)
        return False

    with pytest.raises(PredictionCancelled):
        predict_volume(predictor, small_case, batch_size=8, progress=cancel)
    assert seen == [8]


def test_prediction_rejects_case_for_other_inputs(small_case, tmp_path):
    from SegLensLogic.data.cases import read_case
    from SegLensLogic.data.preprocessing import prepare_case

    model = tiny_model("unet", 2)
    prepared = prepare_case(read_case(small_case), ["t1n", "t1c", "t2w", "t2f"], SIZE)
    with pytest.raises(ValueError, match="another model"):
        predict_volume(model, prepared)
    # A case lacking one of the model's modalities is an InputFileError naming the case folder.
    partial = write_synthetic_case(tmp_path, "BraTS-SYN-00008-000", shape=(32, 32, 8), modalities=("t1n", "t1c"))
    with pytest.raises(InputFileError, match="has no t2f"):
        predict_volume(model, partial)


def test_fused_segformer_head_computes_the_huggingface_head():
    """SegLens runs SegFormer's decode head in its fused form (one matrix per stage, upsampling by two small matrix
    products): the same logits as transformers' SegformerDecodeHead, to float rounding, in train and eval mode."""
    import torch.nn.functional as F

    from SegLensLogic.networks.segformer import upsample_bilinear

    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(arch="segformer-b0", modalities=["t1c", "t2f"], class_names=["bg", "a", "b", "c"],
                                            image_size=64, arch_options={"classifier_dropout_prob": 0.0}))  # fmt: skip
    with torch.no_grad():
        for mode in (model.eval, model.train):
            mode()
            hidden, cache = model.encode(torch.randn(3, 2, 64, 64), "stage4")
            stages = [*cache, hidden]
            reference = model.model.decode_head(stages)
            assert torch.allclose(model.head(stages), reference, atol=1e-5 * float(reference.abs().max()))
    x = torch.randn(2, 5, 7, 9)
    for size in ((7, 9), (14, 18), (28, 36), (21, 40)):
        assert torch.allclose(upsample_bilinear(x, size), F.interpolate(x, size=size, mode="bilinear", align_corners=False), atol=1e-5)


def test_split_unet_decoder_computes_monai_basicunet():
    """SegLens runs each U-Net decoder level's first convolution as two (the skip's term, cached by ``encode``, plus
    the upsampled input's): the same logits as MONAI's ``BasicUNet.forward``, to float rounding, in train and eval
    mode; ``with_cache=False`` gives the same activations and computes no cache."""
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(arch="unet", modalities=["t1c", "t2f"], class_names=["bg", "a", "b", "c"],
                                            image_size=48, arch_options={"features": [8, 8, 16, 16, 32, 8]}))  # fmt: skip
    x = torch.randn(3, 2, 48, 48)
    with torch.no_grad():
        for mode in (model.eval, model.train):
            mode()
            reference = model.net(x)
            assert torch.allclose(model(x), reference, atol=1e-5 * float(reference.abs().max()))
            for hook in model.hook_names:
                activations, cache = model.encode(x, hook)
                bare, empty = model.encode(x, hook, with_cache=False)
                assert torch.equal(bare, activations) and empty == [], hook
                # what is cached for a skip has the skip's decoder level's output channels
                assert all(term.shape[1] in (8, 16) for term in cache), hook
    # gradients reach every weight of the split convolutions, as they reach MONAI's
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_init_with_new_head_keeps_every_weight_but_the_output_layer(tmp_path):
    from SegLensLogic.networks import load_segmenter
    from SegLensLogic.segmentation.training import init_with_new_head

    for arch, options in (("unet", {"features": [8, 8, 16, 16, 32, 8]}), ("segformer-b0", {"hidden_sizes": [8, 16, 24, 32], "decoder_hidden_size": 16})):
        torch.manual_seed(1)
        base = build_segmenter(SegmenterConfig(arch=arch, modalities=["t1c", "t2f"], class_names=["bg", "a", "b", "c"],
                                               image_size=32, arch_options=options))  # fmt: skip
        base.save_pretrained(tmp_path / f"{arch}-base")
        out = init_with_new_head(tmp_path / f"{arch}-base", ["bg", "csf", "grey", "white", "deep"], "aseg", tmp_path / f"{arch}-new")
        model = load_segmenter(out, device="cpu")
        assert model.config.class_names == ["bg", "csf", "grey", "white", "deep"] and model.config.label_scheme == "aseg"
        assert model.config.training["encoder_from_sha256"] == base_sha(tmp_path / f"{arch}-base")
        old, new = base.state_dict(), model.state_dict()
        differ = [k for k in new if new[k].shape != old[k].shape]
        assert differ and all(k.startswith(("net.final_conv", "model.decode_head.classifier")) for k in differ), differ
        assert all(torch.equal(new[k], old[k]) for k in new if k not in differ)


def base_sha(folder):
    from SegLensLogic.networks import weights_sha256

    return weights_sha256(folder)
