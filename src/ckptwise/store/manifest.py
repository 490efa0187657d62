"""The manifest: the JSON document whose presence makes a checkpoint exist.

A manifest lists every tensor of a checkpoint (its object id, dtype, shape and codec), the
JSON tree that puts the tensors back into a training state, the step, time, metrics and the
reasons it was saved. This module writes one (:func:`encode_manifest`: JSON with a digest,
a BLAKE3 checksum of its canonical form, from format version 3) and reads one back
(:func:`load_manifest`, :func:`decode_manifest`: size limit, UTF-8, strict JSON, digest).
What a manifest holds is defined in :mod:`ckptwise.store.manifest_types`, and every field
of what is read is checked by :mod:`ckptwise.store.manifest_check`; all their names are
importable from here. Whatever is wrong raises :class:`FormatError` (or
:class:`CorruptCheckpointError` for a failed checksum) naming the file and the field.
``docs/FORMAT.md`` describes the format in full.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import blake3

from ckptwise.errors import CorruptCheckpointError, FormatError, SnapshotError
from ckptwise.store.backend import Backend
from ckptwise.store.codecs import readable
from ckptwise.store.manifest_check import (
    check_version,
    malformed,
    manifest_from_doc,
    short_repr,
)
from ckptwise.store.manifest_types import (
    DIGEST_VERSION,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    ITEMSIZES,
    MAX_CHAIN,
    MAX_DEPTH,
    MAX_MANIFEST_BYTES,
    Manifest,
    RankView,
    Shard,
    TensorEntry,
    dtype_name,
)

__all__ = [
    "DIGEST_VERSION",
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ITEMSIZES",
    "MAX_CHAIN",
    "MAX_DEPTH",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "RankView",
    "Shard",
    "TensorEntry",
    "decode_manifest",
    "dtype_name",
    "encode_manifest",
    "load_manifest",
    "manifest_digest",
]

_DIGEST = "blake3:"


def manifest_digest(doc: Mapping[str, Any]) -> str:
    """The ``digest`` of a manifest document (given without its ``digest`` field): BLAKE3
    of its canonical JSON (keys sorted, no whitespace, non-ASCII characters escaped)."""
    return _DIGEST + blake3.blake3(_canonical(doc).encode("ascii")).hexdigest()


def _canonical(doc: Mapping[str, Any]) -> str:
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def encode_manifest(manifest: Manifest) -> bytes:
    """Serialise ``manifest`` as UTF-8 JSON with its digest (non-finite metrics become
    ``null``), always in the newest format.

    What it writes is first validated as a reader validates it, so every manifest written
    reads back; a manifest that could not (a state tree nested deeper than
    :data:`MAX_DEPTH`, a value JSON cannot hold, ...) raises :class:`SnapshotError` and
    nothing is written.
    """
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": manifest.step,
        "time": manifest.time,
        "reasons": list(manifest.reasons),
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in manifest.metrics.items()},
        "written_bytes": manifest.written_bytes,
        "tensors": {name: e.to_json() for name, e in manifest.tensors.items()},
        "tree": manifest.tree,
        "extra": dict(manifest.extra),
    }
    if manifest.ranks:
        doc["ranks"] = [view.to_json() for view in manifest.ranks]
    where = f"of step {manifest.step}"
    try:
        # validation also proves the document plain JSON (string keys, lists, finite
        # floats), so a reader's parse of it hashes to the same canonical bytes
        manifest_from_doc(doc, where=where, codecs=readable())
        digest = manifest_digest(doc)
        # keys in their own order (a state dict's order is the user's), the digest first
        text = json.dumps({"digest": digest, **doc}, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SnapshotError(
            f"the manifest {where} cannot be written ({exc}); the state must hold only "
            f"JSON values, tensors and objects with state_dict(), nested at most {MAX_DEPTH} "
            "deep"
        ) from exc
    if len(text) > MAX_MANIFEST_BYTES:
        raise SnapshotError(
            f"the manifest {where} would take {len(text)} bytes, more than a reader accepts "
            f"(MAX_MANIFEST_BYTES = {MAX_MANIFEST_BYTES}); keep large values in tensors"
        )
    return text.encode()


def load_manifest(backend: Backend, path: str) -> Manifest:
    """Read and validate the manifest at ``path``, refusing a file larger than
    :data:`MAX_MANIFEST_BYTES` (or a FIFO, link or device) before reading it.

    Raises :class:`~ckptwise.errors.CheckpointNotFoundError` when it is gone, a
    :class:`CorruptCheckpointError` when it is not a valid manifest.
    """
    for _ in range(3):
        size = backend.size(path)
        if size > MAX_MANIFEST_BYTES:
            raise FormatError(
                f"manifest {path} holds {size} bytes, more than a manifest may "
                f"(MAX_MANIFEST_BYTES = {MAX_MANIFEST_BYTES}); it is not a ckptwise manifest: "
                "move it out of the run"
            )
        buffer = bytearray(size + 1)
        if backend.read_into(path, memoryview(buffer)) == size:
            return decode_manifest(bytes(buffer[:size]), where=path, codecs=readable())
        # replaced between the size and the read (a step saved again): read the new one
    raise CorruptCheckpointError(f"manifest {path} keeps changing while it is read")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed (strict JSON)")


def decode_manifest(data: bytes, *, where: str, codecs: frozenset[str]) -> Manifest:
    """Parse, check the digest of, and validate a manifest; :class:`FormatError` names the
    field that is wrong, :class:`CorruptCheckpointError` a digest that does not match.

    ``where`` names the file in messages; ``codecs`` is the set of codec names this build
    can decode, so a manifest from a newer release fails clearly instead of mis-decoding.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError(
            f"manifest {where} holds {len(data)} bytes, more than a manifest may "
            f"(MAX_MANIFEST_BYTES = {MAX_MANIFEST_BYTES})"
        )
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise malformed(where, f"not UTF-8 text ({exc})") from exc
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise malformed(where, "not valid JSON (nested too deeply to parse)") from None
    except ValueError as exc:
        raise malformed(where, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise malformed(where, f"the 'format' field is not {FORMAT_NAME!r}")
    digest = doc.pop("digest", None)
    version = check_version(doc, where)
    if digest is not None or version >= DIGEST_VERSION:
        if not isinstance(digest, str) or not digest.startswith(_DIGEST):
            raise malformed(
                where,
                f"'digest' is {short_repr(digest)}, not 'blake3:<hex>' (format version {version} "
                "manifests carry one)",
            )
        try:
            actual = manifest_digest(doc)
        except (ValueError, RecursionError) as exc:
            raise malformed(where, f"cannot be checksummed ({exc})") from None
        if digest != actual:
            raise CorruptCheckpointError(
                f"manifest {where} fails its checksum: 'digest' says {short_repr(digest)}, its "
                f"content hashes to {actual}, so it changed after it was written. ckptwise "
                "skips it (restores fall back to an older checkpoint); put back an intact "
                "copy, or delete it"
            )
    return manifest_from_doc(doc, where=where, codecs=codecs)
