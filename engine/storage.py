"""Files and objects by URI: the one place fescale turns a location string into a filesystem.

`fescale distill` reads prompts from `--input` and writes shards, a manifest and a lock under
`--output-dir`; either may be a local folder or a prefix on an object store. Everything goes through
a `Location` (a pyarrow filesystem, a path on it, the URI to show), so one code path serves a local
disk, S3 or any S3-compatible store, GCS, HDFS and Azure, on the driver and, pickled with its
filesystem, on the Ray workers that write the shards.

- `resolve` takes local paths and the URI schemes in `SCHEMES`; anything else (an unknown scheme,
  `s3:/x`, a URI with no bucket, NUL, a lone surrogate) is a `ConfigError`, never a local folder
  named `s3:`.
- S3 settings come from the usual AWS variables and files (credentials chain, region). pyarrow 26's
  `FileSystem.from_uri` itself reads `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, for an
  S3-compatible store and keeps the endpoint in the filesystem's options, which travel to workers.
- A store that fails for every request (no such bucket, access denied, endpoint unreachable) is a
  `BackendError` naming the URI and the cause on one line (`storage_error`).
- `OutputLock` keeps two jobs from writing the same output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from actors.errors import BackendError, ConfigError

log = logging.getLogger("fescale")

SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
SUPPORTED = "supported: a local path, or a URI " + ", ".join(f"{s}://..." for s in SCHEMES)
OBJECT_STORES = ("s3", "gcs")  # pyarrow type names: no folders, and one upload is atomic
LOCK_NAME = "_fescale.lock"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986; anything with one is not a local path
# Substrings of pyarrow's (and the AWS SDK's) messages -> the cause a user acts on.
_CAUSES = (
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("' not found", "the bucket does not exist"),  # the bucket-region lookup of a real S3 URI
    ("ACCESS_DENIED", "access denied (check the credentials and the bucket's permissions)"),
    ("Permission denied", "permission denied"),
    ("NETWORK_CONNECTION", "the storage endpoint cannot be reached (check AWS_ENDPOINT_URL and the network)"),
)


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem: `path` is what `fs` takes, `uri` what messages show."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        tail = "/".join(parts)
        return Location(self.fs, f"{self.path.rstrip('/')}/{tail}", f"{self.uri.rstrip('/')}/{tail}")

    @property
    def local(self) -> bool:
        return self.fs.type_name == "local"

    def __str__(self) -> str:
        return self.uri


def resolve(uri: str) -> Location:
    """The filesystem and path of a local path or a URI; a ConfigError for anything else."""
    if not uri.strip():
        raise ConfigError(f"empty storage location {uri!r}; {SUPPORTED}")
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"storage location {uri!r} is not valid text (a lone surrogate); {SUPPORTED}") from None
    if "\x00" in uri:
        raise ConfigError(f"storage location {uri!r} contains a NUL character; {SUPPORTED}")
    match = _SCHEME.match(uri)
    if match is None:
        path = os.path.abspath(uri)  # absolute: Ray workers do not share the driver's working folder
        return Location(pafs.LocalFileSystem(), path, path)
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"unsupported storage URI {uri!r} (scheme {scheme}:); {SUPPORTED} (write ./{uri} for a local name with a colon)")
    uri = scheme + uri[len(scheme) :]
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except ValueError as e:  # pyarrow.ArrowInvalid: does not parse, names no bucket, unknown option
        raise ConfigError(f"malformed storage URI {uri!r}: {e}; {SUPPORTED}") from None
    except OSError as e:  # the filesystem cannot be set up: HDFS without a JVM, a bucket-region lookup
        raise storage_error(_shown(uri), e) from e
    if scheme != "file" and "" in path.lstrip("/").split("/"):
        raise ConfigError(f"malformed storage URI {uri!r}: no bucket, or an empty path segment; {SUPPORTED}")
    if fs.type_name == "s3":
        fs = _single_put(fs)
    return Location(fs, path, path if scheme == "file" else _shown(uri))


def _shown(uri: str) -> str:
    """The URI for messages: no password, no query (options), no trailing slash."""
    parts = urlsplit(uri)
    netloc = parts.netloc.replace(f":{parts.password}@", "@") if parts.password else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _single_put(fs: pafs.S3FileSystem) -> pafs.S3FileSystem:
    """The same S3 filesystem with delayed open, so a small object is one PUT: pyarrow otherwise
    starts a multipart upload (three requests) for every file. Rebuilt from the options pickling
    uses, so nothing `from_uri` chose (endpoint, region, credentials kind) is lost."""
    _, (options,) = fs.__reduce__()
    return pafs.S3FileSystem(**{**options, "allow_delayed_open": True})


def storage_error(uri: str, error: BaseException) -> BackendError:
    """A storage failure as one line naming the URI and the cause (pyarrow's first line if unknown)."""
    text = str(error).strip()
    cause = next((cause for key, cause in _CAUSES if key in text), None)
    if cause is None:
        cause = re.sub(r"\s*\(Request ID: [^)]*\)", "", text.splitlines()[0]) if text else type(error).__name__
    return BackendError(f"storage {uri}: {cause}")


@contextlib.contextmanager
def _mapped(loc: Location):
    """Storage errors as BackendError; FileNotFoundError passes through for the caller to decide."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        raise storage_error(loc.uri, e) from e


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole file; a reader sees the old content or the new, never part of it. Locally: a
    temporary name in the same folder, fsync, rename; on an object store one upload, which is atomic;
    elsewhere (HDFS, Azure) a temporary name and the filesystem's rename."""
    with _mapped(loc):
        if loc.fs.type_name in OBJECT_STORES:
            with loc.fs.open_output_stream(loc.path) as out:
                out.write(data)
            return
        folder, name = loc.path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        if not loc.local:
            loc.fs.create_dir(folder, recursive=True)
            with loc.fs.open_output_stream(tmp) as out:
                out.write(data)
            loc.fs.move(tmp, loc.path)
            return
        os.makedirs(folder, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make a rename durable: after a power loss a manifest entry (the commit) must not outlive the
    shard files it lists."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(loc: Location) -> bytes | None:
    """A whole file's bytes, or None if there is no such file."""
    with _mapped(loc):
        try:
            with loc.fs.open_input_stream(loc.path) as f:
                return f.read()
        except FileNotFoundError:
            return None


def exists(loc: Location) -> bool:
    """A file there, or a folder or prefix (on an object store: one with objects under it)."""
    with _mapped(loc):
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def listing(loc: Location) -> list[tuple[str, int]]:
    """(name, size) of the files directly under a folder or prefix, by name; empty if it is missing."""
    with _mapped(loc):
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return sorted((info.base_name, info.size) for info in found if info.type == pafs.FileType.File)


def tree(loc: Location) -> list[str]:
    """Paths of all files under a folder or prefix, relative to it, sorted; empty if it is missing."""
    with _mapped(loc):
        found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    root = loc.path.rstrip("/") + "/"
    return sorted(info.path.removeprefix(root) for info in found if info.type == pafs.FileType.File)


def upload_dir(local: str, loc: Location) -> None:
    """Copy a local folder's files to a folder or prefix, overwriting files of the same name."""
    ensure_dir(loc)
    with _mapped(loc):
        pafs.copy_files(local, loc.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=loc.fs)


def delete(loc: Location) -> None:
    """Delete one file; one already gone is fine (a resume may redo a delete that a kill cut short)."""
    with _mapped(loc):
        with contextlib.suppress(FileNotFoundError):
            loc.fs.delete_file(loc.path)


def ensure_dir(loc: Location) -> None:
    """Create a folder and its parents; object stores have no folders, so there it does nothing."""
    if loc.fs.type_name not in OBJECT_STORES:
        with _mapped(loc):
            loc.fs.create_dir(loc.path, recursive=True)


class OutputLock:
    """One job at a time per output folder: `OUT/_fescale.lock` holds the running job's owner (host,
    pid, Ray job id, start, command), a token, and a heartbeat in UTC epoch seconds (wall clock:
    the jobs that read it may run on different machines).

    On enter, a lock whose heartbeat is fresher than `stale_after_s` belongs to a live job: this job
    stops with a ConfigError naming it. An older one was left by a killed job and is taken over with
    a warning. Object stores have no create-if-absent, so two jobs starting together both write the
    lock; each waits `settle_s` (longer than its own read-to-write gap) and reads it back, and only
    the job whose token is there goes on, the others stop with the same error, naming the job whose
    record stays in the lock for `settle_s` (the first record a losing job sees may be of a job that
    loses too). A daemon thread refreshes the heartbeat every `heartbeat_s`; exit stops it and
    deletes the lock if still ours.
    """

    def __init__(self, loc: Location, owner: dict, stale_after_s: float = 120, heartbeat_s: float = 20, settle_s: float = 2):
        self.out = loc
        self.file = loc.join(LOCK_NAME)
        self.owner = {**owner, "command": owner.get("command") or shlex.join(sys.argv)}
        self.stale_after_s, self.heartbeat_s, self.settle_s = stale_after_s, heartbeat_s, settle_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        found = self._read()
        if found is not None:
            if _age(found) < self.stale_after_s and not _dead_here(found):
                raise self._busy(self._settled(found))
            log.warning(
                "taking over %s: its job (%s) last refreshed it %.0f s ago (%s)",
                self.file, _describe(found), _age(found),
                "its process on this host is gone" if _dead_here(found) else f"over {self.stale_after_s:.0f} s: it was stopped or killed",
            )
        self._write()
        time.sleep(self.settle_s)
        current = self._read() or {}
        if current.get("token") != self.token:
            raise self._busy(self._settled(current))
        self._thread = threading.Thread(target=self._beat, name="fescale-output-lock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.token:
                delete(self.file)
        except BackendError as e:  # the job itself is over; the lock goes stale and is taken over
            log.warning("could not release %s: %s", self.file, e)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self._read() or {}
                if current.get("token") != self.token:
                    log.error("%s now belongs to another job (%s); this job no longer holds it", self.file, _describe(current))
                    return
                self._write()
            except BackendError as e:  # a passing store fault: the next beat retries
                log.warning("could not refresh %s: %s", self.file, e)

    def _settled(self, record: dict) -> dict:
        """The lock's record once it has not changed for `settle_s`: the job that holds it (the last one
        seen if the lock is gone by then)."""
        while True:
            time.sleep(self.settle_s)
            current = self._read()
            if current is None or current.get("token") == record.get("token"):
                return record
            record = current

    def _read(self) -> dict | None:
        """The lock's record, None if there is no lock, {} if it does not parse (it is then stale)."""
        data = read_bytes(self.file)
        if data is None:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _write(self) -> None:
        record = {"owner": self.owner, "token": self.token, "heartbeat": time.time()}
        write_bytes(self.file, json.dumps(record).encode())

    def _busy(self, record: dict) -> ConfigError:
        age = _age(record)
        beat = f"; last heartbeat {age:.0f} s ago" if math.isfinite(age) else ""
        return ConfigError(
            f"{self.out} is in use by another fescale job ({_describe(record)}{beat}). Wait for it to finish, "
            f"or stop it; if you are sure it is dead, delete {self.file} (a lock not refreshed for "
            f"{self.stale_after_s:.0f} s is taken over by the next job on its own)."
        )


def _dead_here(record: dict) -> bool:
    """The lock's job ran on this host and its process is gone (killed): no need to wait it out."""
    owner = record.get("owner") if isinstance(record.get("owner"), dict) else {}
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _age(record: dict) -> float:
    """Seconds since the record's heartbeat; infinite if it has none (a lock that does not parse)."""
    beat = record.get("heartbeat")
    return time.time() - beat if isinstance(beat, (int, float)) else math.inf


def _describe(record: dict) -> str:
    """A lock's owner for messages, its start time in UTC; the record is whatever the file held."""
    owner = record.get("owner")
    owner = dict(owner) if isinstance(owner, dict) else {}
    with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError, OSError):
        owner["started"] = datetime.fromtimestamp(owner["started"], timezone.utc).isoformat(timespec="seconds")
    return ", ".join(f"{key} {value}" for key, value in owner.items() if value not in (None, "")) or "owner unknown"
