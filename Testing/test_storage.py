"""The storage ground floor (``SegLensLogic/storage.py``) on its own: atomic files and folders, hashes, bounded reads,
schemas and versioned documents, safetensors and weights folders, and the one-line error helpers.

Every test is small and fast (no models, no real data): files are a few bytes to a few MB under ``tmp_path``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from SegLensLogic import storage
from SegLensLogic.errors import InputFileError, OutputExistsError, SegLensError
from SegLensLogic.storage import (
    Measured,
    Schema,
    Sha256,
    as_input_error,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_document,
    check_tensor_shapes,
    describe_validation_error,
    file_sha256,
    load_safetensors,
    one_line,
    publish_folder,
    read_document,
    read_json,
    read_text,
    read_weights_folder,
    refuse_output_folder,
    safetensors_shapes,
    staging_folder,
    validate,
    weights_folder_files,
    write_weights_folder,
)


def listing(folder: Path) -> list[str]:
    """Every name in ``folder`` (hidden ones included), sorted."""
    return sorted(p.name for p in folder.iterdir())


def one_line_naming(exc: BaseException, path: Path, *fragments: str) -> str:
    """Assert that ``exc``'s message is one line naming ``path`` and holding every fragment; return it."""
    text = str(exc)
    assert "\n" not in text, text
    assert str(path) in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


@pytest.fixture
def umask_027():
    """Run the test under umask 027 (a value that differs from the usual 022), restored afterwards."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


# -- atomic file writes -------------------------------------------------------------------------------------------
def test_atomic_write_bytes_writes_the_content_and_creates_the_folder(tmp_path):
    target = tmp_path / "new" / "deeper" / "data.bin"
    returned = atomic_write_bytes(target, b"\x00\x01payload")
    assert returned == target
    assert target.read_bytes() == b"\x00\x01payload"


def test_atomic_write_text_writes_utf8(tmp_path):
    target = atomic_write_text(tmp_path / "notes.txt", "Ödem – 水\n")
    assert target.read_bytes() == "Ödem – 水\n".encode("utf-8")


def test_atomic_write_json_writes_indented_json_with_a_final_newline(tmp_path):
    target = atomic_write_json(tmp_path / "doc.json", {"kind": "k", "values": [1, 2]})
    text = target.read_text()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert '\n  "kind": "k"' in text
    assert json.loads(text) == {"kind": "k", "values": [1, 2]}


def test_atomic_write_json_uses_default_for_unknown_types(tmp_path):
    target = atomic_write_json(tmp_path / "doc.json", {"path": Path("a/b")}, indent=None, default=str)
    assert target.read_text() == '{"path": "a/b"}\n'


@pytest.mark.parametrize("write", [atomic_write_bytes, atomic_write_text, atomic_write_json], ids=["bytes", "text", "json"])
def test_atomic_write_refuses_an_existing_file_and_names_it(tmp_path, write):
    target = tmp_path / "out.txt"
    target.write_text("original")
    payload = b"new" if write is atomic_write_bytes else "new"
    with pytest.raises(OutputExistsError) as excinfo:
        write(target, payload)
    one_line_naming(excinfo.value, target, "already exists", "--overwrite")
    assert isinstance(excinfo.value, FileExistsError) and isinstance(excinfo.value, SegLensError)
    assert target.read_text() == "original"
    assert listing(tmp_path) == ["out.txt"]


def test_atomic_write_replaces_an_existing_file_with_overwrite(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("original, and longer than the new content")
    atomic_write_text(target, "new", overwrite=True)
    assert target.read_text() == "new"
    assert listing(tmp_path) == ["out.txt"]


def test_atomic_write_leaves_no_temporary_file_after_success(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"a")
    atomic_write_json(tmp_path / "b.json", {"b": 1})
    atomic_write_text(tmp_path / "a.bin", "again", overwrite=True)
    assert listing(tmp_path) == ["a.bin", "b.json"]


def test_atomic_write_json_that_cannot_serialise_leaves_the_original_and_nothing_beside_it(tmp_path):
    target = tmp_path / "doc.json"
    target.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()}, overwrite=True)
    assert target.read_text() == '{"old": true}\n'
    assert listing(tmp_path) == ["doc.json"]


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "simulated I/O error"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
def test_atomic_write_failing_at_the_rename_keeps_the_original_and_removes_the_temporary(tmp_path, monkeypatch, failure):
    target = tmp_path / "out.bin"
    target.write_bytes(b"original")
    seen = []

    def failing_replace(src, dst):
        seen.append(Path(src))
        assert Path(src).read_bytes() == b"replacement"  # the temporary file was complete when the rename came
        raise failure

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(type(failure)):
        atomic_write_bytes(target, b"replacement", overwrite=True)
    assert len(seen) == 1 and seen[0].parent == tmp_path and seen[0].name.startswith(".out.bin.")
    assert not seen[0].exists()
    assert target.read_bytes() == b"original"
    assert listing(tmp_path) == ["out.bin"]


def test_atomic_write_failing_while_writing_removes_the_temporary(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class FailingHandle:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

        def write(self, data):
            self.handle.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FailingHandle(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(tmp_path / "out.bin", b"0123456789")
    assert listing(tmp_path) == []


def test_atomic_write_files_get_the_permissions_a_plain_write_would(tmp_path, umask_027):
    target = atomic_write_text(tmp_path / "notes.txt", "hello")
    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    assert target.stat().st_mode & 0o777 == 0o640 == plain.stat().st_mode & 0o777


def test_atomic_write_leaves_the_process_umask_as_it_was(tmp_path, umask_027):
    atomic_write_text(tmp_path / "notes.txt", "hello")
    now = os.umask(0o027)
    assert now == 0o027


# -- atomic folders -----------------------------------------------------------------------------------------------
def test_staging_folder_is_a_fresh_hidden_folder_beside_the_output(tmp_path):
    out = tmp_path / "parent" / "result"
    first = staging_folder(out, suffix=".partial")
    second = staging_folder(out, suffix=".partial")
    assert first != second
    for staged in (first, second):
        assert staged.is_dir() and staged.parent == out.parent
        assert staged.name.startswith(".result.") and staged.name.endswith(".partial")
        assert listing(staged) == []
    assert not out.exists()


def test_publish_folder_makes_the_output_appear_whole(tmp_path):
    out = tmp_path / "result"
    staged = staging_folder(out)
    (staged / "a.txt").write_text("a")
    (staged / "sub").mkdir()
    (staged / "sub" / "b.txt").write_text("b")
    assert not out.exists()  # nothing at the output while it is being built
    publish_folder(staged, out)
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.txt").read_text() == "b"
    assert not staged.exists()
    assert listing(tmp_path) == ["result"]


def test_publish_folder_gives_the_folder_umask_permissions(tmp_path, umask_027):
    out = tmp_path / "result"
    staged = staging_folder(out)
    assert staged.stat().st_mode & 0o777 == 0o700  # mkdtemp's
    publish_folder(staged, out)
    assert out.stat().st_mode & 0o777 == 0o750


def test_publish_folder_refuses_an_existing_output_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staged = staging_folder(out)
    (staged / "new.txt").write_text("new")
    with pytest.raises(OutputExistsError) as excinfo:
        publish_folder(staged, out)
    one_line_naming(excinfo.value, out, "already exists")
    assert listing(out) == ["old.txt"]
    assert listing(staged) == ["new.txt"]  # the caller still holds its work


def test_publish_folder_with_overwrite_replaces_the_whole_folder_and_leaves_nothing_aside(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "shared.txt").write_text("old")
    staged = staging_folder(out)
    (staged / "shared.txt").write_text("new")
    publish_folder(staged, out, overwrite=True)
    assert listing(out) == ["shared.txt"]  # the new folder, not a mix of old and new
    assert (out / "shared.txt").read_text() == "new"
    assert listing(tmp_path) == ["result"]  # neither the staging folder nor the old one is left


def test_publish_folder_with_overwrite_replaces_a_file_at_the_output(tmp_path):
    out = tmp_path / "result"
    out.write_text("a file")
    staged = staging_folder(out)
    (staged / "new.txt").write_text("new")
    publish_folder(staged, out, overwrite=True)
    assert out.is_dir() and listing(out) == ["new.txt"]
    assert listing(tmp_path) == ["result"]


def test_publish_folder_over_a_symlink_replaces_the_link_not_its_target(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    out = tmp_path / "result"
    out.symlink_to(target, target_is_directory=True)
    staged = staging_folder(out)
    (staged / "new.txt").write_text("new")
    with pytest.raises(OutputExistsError):
        publish_folder(staged, out)
    publish_folder(staged, out, overwrite=True)
    assert not out.is_symlink() and listing(out) == ["new.txt"]
    assert (target / "precious.txt").read_text() == "keep me"
    assert listing(tmp_path) == ["elsewhere", "result"]


def test_publish_folder_failing_at_the_second_rename_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "result"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staged = staging_folder(out)
    (staged / "new.txt").write_text("new")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == staged:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        publish_folder(staged, out, overwrite=True)
    assert out.is_dir() and listing(out) == ["old.txt"]


def test_refuse_output_folder_refuses_a_file_at_the_folder_path(tmp_path):
    path = tmp_path / "out"
    path.write_text("a file")
    with pytest.raises(InputFileError) as excinfo:
        refuse_output_folder(path, overwrite=True)
    one_line_naming(excinfo.value, path, "not a folder")


def test_refuse_output_folder_refuses_an_existing_named_output_unless_overwrite(tmp_path):
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(OutputExistsError) as excinfo:
        refuse_output_folder(tmp_path, overwrite=False, names=("a.json", "b.json"))
    one_line_naming(excinfo.value, tmp_path / "b.json", "already exists")
    assert refuse_output_folder(tmp_path, overwrite=True, names=("a.json", "b.json")) == tmp_path


def test_refuse_output_folder_accepts_a_missing_folder_and_creates_nothing(tmp_path):
    path = tmp_path / "not" / "yet"
    assert refuse_output_folder(str(path), overwrite=False, names=("a.json",)) == path
    assert not (tmp_path / "not").exists()


def test_refuse_output_folder_accepts_an_existing_folder_whose_named_files_are_absent(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    assert refuse_output_folder(tmp_path, overwrite=False, names=("a.json",)) == tmp_path


# -- hashes -------------------------------------------------------------------------------------------------------
def test_file_sha256_equals_hashlib_across_read_chunks(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=(5 << 19) + 17, dtype=np.uint8).tobytes()  # 2.5 MB + 17
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == file_sha256(path)


def test_file_sha256_of_an_empty_file(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_file_sha256_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(InputFileError) as excinfo:
        file_sha256(tmp_path / "missing.safetensors")
    one_line_naming(excinfo.value, tmp_path / "missing.safetensors", "cannot be read")


# -- bounded reads ------------------------------------------------------------------------------------------------
def test_read_text_returns_the_decoded_text(tmp_path):
    (tmp_path / "list.txt").write_bytes("case-1\nÖdem\n".encode("utf-8"))
    assert read_text(tmp_path / "list.txt") == "case-1\nÖdem\n"


def test_read_text_refuses_a_file_over_its_size_bound(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("x" * 65)
    assert read_text(path, max_bytes=65) == "x" * 65  # the bound itself is allowed
    with pytest.raises(InputFileError) as excinfo:
        read_text(path, max_bytes=64, what="a cohort list")
    one_line_naming(excinfo.value, path, "more than SegLens reads as a cohort list")


def test_read_text_of_invalid_utf8_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"ab\xffcd")
    with pytest.raises(InputFileError) as excinfo:
        read_text(path, what="a cohort list")
    one_line_naming(excinfo.value, path, "not UTF-8", "byte 2", "a cohort list")


def test_read_text_of_a_missing_file_or_a_folder(tmp_path):
    with pytest.raises(InputFileError) as excinfo:
        read_text(tmp_path / "missing.txt")
    one_line_naming(excinfo.value, tmp_path / "missing.txt", "not found")
    with pytest.raises(InputFileError) as excinfo:
        read_text(tmp_path)
    one_line_naming(excinfo.value, tmp_path, "is a folder")


def test_read_json_parses_a_document(tmp_path):
    (tmp_path / "doc.json").write_text('{"a": [1, 2.5, null, "x"], "b": NaN}')
    data = read_json(tmp_path / "doc.json")
    assert data["a"] == [1, 2.5, None, "x"] and np.isnan(data["b"])


def test_read_json_refuses_a_file_over_its_size_bound_before_parsing(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text("{" * 200)  # would be malformed too: the size is what is reported
    with pytest.raises(InputFileError) as excinfo:
        read_json(path, max_bytes=100)
    one_line_naming(excinfo.value, path, "more than SegLens reads as JSON")
    assert "not valid JSON" not in str(excinfo.value)


def test_read_json_of_malformed_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(InputFileError) as excinfo:
        read_json(path)
    one_line_naming(excinfo.value, path, "not valid JSON", "line 2 column 7")
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"a": "\xff"}', "can't decode byte 0xff"),
        (b"", "line 1 column 1"),
        (b"[" * 100_000, "nested too deeply"),
        (b"1" * 5000, "digits"),
    ],
    ids=["invalid-utf8", "empty", "deep-nesting", "huge-integer"],
)
def test_read_json_of_a_hostile_file_is_one_input_error(tmp_path, raw, fragment):
    path = tmp_path / "doc.json"
    path.write_bytes(raw)
    with pytest.raises(InputFileError) as excinfo:
        read_json(path)
    one_line_naming(excinfo.value, path, "not valid JSON", fragment)


def test_read_json_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(InputFileError) as excinfo:
        read_json(tmp_path / "missing.json")
    one_line_naming(excinfo.value, tmp_path / "missing.json", "file not found")


# -- schemas ------------------------------------------------------------------------------------------------------
class Latent(Schema):
    id: int
    rate: Measured = 0.0


class LabelsDoc(Schema):
    kind: str
    name: str
    latents: list[Latent]
    weights: Sha256 | None = None


class Finite(Schema):
    x: float


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int


class Positive(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def positive(cls, value):
        if value <= 0:
            raise ValueError("n must be positive")
        return value


def validation_error(model: type[BaseModel], data) -> ValidationError:
    with pytest.raises(ValidationError) as excinfo:
        model.model_validate(data)
    return excinfo.value


def test_describe_validation_error_names_the_nested_field_and_the_value_found():
    error = validation_error(LabelsDoc, {"kind": "k", "name": "n", "latents": [{"id": 1}, {"id": "x"}]})
    assert describe_validation_error(error) == "field 'latents[1].id': input should be a valid integer, got 'x'"


def test_describe_validation_error_names_a_missing_field():
    error = validation_error(LabelsDoc, {"kind": "k", "latents": []})
    assert describe_validation_error(error) == "field 'name' is missing"


def test_describe_validation_error_counts_the_other_problems():
    error = validation_error(LabelsDoc, {"kind": 1, "latents": "x"})
    text = describe_validation_error(error)
    assert text.startswith("field 'kind': input should be a string, got 1")
    assert text.endswith("(and 2 more problems)")
    error = validation_error(LabelsDoc, {"kind": 1, "name": "n", "latents": "x"})
    assert describe_validation_error(error).endswith("(and 1 more problem)")


def test_describe_validation_error_names_an_unknown_field():
    assert describe_validation_error(validation_error(Closed, {"a": 1, "zz": 2})) == "unknown field 'zz'"


def test_describe_validation_error_states_a_validator_message_without_its_prefix_or_value():
    assert describe_validation_error(validation_error(Positive, {"n": -3})) == "field 'n': n must be positive"


def test_describe_validation_error_calls_a_dictionary_a_json_object():
    text = describe_validation_error(validation_error(LabelsDoc, [1, 2]))
    assert text == "input should be a JSON object, got [1, 2]"


def test_describe_validation_error_shortens_a_long_value_and_stays_one_line():
    error = validation_error(LabelsDoc, {"kind": "k", "name": "x\n" * 200, "latents": [{"id": "y" * 500}]})
    text = describe_validation_error(error)
    assert "\n" not in text and len(text) < 160 and text.startswith("field 'latents[0].id'") and "..." in text


def test_schema_is_strict_finite_frozen_and_keeps_unknown_keys():
    assert describe_validation_error(validation_error(Latent, {"id": "3"})).startswith("field 'id': input should be a valid integer")
    assert describe_validation_error(validation_error(Latent, {"id": True})).startswith("field 'id'")
    assert describe_validation_error(validation_error(LabelsDoc, {"kind": "k", "name": "n", "latents": [], "weights": "ab"})).startswith("field 'weights'")
    assert describe_validation_error(validation_error(Latent, {"id": 1, "rate": "nan"})).startswith("field 'rate'")
    assert describe_validation_error(validation_error(Finite, {"x": float("inf")})).startswith("field 'x': input should be a finite number")
    latent = Latent.model_validate({"id": 3, "rate": float("nan"), "note": "kept"})
    assert np.isnan(latent.rate) and latent.model_extra == {"note": "kept"}
    with pytest.raises(ValidationError):
        latent.id = 4


def test_validate_returns_the_model_or_one_input_error_naming_the_source(tmp_path):
    doc = validate(LabelsDoc, {"kind": "k", "name": "n", "latents": [{"id": 2}]}, tmp_path / "labels.json")
    assert isinstance(doc, LabelsDoc) and doc.latents[0].id == 2
    with pytest.raises(InputFileError) as excinfo:
        validate(LabelsDoc, {"kind": "k", "name": "n", "latents": [{"id": 2.5}]}, tmp_path / "labels.json")
    assert str(excinfo.value) == f"{tmp_path / 'labels.json'}: field 'latents[0].id': input should be a valid integer, got 2.5"
    assert excinfo.value.path == tmp_path / "labels.json"


def test_validate_passes_its_context_to_the_schema():
    class Bounded(Schema):
        n: int

        @field_validator("n")
        @classmethod
        def bounded(cls, value, info):
            if value > info.context["limit"]:
                raise ValueError(f"n is more than {info.context['limit']}")
            return value

    assert validate(Bounded, {"n": 3}, "src.json", context={"limit": 5}).n == 3
    with pytest.raises(InputFileError, match=r"^src.json: field 'n': n is more than 2$"):
        validate(Bounded, {"n": 3}, "src.json", context={"limit": 2})


# -- versioned documents ------------------------------------------------------------------------------------------
GOOD = {"kind": "labels", "format_version": 2, "name": "n", "latents": [{"id": 1}]}


def test_check_document_returns_a_valid_document_itself():
    data = dict(GOOD)
    assert check_document(data, "src.json", "labels", (1, 2), LabelsDoc) is data


@pytest.mark.parametrize(
    "data, fragments",
    [
        ([GOOD], ("is not a SegLens labels file", "a JSON object was expected, found a list")),
        ("text", ("found a string",)),
        ({**GOOD, "kind": "recipe"}, ("is not a SegLens labels file", "kind 'recipe', expected 'labels'")),
        ({k: v for k, v in GOOD.items() if k != "kind"}, ("kind None, expected 'labels'",)),
        ({**GOOD, "format_version": 3}, ("SegLens labels file format_version 3 is not supported", "this SegLens reads 1 or 2")),
        ({**GOOD, "format_version": "2"}, ("format_version '2' is not supported",)),
        ({**GOOD, "format_version": True}, ("format_version True is not supported",)),
        ({**GOOD, "format_version": 2.0}, ("format_version 2.0 is not supported",)),
        ({k: v for k, v in GOOD.items() if k != "format_version"}, ("format_version None is not supported",)),
        ({k: v for k, v in GOOD.items() if k != "name"}, ("field 'name' is missing",)),
    ],
    ids=["list", "string", "wrong-kind", "no-kind", "newer-version", "string-version", "bool-version", "float-version",
         "no-version", "missing-field"],
)
def test_check_document_names_the_source_and_what_is_wrong(data, fragments):
    with pytest.raises(InputFileError) as excinfo:
        check_document(data, "labels.json", "labels", (1, 2), LabelsDoc, what="SegLens labels file")
    one_line_naming(excinfo.value, Path("labels.json"), *fragments)


def test_check_document_kind_none_skips_the_kind_and_default_version_fills_a_missing_version():
    data = {"kind": "anything", "x": 1.5}
    assert check_document(data, "s.json", None, 1, Finite, default_version=1) is data
    with pytest.raises(InputFileError, match="format_version None"):
        check_document(data, "s.json", None, 1)


def test_check_document_names_the_version_by_versioned_when_given():
    with pytest.raises(InputFileError) as excinfo:
        check_document({"kind": "b", "format_version": 9}, "bundle.json", "b", 1, what="SegLens bundle manifest", versioned="bundle")
    assert str(excinfo.value) == "bundle.json: bundle format_version 9 is not supported (this SegLens reads 1)"


def test_check_document_uses_what_with_its_own_article():
    with pytest.raises(InputFileError) as excinfo:
        check_document([], "s.json", None, 1, what="an activation store index")
    assert "is not an activation store index (" in str(excinfo.value)


def test_read_document_reads_and_checks_a_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(GOOD))
    assert read_document(path, "labels", [2], LabelsDoc) == GOOD
    with pytest.raises(InputFileError) as excinfo:
        read_document(path, "labels", 1, LabelsDoc, what="SegLens labels file")
    one_line_naming(excinfo.value, path, "format_version 2 is not supported", "reads 1")


def test_read_document_of_a_missing_file_uses_the_missing_message(tmp_path):
    path = tmp_path / "recipe.json"
    with pytest.raises(InputFileError) as excinfo:
        read_document(path, "recipe", 1, missing="recipe file not found")
    assert str(excinfo.value) == f"{path}: recipe file not found"
    with pytest.raises(InputFileError) as excinfo:
        read_document(path, "recipe", 1)
    one_line_naming(excinfo.value, path, "file not found")


def test_read_document_honours_its_size_bound_and_reports_malformed_json(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(GOOD))
    with pytest.raises(InputFileError, match="more than SegLens reads as JSON"):
        read_document(path, "labels", 2, max_bytes=10)
    path.write_text('{"kind": "labels",')
    with pytest.raises(InputFileError) as excinfo:
        read_document(path, "labels", 2)
    one_line_naming(excinfo.value, path, "not valid JSON")


# -- safetensors --------------------------------------------------------------------------------------------------
@pytest.fixture
def small_weights(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_numpy({"enc.weight": np.zeros((2, 3), np.float32), "enc.bias": np.arange(4, dtype=np.int64), "scalar": np.array(1.5, dtype=np.float16)}, str(path))
    return path


def test_safetensors_shapes_reads_every_name_and_shape(small_weights):
    assert safetensors_shapes(small_weights) == {"enc.weight": (2, 3), "enc.bias": (4,), "scalar": ()}
    assert safetensors_shapes(str(small_weights)) == safetensors_shapes(small_weights)


def test_safetensors_shapes_loads_no_tensor(small_weights, monkeypatch):
    real_open = safetensors.safe_open

    class NoTensors:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            return self.handle.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError(f"safetensors_shapes loaded {name}")

    monkeypatch.setattr(safetensors, "safe_open", NoTensors)
    assert safetensors_shapes(small_weights)["enc.weight"] == (2, 3)


def test_load_safetensors_round_trips_tensors_on_the_cpu(tmp_path):
    state = {
        "a": torch.randn(3, 4),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c": torch.randn(5).to(torch.bfloat16),
        "d": torch.tensor([True, False]),
    }
    path = tmp_path / "w.safetensors"
    save_torch(state, str(path))
    loaded = load_safetensors(path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].device.type == "cpu" and loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


@pytest.mark.parametrize(
    "content",
    [lambda raw: raw[:-5], lambda raw: raw[: len(raw) // 2], lambda raw: b"garbage!" * 4, lambda raw: b"", lambda raw: b"\x80" + raw[1:]],
    ids=["truncated-data", "truncated-header", "garbage", "empty", "corrupt-length"],
)
@pytest.mark.parametrize("reader", [safetensors_shapes, load_safetensors], ids=["shapes", "load"])
def test_a_damaged_safetensors_file_is_one_input_error_naming_it(small_weights, tmp_path, content, reader):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(content(small_weights.read_bytes()))
    with pytest.raises(InputFileError) as excinfo:
        reader(damaged)
    one_line_naming(excinfo.value, damaged, "cannot be read as safetensors")
    assert excinfo.value.path == damaged


@pytest.mark.parametrize("reader", [safetensors_shapes, load_safetensors], ids=["shapes", "load"])
def test_a_missing_safetensors_file_is_an_input_error_naming_it(tmp_path, reader):
    with pytest.raises(InputFileError) as excinfo:
        reader(tmp_path / "missing.safetensors")
    one_line_naming(excinfo.value, tmp_path / "missing.safetensors")


@pytest.mark.parametrize("reader", [safetensors_shapes, load_safetensors], ids=["shapes", "load"])
def test_weights_over_the_size_bound_are_refused_before_reading(small_weights, monkeypatch, reader):
    monkeypatch.setattr(storage, "MAX_WEIGHTS_BYTES", small_weights.stat().st_size - 1)
    with pytest.raises(InputFileError) as excinfo:
        reader(small_weights)
    one_line_naming(excinfo.value, small_weights, "more than SegLens loads")
    monkeypatch.setattr(storage, "MAX_WEIGHTS_BYTES", small_weights.stat().st_size)
    assert reader(small_weights)  # the bound itself is allowed


def test_check_tensor_shapes_accepts_matching_shapes(tmp_path):
    check_tensor_shapes(tmp_path / "w.safetensors", {"a": (2, 3), "b": (4,)}, {"b": (4,), "a": (2, 3)}, "config.json")


def test_check_tensor_shapes_names_the_file_and_the_mismatched_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(InputFileError) as excinfo:
        check_tensor_shapes(path, {"W_enc": (32, 128), "b_enc": (128,)}, {"W_enc": (32, 64), "b_enc": (128,)}, "config.json (d_in 32, d_sae 128)")
    text = one_line_naming(excinfo.value, path, "weights do not match config.json (d_in 32, d_sae 128)", "W_enc (32, 64) instead of (32, 128)")
    assert "b_enc" not in text


def test_check_tensor_shapes_names_missing_and_unexpected_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    expected = {f"t{i}": (1,) for i in range(6)}
    found = {"t0": (1,), "extra": (2,)}
    with pytest.raises(InputFileError) as excinfo:
        check_tensor_shapes(path, expected, found, "config.json")
    one_line_naming(excinfo.value, path, "missing t1, t2, t3, t4 ...", "unexpected extra")


def test_check_tensor_shapes_works_on_shapes_read_from_a_file(small_weights):
    found = safetensors_shapes(small_weights)
    with pytest.raises(InputFileError, match=r"enc\.bias \(4,\) instead of \(8,\)"):
        check_tensor_shapes(small_weights, {"enc.weight": (2, 3), "enc.bias": (8,), "scalar": ()}, found, "config.json")


# -- weights folders ----------------------------------------------------------------------------------------------
def make_state() -> dict:
    linear = torch.nn.Linear(3, 4)
    return {"weight": linear.weight, "weight_t": linear.weight.t(), "bias": linear.bias.detach().clone()}


def test_write_then_read_weights_folder_round_trips_config_tensors_and_metadata(tmp_path):
    folder = tmp_path / "model"
    state = make_state()
    config = {"kind": "model", "sizes": [3, 4], "name": "tiny"}
    assert write_weights_folder(folder, "config.json", config, "model.safetensors", state, {"format": "pt", "note": "x"}) == folder
    assert listing(folder) == ["config.json", "model.safetensors"]  # no temporary left
    read_config, tensors = read_weights_folder(folder, "config.json", "model.safetensors", "a model")
    assert read_config == config
    assert set(tensors) == set(state)
    for name, tensor in state.items():
        assert torch.equal(tensors[name], tensor.detach())
    with safetensors.safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}


def test_the_same_weights_saved_again_have_the_same_file_hash(tmp_path):
    """safetensors orders its metadata by a hash map that changes between calls; SegLens names weights by their file's
    hash, so every save sorts the metadata: twelve saves of one state give one hash, and the files still load."""
    from SegLensLogic.storage import file_sha256

    state = make_state()
    metadata = {"format": "pt", "kind": "BatchTopKSAE", "arch": "unet", "note": "x"}
    hashes = {file_sha256(write_weights_folder(tmp_path / "w", "config.json", {}, "w.safetensors", state, metadata, overwrite=True)
                          / "w.safetensors") for _ in range(12)}  # fmt: skip
    assert len(hashes) == 1
    raw = (tmp_path / "w" / "w.safetensors").read_bytes()
    assert b'{"__metadata__":{"arch":"unet","format":"pt","kind":"BatchTopKSAE","note":"x"}' in raw
    _, tensors = read_weights_folder(tmp_path / "w", "config.json", "w.safetensors", "weights")
    assert all(torch.equal(tensors[name], tensor.detach()) for name, tensor in state.items())


def test_write_weights_folder_refuses_either_existing_file_before_writing_anything(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError) as excinfo:
        write_weights_folder(folder, "config.json", {"a": 1}, "model.safetensors", make_state(), {})
    one_line_naming(excinfo.value, folder / "config.json", "already exists")
    assert listing(folder) == ["config.json"] and (folder / "config.json").read_text() == "{}"


def test_write_weights_folder_with_overwrite_replaces_both_files(tmp_path):
    folder = tmp_path / "model"
    write_weights_folder(folder, "config.json", {"v": 1}, "model.safetensors", {"x": torch.zeros(2)}, {})
    write_weights_folder(folder, "config.json", {"v": 2}, "model.safetensors", {"y": torch.ones(3)}, {}, overwrite=True)
    config, tensors = read_weights_folder(folder, "config.json", "model.safetensors", "a model")
    assert config == {"v": 2} and list(tensors) == ["y"] and torch.equal(tensors["y"], torch.ones(3))
    assert listing(folder) == ["config.json", "model.safetensors"]


def test_write_weights_folder_refuses_a_file_where_the_folder_should_be(tmp_path):
    folder = tmp_path / "model"
    folder.write_text("not a folder")
    with pytest.raises(InputFileError) as excinfo:
        write_weights_folder(folder, "config.json", {}, "model.safetensors", make_state(), {}, overwrite=True)
    one_line_naming(excinfo.value, folder, "not a folder")


def test_write_weights_folder_that_fails_to_save_leaves_no_temporary(tmp_path):
    folder = tmp_path / "model"
    with pytest.raises(Exception):
        write_weights_folder(folder, "config.json", {}, "model.safetensors", {"a": torch.zeros(2)}, {"bad": 3})  # metadata must be str
    assert listing(folder) == []


def test_weights_folder_files_returns_both_paths(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sae.safetensors").write_bytes(b"")
    assert weights_folder_files(str(tmp_path), "config.json", "sae.safetensors", "an SAE") == (tmp_path / "config.json", tmp_path / "sae.safetensors")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_weights_folder_files_names_the_missing_file(tmp_path, missing):
    for name in ("config.json", "model.safetensors"):
        if name != missing:
            (tmp_path / name).write_text("{}")
    with pytest.raises(InputFileError) as excinfo:
        weights_folder_files(tmp_path, "config.json", "model.safetensors", "a model")
    assert excinfo.value.path == tmp_path / missing
    one_line_naming(excinfo.value, tmp_path / missing, "missing: a model folder needs config.json and model.safetensors")


def test_weights_folder_files_of_a_missing_folder_or_a_file(tmp_path):
    with pytest.raises(InputFileError) as excinfo:
        weights_folder_files(tmp_path / "nowhere", "config.json", "sae.safetensors", "an SAE")
    assert str(excinfo.value) == f"{tmp_path / 'nowhere'}: SAE folder not found"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputFileError) as excinfo:
        weights_folder_files(tmp_path / "file", "config.json", "sae.safetensors", "an SAE")
    one_line_naming(excinfo.value, tmp_path / "file", "is a file; an SAE is a folder holding config.json and sae.safetensors")


def test_weights_folder_files_refuses_a_folder_where_the_config_file_should_be(tmp_path):
    (tmp_path / "config.json").mkdir()  # a folder, not a file
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputFileError) as excinfo:
        weights_folder_files(tmp_path, "config.json", "model.safetensors", "a model")
    assert excinfo.value.path == tmp_path / "config.json"


def test_read_weights_folder_names_a_malformed_config_or_damaged_weights(tmp_path):
    write_weights_folder(tmp_path, "config.json", {"a": 1}, "model.safetensors", {"x": torch.zeros(2)}, {})
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(InputFileError) as excinfo:
        read_weights_folder(tmp_path, "config.json", "model.safetensors", "a model")
    one_line_naming(excinfo.value, tmp_path / "config.json", "not valid JSON")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(InputFileError) as excinfo:
        read_weights_folder(tmp_path, "config.json", "model.safetensors", "a model")
    one_line_naming(excinfo.value, tmp_path / "model.safetensors", "cannot be read as safetensors")


# -- one-line errors ----------------------------------------------------------------------------------------------
def test_one_line_joins_the_lines_of_a_message():
    assert one_line(ValueError("first\n\n  second  \nthird")) == "first; second; third"
    assert one_line(ValueError("plain")) == "plain"


def test_one_line_of_an_empty_message_is_the_exception_type():
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line(KeyError("")) == "''"  # KeyError's str is the repr of its key
    assert one_line(ValueError("\n \n")) == "ValueError"


def test_as_input_error_returns_an_error_already_naming_the_source_unchanged(tmp_path):
    error = InputFileError(tmp_path / "recipe.json", "field 'a' is missing")
    assert as_input_error(str(tmp_path / "recipe.json"), error) is error


def test_as_input_error_restates_another_error_naming_the_source(tmp_path):
    source = tmp_path / "config.json"
    restated = as_input_error(source, ValueError("d_sae must be positive\nfound -1"))
    assert isinstance(restated, InputFileError) and restated.path == source
    assert str(restated) == f"{source}: d_sae must be positive; found -1"
    other = InputFileError(tmp_path / "other.json", "bad")
    restated = as_input_error(source, other)
    assert restated is not other and restated.path == source and str(restated) == f"{source}: {tmp_path / 'other.json'}: bad"
    assert str(as_input_error(source, SegLensError("too big"))) == f"{source}: too big"
