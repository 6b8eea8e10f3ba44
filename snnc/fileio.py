"""Atomic, non-clobbering file writes, clear errors for unreadable files, and the snnc bundle.

The bundle is the one container every snnc file uses (graph files and compiled exports): an
uncompressed tar whose first member ``snnc.json`` holds the metadata and the sha256 and size of
every other member. One file = one unit: replacing it is one ``rename``, so artefact and
metadata can never be half-replaced, and every byte is verified before anything parses it or
dlopens it (a truncated copy or a swapped artefact is a ``FileFormatError``, never a SIGBUS).
It cannot carry code: members are raw bytes that the reader checks, never unpickles.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from .errors import FileFormatError, SnncError

BUNDLE_META = "snnc.json"
# Bounds on what a bundle may ask for (a hostile file cannot make snnc allocate more than this).
MAX_META_BYTES = 16 << 20
MAX_MEMBER_BYTES = 8 << 30
MAX_MEMBERS = 64


class OverwriteError(SnncError, FileExistsError):
    """Refused to replace an existing file without ``overwrite=True``."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write, overwrite=False) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same folder, so the rename
    is atomic). An existing ``path`` is kept unless ``overwrite=True``; a failed write leaves
    nothing behind. The file gets the user's umask (``mkstemp`` alone would make it 0600)."""
    path = Path(path)
    if path.is_dir():
        raise OverwriteError(f"{path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise OverwriteError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def require_file(path, what="file") -> Path:
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{what} {path} does not exist")
    if path.is_dir():
        raise FileFormatError(f"{what} {path} is a directory, expected a file")
    if path.stat().st_size == 0:
        raise FileFormatError(f"{what} {path} is empty")
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_bytes(meta: dict, files: dict[str, bytes]) -> bytes:
    """The bundle of ``files`` (name -> bytes) with ``meta`` plus their hashes in ``snnc.json``."""
    meta = {**meta, "files": {name: {"sha256": sha256(data), "size": len(data)} for name, data in files.items()}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(BUNDLE_META, json.dumps(meta, indent=1).encode()), *files.items()]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_bundle(path, meta: dict, files: dict[str, bytes], overwrite: bool = False) -> Path:
    """Write a bundle atomically (one rename: never half a bundle under ``path``)."""
    data = bundle_bytes(meta, files)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)


def is_bundle(path) -> bool:
    """Whether ``path`` starts like a bundle (a tar whose first member is ``snnc.json``), even a
    truncated one (``read_bundle`` then says so)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(BUNDLE_META) + 1)
    except OSError:
        return False
    return head == BUNDLE_META.encode() + b"\0"


def bundle_format(path) -> str | None:
    """The ``format`` that a bundle's ``snnc.json`` declares (unverified: only to pick a reader),
    or ``None`` when ``path`` is not a readable bundle."""
    if not is_bundle(path):
        return None
    try:
        with tarfile.open(path, mode="r:") as tar:
            first = tar.next()
            if first is None or first.size > MAX_META_BYTES:
                return None
            meta = json.loads(tar.extractfile(first).read())
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def read_bundle(path, what: str = "snnc file", expect_format: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """``(meta, files)`` of a bundle, every member checked against the sha256 and size that
    ``snnc.json`` records; anything else is a ``FileFormatError`` naming ``path``."""
    path = require_file(path, what)
    if not is_bundle(path):
        raise FileFormatError(f"{path} is not an snnc {what} (it does not start with the {BUNDLE_META} "
                              "header that snnc writes)")
    try:
        with tarfile.open(path, mode="r:") as tar:  # "r:": never decompress (no zip bombs)
            members = tar.getmembers()
            if not members or members[0].name != BUNDLE_META:
                raise FileFormatError(f"{path} is not an snnc {what} (no {BUNDLE_META} first)")
            if len(members) > MAX_MEMBERS + 1:
                raise FileFormatError(f"{path}: {len(members)} members, more than an snnc {what} has")
            for m in members:
                if not m.isfile():
                    raise FileFormatError(f"{path}: member {m.name!r} is not a regular file")
                if m.size > (MAX_META_BYTES if m.name == BUNDLE_META else MAX_MEMBER_BYTES):
                    raise FileFormatError(f"{path}: member {m.name!r} claims {m.size} bytes, over the bound")
            raw = {m.name: tar.extractfile(m).read() for m in members}
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is not a readable snnc {what} (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        meta = json.loads(raw.pop(BUNDLE_META))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path}: {BUNDLE_META} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "format" not in meta:
        raise FileFormatError(f"{path}: {BUNDLE_META} is not snnc metadata (no format / files)")
    if expect_format is not None and meta["format"] != expect_format:
        raise FileFormatError(f"{path} is an snnc {meta['format']!r} file, expected {expect_format!r}")
    files = {}
    for name, rec in meta["files"].items():
        if name not in raw:
            raise FileFormatError(f"{path}: member {name!r} is missing (truncated?)")
        data = raw.pop(name)
        if not isinstance(rec, dict) or len(data) != rec.get("size") or sha256(data) != rec.get("sha256"):
            raise FileFormatError(f"{path}: member {name!r} does not match its recorded sha256/size "
                                  "(damaged or swapped file; re-export it)")
        files[name] = data
    if raw:
        raise FileFormatError(f"{path}: unlisted member(s) {sorted(raw)}")
    return meta, files


def private_dir(prefix: str = "snnc-") -> str:
    """A fresh folder only this user can read or write (``mkdtemp`` makes it 0700), for verified
    bytes that a library loader needs as a file: nobody can swap them between check and load."""
    return tempfile.mkdtemp(prefix=prefix)


def _private_enough(folder: Path) -> bool:
    """A cache folder nobody else can write into (ours, not group/world-writable): an entry there
    was written by this user, so loading it is as safe as loading what this user compiled."""
    try:
        st = folder.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def read_cache_entry(path, member: str) -> Path | None:
    """The verified ``member`` of a cache bundle, copied into a private folder for a loader that
    needs a file; ``None`` (and a damaged entry removed) when it is missing, damaged, or the
    cache folder is writable by others. The caller rebuilds then."""
    path = Path(path)
    if not path.is_file() or not _private_enough(path.parent):
        return None
    try:
        meta, files = read_bundle(path, "cache entry", expect_format="snnc-cache")
    except FileFormatError:
        try:
            path.unlink()
        except OSError:
            pass
        return None
    if member not in files:
        return None
    folder = private_dir()
    atexit.register(shutil.rmtree, folder, True)  # the loaded library stays mapped; the file can go
    out = Path(folder) / member
    out.write_bytes(files[member])
    return out


def write_cache_entry(path, member: str, write) -> Path | None:
    """Write ``write(tmp_file)``'s bytes as a verified cache bundle at ``path`` (folder made 0700);
    ``None`` when the cache folder cannot be written or is not private (the cache is optional)."""
    path = Path(path)
    folder = Path(private_dir())
    atexit.register(shutil.rmtree, folder, True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _private_enough(path.parent):
            return None
        write(str(folder / member))
        write_bundle(path, {"format": "snnc-cache", "version": 1}, {member: (folder / member).read_bytes()},
                     overwrite=True)
        return folder / member
    except OSError:
        return None
