"""The ground floor of what SegLens stores and reads: atomic files and folders, JSON documents with a kind and a
version, weights folders (a JSON config beside a safetensors file) and their hashes, and the bounds on what is read.

Writing. Every output is written atomically: a file goes through a temporary file in its own folder that is renamed
into place (:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`), a folder is built in
a hidden staging folder beside it and renamed into place when complete (:func:`staging_folder`,
:func:`publish_folder`). Nothing replaces an existing output unless asked to (``overwrite``), and that is checked
before any work (:func:`refuse_existing`, :func:`refuse_output_folder`).

Reading. A JSON document is read with :func:`read_json` (a size bound, malformed JSON, undecodable text, nesting or
numbers Python cannot hold: one :class:`~SegLensLogic.errors.InputFileError` naming the file) and checked with
:func:`read_document` / :func:`check_document`: it must be an object of the expected ``kind`` and a supported
``format_version``, then match its schema (a pydantic model whose fields bound keys, types, ranges and sizes), all
before anything is allocated or computed from it. A schema violation becomes one line naming the file and the field
(``latents[3].id: input should be a valid integer, got 'x'``).

Weights are safetensors, never pickles: :func:`safetensors_shapes` reads a file's tensor names and shapes from its
header alone, so a config's sizes are compared with the weights before any tensor of that size is allocated, and
:func:`load_safetensors` reads files up to :data:`MAX_WEIGHTS_BYTES`. :func:`file_sha256` is the content hash by
which recipes, labels files, alignments and bundles name weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputFileError, OutputExistsError, SegLensError, refuse_existing

__all__ = [
    "MAX_JSON_BYTES", "MAX_TEXT_BYTES", "MAX_WEIGHTS_BYTES", "MAX_LATENTS", "MAX_CHANNELS", "MAX_VOXELS", "MAX_AXIS",
    "Schema", "Measured", "Sha256", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "staging_folder", "publish_folder",
    "refuse_existing", "refuse_output_folder", "file_sha256", "read_json", "read_text", "read_document",
    "check_document", "validate", "describe_validation_error", "safetensors_shapes", "load_safetensors",
    "check_tensor_shapes", "weights_folder_files", "read_weights_folder", "write_weights_folder",
]  # fmt: skip

# -- bounds on what SegLens reads -----------------------------------------------------------------------------------
# A JSON document larger than this is refused before it is parsed (the largest SegLens writes, a labels file of a
# 16k-latent SAE, is a few tens of MB).
MAX_JSON_BYTES = 256 << 20
# A text file listing case folders (a cohort list).
MAX_TEXT_BYTES = 16 << 20
# A safetensors file larger than this is refused before it is loaded (SegFormer-B5 is 0.34 GB in float32).
MAX_WEIGHTS_BYTES = 4 << 30
# SAE dictionaries, activation channels and voxel grids SegLens loads (checked before anything of that size exists).
MAX_LATENTS = 1 << 22
MAX_CHANNELS = 1 << 16
MAX_AXIS = 1 << 14
MAX_VOXELS = 1 << 28


# -- writing --------------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_file(tmp: str | Path, path: Path) -> None:
    """Give a finished temporary file the permissions a plain write would (mkstemp makes it 0600), then rename it."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_target(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` (unless ``overwrite``) and create its folder."""
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    atomic_target(path, overwrite)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | Path, document: Any, overwrite: bool = False, indent: int | None = 2, default=None) -> Path:
    """Write a JSON document atomically (``indent`` as :func:`json.dumps`; a final newline)."""
    return atomic_write_text(path, json.dumps(document, indent=indent, default=default) + "\n", overwrite=overwrite)


def staging_folder(out: str | Path, suffix: str = "") -> Path:
    """A fresh hidden folder beside ``out`` in which ``out`` is built before :func:`publish_folder` renames it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=suffix))


def publish_folder(tmp: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Rename a finished folder into place. An existing ``out`` (only with ``overwrite``) is moved aside first and
    removed after the rename, so ``out`` is always either the old folder or the new one, never a mix."""
    tmp, out = Path(tmp), Path(out)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(out)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:  # the old folder goes back, so out is never missing (a failed rename, Ctrl-C)
            os.rename(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, out)


def refuse_output_folder(path: str | Path, overwrite: bool, names: Sequence[str] = ()) -> Path:
    """Check an output folder before any work: a file at ``path`` is refused (it is not a folder), and so is
    any of ``names`` inside it unless ``overwrite``. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputFileError(path, "exists and is not a folder; choose another output")
    for name in names:
        refuse_existing(path / name, overwrite)
    return path


# -- hashes ---------------------------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (identifies model and SAE weights in recipes, alignments and bundles)."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise InputFileError(path, f"cannot be read ({exc.strerror or exc})") from None
    return digest.hexdigest()


# -- JSON documents -------------------------------------------------------------------------------------------------
def _read_bytes(path: Path, max_bytes: int, what: str) -> bytes:
    try:
        if not path.exists():
            raise InputFileError(path, "file not found")
        if path.is_dir():
            raise InputFileError(path, f"is a folder, not {what}")
        size = path.stat().st_size
        if size > max_bytes:
            raise InputFileError(path, f"is {size / 2**20:.0f} MB, more than SegLens reads as {what} ({max_bytes / 2**20:.0f} MB)")
        return path.read_bytes()
    except InputFileError:
        raise
    except OSError as exc:
        raise InputFileError(path, f"cannot be read ({exc.strerror or exc})") from None


def read_text(path: str | Path, max_bytes: int = MAX_TEXT_BYTES, what: str = "a text file") -> str:
    """A UTF-8 text file, size-bounded; undecodable bytes raise :class:`InputFileError` naming the file."""
    path = Path(path)
    raw = _read_bytes(path, max_bytes, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(path, f"is not UTF-8 text (byte {exc.start}: {exc.reason}); is it {what}?") from None


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file. A missing, oversized, undecodable or malformed file (also one nested too deeply or holding
    a number Python cannot hold) raises :class:`InputFileError` naming the file."""
    path = Path(path)
    raw = _read_bytes(path, max_bytes, "JSON")
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"is not valid JSON ({exc})") from None
    except RecursionError:
        raise InputFileError(path, "is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InputFileError(path, f"is not valid JSON ({exc})") from None


# A measured number a document may hold as NaN (json.dumps writes NaN for an undefined mean, a dead latent's rate).
Measured = Annotated[float, Field(allow_inf_nan=True)]
# A SHA-256 in hex, as recipes, labels, alignments and bundles name weights by.
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Schema(BaseModel):
    """Base of SegLens document schemas: strict types (no "3" for 3, no true for 1), finite numbers, and keys the
    schema does not name kept as they are (documents carry more than their readers check)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, frozen=True)


def _location(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(error: ValidationError) -> str:
    """One line for a pydantic error: the first problem with its field path and the value found."""
    problems = error.errors(include_url=False)
    first = problems[0]
    where = _location(first.get("loc", ()))
    message = str(first.get("msg", "is invalid"))
    if message.startswith(("Value error, ", "Assertion failed, ")):
        message = message.split(", ", 1)[1]
    kind = first.get("type", "")
    if kind == "missing":
        text = f"field '{where}' is missing" if where else "a field is missing"
    elif kind == "extra_forbidden":
        text = f"unknown field '{where}'"
    else:
        message = re.sub(r"a valid dictionary( or instance of \w+)?", "a JSON object", message[:1].lower() + message[1:])
        message = message.replace("a valid list", "a list").replace("a valid string", "a string")
        found = "" if kind.startswith(("value_error", "assertion_error")) or "input" not in first else f", got {_short(first['input'])}"
        text = f"field '{where}': {message}{found}" if where else f"{message}{found}"
    more = len(problems) - 1
    return " ".join(text.split()) + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def validate(schema: type[BaseModel], data: Any, source: str | Path, context: Mapping[str, Any] | None = None) -> BaseModel:
    """``schema`` validated on ``data``; a violation raises :class:`InputFileError` naming ``source`` and the field."""
    try:
        return schema.model_validate(data, context=dict(context) if context else None)
    except ValidationError as exc:
        raise InputFileError(source, describe_validation_error(exc)) from None
    except RecursionError:
        raise InputFileError(source, "is nested too deeply") from None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def check_document(
    data: Any,
    source: str | Path,
    kind: str | None,
    versions: int | Sequence[int],
    schema: type[BaseModel] | None = None,
    what: str = "SegLens document",
    default_version: int | None = None,
    context: Mapping[str, Any] | None = None,
    versioned: str | None = None,
) -> Any:
    """Check a parsed document: a JSON object of ``kind`` (None: no kind checked) whose ``format_version`` is one
    of ``versions`` (``default_version`` when absent), matching ``schema``. Returns ``data`` itself. ``what`` names
    the document in errors (``versioned``, when given, in the version's: "bundle format_version 2 ...").

    Raises:
        InputFileError: naming ``source`` and, for a schema violation, the field.
    """
    if not isinstance(data, dict):
        raise InputFileError(source, f"is not {_article(what)} (a JSON object was expected, found {_json_type(data)})")
    if kind is not None and data.get("kind") != kind:
        raise InputFileError(source, f"is not {_article(what)} (kind {_short(data.get('kind'))}, expected '{kind}')")
    accepted = (versions,) if isinstance(versions, int) else tuple(versions)
    version = data.get("format_version", default_version)
    if type(version) is not int or version not in accepted:
        reads = " or ".join(str(v) for v in accepted)
        raise InputFileError(source, f"{versioned or what} format_version {_short(version)} is not supported (this SegLens reads {reads})")
    if schema is not None:
        validate(schema, data, source, context)
    return data


def _article(what: str) -> str:
    return what if what.split(" ", 1)[0] in ("a", "an", "the") else f"a {what}"


def read_document(
    path: str | Path,
    kind: str | None,
    versions: int | Sequence[int],
    schema: type[BaseModel] | None = None,
    what: str = "SegLens document",
    default_version: int | None = None,
    missing: str | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    context: Mapping[str, Any] | None = None,
    versioned: str | None = None,
) -> Any:
    """Read a JSON document and check it (:func:`check_document`); ``missing`` is the message for a missing file.

    Returns:
        The parsed document (a dict), every field the schema names checked.
    """
    path = Path(path)
    if missing is not None and not path.exists():
        raise InputFileError(path, missing)
    return check_document(read_json(path, max_bytes), path, kind, versions, schema, what, default_version, context, versioned)


# -- weights folders ------------------------------------------------------------------------------------------------
def _check_weights_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise InputFileError(path, f"is {size / 2**30:.1f} GB, more than SegLens loads ({MAX_WEIGHTS_BYTES / 2**30:.0f} GB)")


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, from its header alone (nothing is loaded).

    Raises:
        InputFileError: not a safetensors file, or its header does not fit the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        _check_weights_size(path)
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {name: tuple(int(s) for s in handle.get_slice(name).get_shape()) for name in handle.keys()}
    except InputFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputFileError(path, f"cannot be read as safetensors ({' '.join(str(exc).split())})") from None


def check_tensor_shapes(path: str | Path, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], against: str) -> None:
    """Raise :class:`InputFileError` naming the weights file when its tensors (``found``) are not ``expected``
    (``against`` says what they were compared with, e.g. ``config.json (d_in 32, d_sae 128)``)."""
    if dict(expected) == dict(found):
        return
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{name} {found[name]} instead of {expected[name]}" for name in sorted(set(expected) & set(found)) if tuple(found[name]) != tuple(expected[name])]
    parts = ([f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else "")] if missing else []) + \
            ([f"unexpected {', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else "")] if unexpected else []) + wrong[:3]  # fmt: skip
    raise InputFileError(path, f"weights do not match {against} ({'; '.join(parts)})")


def load_safetensors(path: str | Path) -> dict:
    """Every tensor of a safetensors file on the CPU (at most :data:`MAX_WEIGHTS_BYTES`; nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        _check_weights_size(path)
        return load_file(str(path), device="cpu")
    except InputFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputFileError(path, f"cannot be read as safetensors ({' '.join(str(exc).split())})") from None


def weights_folder_files(folder: str | Path, config_name: str, weights_name: str, kind: str) -> tuple[Path, Path]:
    """``(config path, weights path)`` of a weights folder, both checked to exist. ``kind`` names the folder in
    errors ("a model", "an SAE")."""
    folder = Path(folder)
    if not folder.is_dir():
        if folder.exists():
            raise InputFileError(folder, f"is a file; {kind} is a folder holding {config_name} and {weights_name}")
        raise InputFileError(folder, f"{kind.split()[-1]} folder not found")
    config_path, weights_path = folder / config_name, folder / weights_name
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputFileError(path, f"missing: {kind} folder needs {config_name} and {weights_name}")
    return config_path, weights_path


def read_weights_folder(folder: str | Path, config_name: str, weights_name: str, kind: str) -> tuple[Any, dict]:
    """Read a weights folder (a JSON config plus a safetensors file): ``(config data, tensors on the CPU)``.

    Loaders that can say which shapes a config implies check them first with :func:`safetensors_shapes` and
    :func:`check_tensor_shapes` (the SAE and segmenter loaders do), so no config size is allocated unchecked.

    Raises:
        InputFileError: the folder or a file is missing, the JSON is malformed, or the weights are unreadable.
    """
    config_path, weights_path = weights_folder_files(folder, config_name, weights_name, kind)
    return read_json(config_path), load_safetensors(weights_path)


def write_weights_folder(
    folder: str | Path, config_name: str, config: dict, weights_name: str, state: dict, metadata: dict[str, str], overwrite: bool = False
) -> Path:
    """Write a weights folder: ``state`` as safetensors, then ``config`` as JSON, each atomically.

    Raises:
        OutputExistsError: either file exists and ``overwrite`` is False (checked before anything is written).
    """
    from safetensors.torch import save_file

    folder = refuse_output_folder(folder, overwrite, (config_name, weights_name))
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{weights_name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        sort_safetensors_metadata(tmp)
        publish_file(tmp, folder / weights_name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(folder / config_name, config, overwrite=True)
    return folder


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted, in place and at the same length.

    safetensors writes the metadata from a hash map, whose order changes between calls: the same weights saved twice
    could get two file hashes, and a file hash is how SegLens names weights (recipes, labels, alignments, bundles).
    A header laid out otherwise than the library's compact JSON is left as it is.
    """
    import struct

    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        header = json.loads(raw)
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
            return
        compact = lambda h: json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()  # noqa: E731
        if compact(header) != raw.rstrip(b" "):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        handle.seek(8)
        handle.write(compact(header))  # same keys, same values: the same length


def one_line(error: BaseException) -> str:
    """An exception's message on one line (what SegLens errors are)."""
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


def as_input_error(source: str | Path, error: SegLensError | ValueError) -> InputFileError:
    """``error`` restated as an :class:`InputFileError` naming ``source`` (an edit read from a recipe, a size read
    from a config): the user learns which file holds the problem."""
    if isinstance(error, InputFileError) and Path(error.path) == Path(source):
        return error
    return InputFileError(source, one_line(error))
