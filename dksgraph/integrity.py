"""Seals: the checksum every weights file dksgraph writes carries, and its verification on every read.

A flipped bit inside a tensor's bytes does not stop PyTorch from loading a file (its zip reader does not
check the records' CRC-32), so dksgraph seals what it writes and verifies the seal before it reads:

* **zip files** (``torch.save`` checkpoints and state_dicts, ``torch.export`` ``.pt2``, TorchScript): the
  zip writer already records a CRC-32 of every record's bytes in the archive's directory. The seal is a
  SHA-256 over every other byte of the file (local headers, padding, ``data.pkl`` when compressed, the
  directory with those CRC-32s, the end records), kept as the archive's comment, which every zip reader,
  ``torch.load`` included, skips. Verifying recomputes the SHA-256 and every record's CRC-32, so every
  byte is covered, and a damaged record is named. Sealing costs a few milliseconds whatever the size
  (the tensors are not hashed a second time); ``tools/bench_checksum.py`` measures it.
* **ONNX** (protobuf): a SHA-256 of the whole model, appended as one more ``metadata_props`` entry
  (``dksgraph-seal/1``), which is how protobuf extends a message; onnx and onnxruntime read the file
  as before.
* **JSON sidecars**: a ``checksum`` field over the canonical JSON of the other fields.

A seal detects damage (a flipped bit, a truncated or patched copy, a bad transfer), not tampering:
whoever rewrites a file can reseal it. Hostile files are kept out by reading with ``weights_only=True``.

Example::

    >>> verify("runs/r32/last.pt").describe()               # doctest: +SKIP
    'sha256 3f2a9c41..., 412 records CRC-32 checked'
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dksgraph.errors import CheckpointError

__all__ = ["ALGORITHM", "PROTOBUF", "ZIP", "DamagedFile", "Seal", "UnsealedFile", "seal_file", "seal_json",
           "verify", "verify_file", "verify_json", "warn_unsealed"]

ALGORITHM = "sha256"
VERSION = b"dksgraph-seal/1"
ZIP, PROTOBUF = "zip", "protobuf"  # the two kinds of sealed files

_HEX = 64  # a SHA-256 digest in hex
_EOCD = b"PK\x05\x06"  # the zip's end-of-central-directory record: 22 bytes and the comment
_LOCAL = b"PK\x03\x04"
# the seal's bytes before the digest: a zip comment, or a protobuf ModelProto.metadata_props entry (field 14)
# holding key `dksgraph-seal/1` (field 1) and value `sha256 <hex>` (field 2)
_VALUE = f"{ALGORITHM} ".encode()
_PREFIX = {
    ZIP: VERSION + b" " + _VALUE,
    PROTOBUF: bytes([0x72, 4 + len(VERSION) + len(_VALUE) + _HEX, 0x0A, len(VERSION)]) + VERSION
    + bytes([0x12, len(_VALUE) + _HEX]) + _VALUE,
}
_SUFFIX = {ZIP: b"\n", PROTOBUF: b""}
_NEAR = 4  # a trailer whose fixed bytes differ from a seal's in at most this many places is a damaged seal


class DamagedFile(CheckpointError):
    """A sealed file whose bytes no longer match its seal (``where``: the tensor, record or section)."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


class UnsealedFile(UserWarning):
    """A file without a seal was read (written by an earlier release, or by another program)."""


@dataclass(frozen=True)
class Seal:
    """What :func:`verify` found: a sealed file that matches (``sealed``), or a file without a seal."""

    path: Path
    sealed: bool
    kind: str | None = None  # ZIP or PROTOBUF
    digest: str | None = None
    records: int = 0  # records whose CRC-32 was checked (zip files)

    def describe(self) -> str:
        if not self.sealed:
            return "no checksum (written by an earlier release of dksgraph, or by another program)"
        crc = f", {self.records} records CRC-32 checked" if self.kind == ZIP else ""
        return f"{ALGORITHM} {self.digest[:8]}...{crc}"


# ------------------------------------------------------------------------------------------------ sealing

def seal_file(f: BinaryIO, kind: str) -> str:
    """Seal the file ``f`` (open for reading and writing, its whole content written) in place: append the
    seal of ``kind`` (:data:`ZIP` or :data:`PROTOBUF`); returns the digest."""
    size = f.seek(0, 2)
    trailer_len = _trailer_len(kind)
    if kind == ZIP:
        f.seek(size - 22)
        end = f.read(22)
        if len(end) != 22 or end[:4] != _EOCD or end[20:] != b"\0\0":
            raise CheckpointError("internal error: the file to seal does not end with a zip end record without a "
                                  "comment; please report this with the PyTorch version.")
        f.seek(size - 2)
        f.write(struct.pack("<H", trailer_len))  # the comment's length is part of what the seal covers
    with _mapped(f) as data:
        if kind == ZIP:
            digest, _ = _structure_digest(data, size, _records(data, size - 22))
        else:
            digest = hashlib.sha256(data[:size]).hexdigest()
    f.seek(size)
    f.write(_PREFIX[kind] + digest.encode() + _SUFFIX[kind])
    return digest


def seal_json(data: dict[str, Any]) -> bytes:
    """``data`` as indented JSON text with a ``checksum`` field over its canonical form."""
    if "checksum" in data:
        raise ValueError("the data to seal already has a `checksum` field")
    return (json.dumps({**data, "checksum": f"{ALGORITHM} {_json_digest(data)}"}, indent=1) + "\n").encode()


def _json_digest(data: dict[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ verifying

def verify(path: str | Path, what: str = "file", advice: str = "") -> Seal:
    """Check ``path`` against its seal before anything reads it.

    Returns:
        the :class:`Seal` (``sealed=False`` for a file that carries none: an earlier release's).

    Raises:
        DamagedFile: the file does not match its seal, or its seal, zip end record or structure is damaged;
            the message names the file, the place (the tensor and its record where one can be named) and
            ``advice`` (what to do instead). CheckpointError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} `{path}` does not exist. Check the path.")
    with open(path, "rb") as f, _mapped(f) as data:
        size = len(data)
        for kind in (ZIP, PROTOBUF):
            n = _trailer_len(kind)
            if size < n:
                continue
            trailer = bytes(data[size - n:])
            state = _trailer_state(trailer, kind)
            if state == "intact":
                digest = trailer[len(_PREFIX[kind]):len(_PREFIX[kind]) + _HEX].decode()
                return _verify_sealed(data, f, path, size - n, kind, digest, what, advice)
            if state == "damaged" or kind == ZIP and bytes(data[max(0, size - n - 22):][:4]) == _EOCD \
                    and bytes(data[size - n - 2:size - n]) == struct.pack("<H", n):
                raise _damaged(path, what, "in its checksum record (the seal at the end of the file)", advice)
        if bytes(data[:4]) == _LOCAL and bytes(data[max(0, size - 22):][:4]) != _EOCD:
            raise _damaged(path, what, "at its end: the zip end record is missing (the file is truncated, or bytes "
                           "were added after it)", advice)
    return Seal(path, sealed=False)


def verify_file(path: str | Path) -> list[Seal]:
    """What ``dksgraph verify`` checks for one file: the file itself (a sealed JSON file when it ends in
    ``.json``), and the JSON sidecar beside it when there is one (an exported state_dict's)."""
    path = Path(path)
    if path.suffix == ".json":
        return [verify_json(path, "file")[1]]
    seals = [verify(path)]
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        seals.append(verify_json(sidecar, "sidecar")[1])
    return seals


def verify_json(path: str | Path, what: str, sealed_formats: tuple[str, ...] = (),
                advice: str = "") -> tuple[dict[str, Any], Seal]:
    """Read a sealed JSON file: its data (without the ``checksum`` field) and its :class:`Seal`. A file
    without a checksum is accepted unless its ``format`` field is one of ``sealed_formats`` (formats that are
    always written sealed); one that does not match raises :class:`DamagedFile`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} `{path}` does not exist. Check the path.")
    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise _damaged(path, what, "in its JSON text, which no longer parses", advice) from None
    stored = data.pop("checksum", None)
    if stored is None:
        if data.get("format") in sealed_formats:
            raise _damaged(path, what, "in its `checksum` field, which is missing", advice)
        return data, Seal(path, sealed=False)
    digest = _json_digest(data)
    if stored != f"{ALGORITHM} {digest}":
        raise _damaged(path, what, "in its fields, which no longer match the `checksum` they were written with",
                       advice)
    return data, Seal(path, sealed=True, kind="json", digest=digest)


def warn_unsealed(seal: Seal, what: str) -> None:
    """The one notice a file without a seal gets when it is read (once per file and process)."""
    if not seal.sealed:
        warnings.warn(UnsealedFile(
            f"{what} `{seal.path}` carries no checksum (it was written by an earlier release of dksgraph or by "
            "another program), so damage inside it cannot be detected; it is read as it is. Saving it again "
            "with this version (train --resume, strip, export) gives a sealed file."), stacklevel=3)


def _trailer_len(kind: str) -> int:
    return len(_PREFIX[kind]) + _HEX + len(_SUFFIX[kind])


def _trailer_state(trailer: bytes, kind: str) -> str:
    """``intact``, ``damaged`` (a seal with a few bytes changed) or ``none`` (no seal of this kind): the
    fixed bytes around the digest are compared one by one, so a flipped bit in them still reads as a seal."""
    prefix, suffix = _PREFIX[kind], _SUFFIX[kind]
    digest = trailer[len(prefix):len(prefix) + _HEX]
    fixed = prefix + suffix
    found = trailer[:len(prefix)] + trailer[len(prefix) + _HEX:]
    wrong = sum(a != b for a, b in zip(found, fixed))
    if wrong == 0 and all(c in b"0123456789abcdef" for c in digest):
        return "intact"
    return "damaged" if wrong <= _NEAR else "none"


def _verify_sealed(data: memoryview, f: BinaryIO, path: Path, end: int, kind: str, digest: str, what: str,
                   advice: str) -> Seal:
    if kind == PROTOBUF:
        if hashlib.sha256(data[:end]).hexdigest() != digest:
            raise _damaged(path, what, "in its ONNX model (graph or weights), whose bytes no longer match its "
                           f"{ALGORITHM} seal", advice)
        return Seal(path, True, kind, digest)
    try:
        spans = _records(data, end - 22)
    except _Broken as exc:
        raise _damaged(path, what, f"in its zip structure ({exc}), which no longer matches its {ALGORITHM} seal",
                       advice) from None
    found, bad = _structure_digest(data, end, spans, check=True)
    if found != digest:
        raise _damaged(path, what, "in its zip structure (headers, directory or end records), which no longer "
                       f"matches its {ALGORITHM} seal", advice)
    if bad is not None:
        tensor = _tensor_names(f).get(bad)
        if bad.endswith("data.pkl"):
            where = f"its metadata (record `{bad}`: the keys, shapes and dtypes of its tensors)"
        else:
            where = f"the tensor `{tensor}` (record `{bad}`)" if tensor else f"record `{bad}`"
        raise _damaged(path, what, f"at {where}, whose bytes no longer match the CRC-32 they were written with",
                       advice)
    return Seal(path, True, kind, digest, records=len(spans))


class _Broken(Exception):
    """The zip structure cannot be read (said in the message)."""


_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # a central-directory entry, 46 bytes before its name
_MASK32 = 0xFFFFFFFF


def _records(data: memoryview, eocd: int) -> list[tuple[int, int, int, str]]:
    """(start, end, CRC-32, name) of every stored record's bytes, in file order, read from the directory of the
    zip whose end record starts at ``eocd`` (zip64 included); :class:`_Broken` when the structure does not hold."""
    try:
        if bytes(data[eocd:eocd + 4]) != _EOCD:
            raise _Broken("its end record is missing")
        count, cd_size, cd_offset = struct.unpack_from("<4xHII", data, eocd + 6)
        if eocd >= 20 and bytes(data[eocd - 20:eocd - 16]) == b"PK\x06\x07":  # the zip64 locator
            (z64,) = struct.unpack_from("<Q", data, eocd - 12)
            if bytes(data[z64:z64 + 4]) != b"PK\x06\x06":
                raise _Broken("its zip64 end record is not where the locator says")
            count, cd_size, cd_offset = struct.unpack_from("<QQQ", data, z64 + 32)
        spans, pos = [], cd_offset
        for _ in range(count):
            entry = _CENTRAL.unpack_from(data, pos)
            if entry[0] != 0x02014B50:
                raise _Broken("a directory entry is damaged")
            method, crc, size, usize, name_len, extra_len, comment_len, offset = (
                entry[4], entry[7], entry[8], entry[9], entry[10], entry[11], entry[12], entry[16])
            name = bytes(data[pos + 46:pos + 46 + name_len]).decode("utf-8", "replace")
            if _MASK32 in (size, usize, offset):
                size, offset = _zip64_sizes(bytes(data[pos + 46 + name_len:pos + 46 + name_len + extra_len]),
                                            usize, size, offset)
            pos += 46 + name_len + extra_len + comment_len
            if method != 0:
                continue  # a compressed record's bytes are hashed with the structure
            signature, local_name, local_extra = struct.unpack_from("<I22xHH", data, offset)
            if signature != 0x04034B50:
                raise _Broken(f"the local header of `{name}` is not where the directory says")
            start = offset + 30 + local_name + local_extra
            spans.append((start, start + size, crc, name))
        if pos != cd_offset + cd_size:
            raise _Broken("the directory's size does not match its entries")
    except (struct.error, IndexError, ValueError) as exc:
        raise _Broken(f"unreadable: {type(exc).__name__}") from None
    spans.sort()
    pos = 0
    for start, end, _, name in spans:
        if start < pos or end > cd_offset:
            raise _Broken(f"the bytes of `{name}` overlap others or the directory")
        pos = end
    return spans


def _zip64_sizes(extra: bytes, usize: int, size: int, offset: int) -> tuple[int, int]:
    """The 64-bit size and header offset of an entry whose 32-bit fields say "see the zip64 extra field"."""
    i = 0
    while i + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, i)
        if kind == 1:
            fields = iter(struct.unpack_from(f"<{length // 8}Q", extra, i + 4))
            if usize == _MASK32:
                next(fields)
            if size == _MASK32:
                size = next(fields)
            if offset == _MASK32:
                offset = next(fields)
            return size, offset
        i += 4 + length
    raise _Broken("a directory entry lacks its zip64 sizes")


def _structure_digest(data: memoryview, limit: int, spans, check: bool = False) -> tuple[str, str | None]:
    """The SHA-256 of every byte before ``limit`` outside the records' spans, and (with ``check``) the first
    record whose bytes do not match their CRC-32 (None when all do)."""
    digest, bad, pos = hashlib.sha256(), None, 0
    for start, end, crc, name in spans:
        digest.update(data[pos:start])
        if check and bad is None and zlib.crc32(data[start:end]) != crc:
            bad = name
        pos = end
    digest.update(data[pos:limit])
    return digest.hexdigest(), bad


@contextlib.contextmanager
def _mapped(f: BinaryIO) -> Iterator[memoryview]:
    """The whole file ``f`` as a read-only memoryview (mapped, so nothing is copied)."""
    f.flush()
    if os.fstat(f.fileno()).st_size == 0:
        yield memoryview(b"")
        return
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            yield view
        finally:
            view.release()


def _damaged(path: Path, what: str, where: str, advice: str) -> DamagedFile:
    return DamagedFile(
        f"{what} `{path}` is damaged {where}. It changed after dksgraph wrote it (a disk or memory error, a "
        "truncated or patched copy, a bad transfer), so dksgraph does not read it. "
        f"{advice or 'Use another copy of the file, or write it again.'}", where)


# ------------------------------------------------------------------------- naming the tensor of a damaged record

class _Storage:
    def __init__(self, key: str) -> None:
        self.key = key


class _Opaque:
    """Stands in for every class a checkpoint's pickle names: nothing is imported, nothing runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.args = (*self.args, state)


class _Dict(dict):
    """An OrderedDict's stand-in (it may carry attributes, such as a state_dict's ``_metadata``)."""


class _NameUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return _Dict
        if module == "torch._utils" and name.startswith("_rebuild"):
            return lambda *args, **kwargs: args[0] if args else None  # a tensor or parameter: its storage
        return _Opaque

    def persistent_load(self, pid: Any):
        return _Storage(str(pid[2])) if isinstance(pid, tuple) and len(pid) > 2 else _Opaque()


def _tensor_names(f: BinaryIO) -> dict[str, str]:
    """Record name -> where its tensor sits in the file's data (``model['layer1.0.weight']``), for a file
    whose ``data.pkl`` is intact; {} when it cannot be read (the record is then named alone)."""
    try:
        with zipfile.ZipFile(f) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            obj = _NameUnpickler(io.BytesIO(archive.read(pkl))).load()
    except Exception:  # noqa: BLE001 - best effort: naming the record alone is still an answer
        return {}
    prefix = pkl[:-len("data.pkl")] + "data/"
    names: dict[str, str] = {}
    seen: set[int] = set()

    def walk(node: Any, where: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, _Storage):
            names.setdefault(prefix + node.key, where)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{where}[{key!r}]" if where else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, _Opaque):
            for value in node.args:
                walk(value, where)

    walk(obj, "")
    return names
