"""engine.storage on a local folder and on a real S3 protocol server on loopback (tests/s3_server.py):
resolving locations (and refusing hostile ones), whole-file I/O, listings, the output lock, the
errors of a broken store, and Ray Data's readers and writers on the same filesystem."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest

from actors.errors import BackendError, ConfigError
from engine.storage import (
    LOCK_NAME,
    Location,
    OutputLock,
    delete,
    ensure_dir,
    exists,
    listing,
    read_bytes,
    resolve,
    storage_error,
    write_bytes,
)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """An output folder that does not exist yet: in a local tmp dir, or a prefix in a fresh bucket."""
    if request.param == "local":
        return resolve(str(tmp_path / "out"))
    return resolve(request.getfixturevalue("s3_bucket") + "/out")


def test_resolve_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = resolve("runs/a/")
    assert relative.fs.type_name == "local" and relative.path == str(tmp_path / "runs/a")
    assert str(relative) == relative.uri == relative.path  # absolute: workers have other working folders
    assert resolve(f"file://{tmp_path}/runs/a").path == relative.path
    assert relative.join("data", "x.jsonl").path == str(tmp_path / "runs/a/data/x.jsonl")


def test_resolve_s3_and_gs(s3_server):
    loc = resolve("s3://bucket/run/")
    assert (loc.fs.type_name, loc.path, str(loc)) == ("s3", "bucket/run", "s3://bucket/run")
    assert str(loc.join("data", "x")) == "s3://bucket/run/data/x" and loc.join("data", "x").path == "bucket/run/data/x"
    assert resolve("S3://bucket/run").uri == "s3://bucket/run"  # schemes are case-insensitive
    assert "secret" not in resolve("s3://key:secret@bucket/run?region=us-east-1").uri
    # pyarrow took the endpoint from AWS_ENDPOINT_URL(_S3); it travels with the pickled filesystem
    _, (options,) = pickle.loads(pickle.dumps(loc)).fs.__reduce__()
    assert options["endpoint_override"] == s3_server.endpoint and options["allow_delayed_open"]
    gs = resolve("gs://bucket/run")
    assert (gs.fs.type_name, gs.path, gs.uri) == ("gcs", "bucket/run", "gs://bucket/run")


@pytest.mark.parametrize(
    "uri",
    ["ftp://x/y", "http://host/x", "s3:/x", "s3:x", "s3://", "s3:///x", "s3://bucket//x", "s3://bucket/a b", "mock:///x",
     "/tmp/a\x00b", "s3://bucket/a\x00b", "", "  ", "\ud800", "runs/\udcff"],
)
def test_resolve_refuses_hostile_values(uri, tmp_path, monkeypatch, s3_server):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        resolve(uri)
    message = str(e.value)
    assert repr(uri) in message and "s3://" in message and "gs://" in message  # names it, lists the schemes
    message.encode("utf-8")  # printable even for a lone surrogate
    assert list(tmp_path.iterdir()) == []  # nothing was created, above all no local folder "s3:"


def test_resolve_hdfs_without_a_cluster_is_a_backend_error():
    with pytest.raises(BackendError, match="hdfs://localhost:1/x"):
        resolve("hdfs://localhost:1/x")


def test_write_read_list_delete(root):
    assert read_bytes(root.join("data", "a.jsonl")) is None and listing(root.join("data")) == [] and not exists(root)
    ensure_dir(root.join("data"))
    write_bytes(root.join("data", "a.jsonl"), b'{"id": 1}\n')
    write_bytes(root.join("data", "b.jsonl"), b"")
    write_bytes(root.join("data", "a.jsonl"), b'{"id": 2}\n')  # replaces, whole
    assert read_bytes(root.join("data", "a.jsonl")) == b'{"id": 2}\n' and read_bytes(root.join("data", "b.jsonl")) == b""
    assert listing(root.join("data")) == [("a.jsonl", 10), ("b.jsonl", 0)]  # no temporary files left
    assert exists(root) and exists(root.join("data", "a.jsonl"))
    delete(root.join("data", "a.jsonl"))
    delete(root.join("data", "a.jsonl"))  # already gone: fine
    assert not exists(root.join("data", "a.jsonl")) and listing(root.join("data")) == [("b.jsonl", 0)]


def test_write_elsewhere_goes_through_a_temporary_name(tmp_path):
    """A filesystem that is neither local nor an object store (HDFS, Azure) renames into place too."""
    loc = Location(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "out", "sub://out")
    write_bytes(loc.join("data", "a.json"), b"{}")
    assert read_bytes(loc.join("data", "a.json")) == b"{}" and listing(loc.join("data")) == [("a.json", 2)]


def _put(loc: Location, data: bytes) -> None:
    """A file written by someone else than fescale, straight through the filesystem."""
    loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
    with loc.fs.open_output_stream(loc.path) as out:
        out.write(data)


def test_foreign_files_are_listed_and_left_alone(root):
    foreign = root.join("data", "notes.txt")
    _put(foreign, b"keep me")
    _put(root.join("data", "deeper", "x.jsonl"), b"{}\n")
    write_bytes(root.join("data", "part-1.jsonl"), b"{}\n")
    delete(root.join("data", "part-1.jsonl"))
    assert listing(root.join("data")) == [("notes.txt", 7)]  # files directly under, not deeper ones
    assert read_bytes(foreign) == b"keep me"
    delete(foreign)
    assert listing(root.join("data")) == [] and read_bytes(root.join("data", "deeper", "x.jsonl")) == b"{}\n"


OWNER = {"host": "node-a", "pid": 4242, "ray_job": "raysubmit_abc", "started": 1_780_000_000.0, "command": "fescale distill --output-dir X"}


def test_lock_refuses_a_second_job_and_names_the_first(root):
    with OutputLock(root, OWNER, settle_s=0):
        record = json.loads(read_bytes(root.join(LOCK_NAME)))
        assert record["owner"] == OWNER and abs(record["heartbeat"] - time.time()) < 60
        with pytest.raises(ConfigError) as e:
            OutputLock(root, {"host": "node-b", "pid": 1}, settle_s=0).__enter__()
        message = str(e.value)
        for part in ("node-a", "pid 4242", "raysubmit_abc", "2026-05-28T", "fescale distill --output-dir X", str(root.join(LOCK_NAME)), "delete", "Wait"):
            assert part in message
    assert not exists(root.join(LOCK_NAME))  # released


def test_lock_takes_over_a_stale_lock(root, caplog):
    dead = {"owner": {"host": "dead-node", "pid": 7}, "token": "old", "heartbeat": time.time() - 600}
    write_bytes(root.join(LOCK_NAME), json.dumps(dead).encode())
    with caplog.at_level(logging.WARNING, logger="fescale"), OutputLock(root, OWNER, stale_after_s=120, settle_s=0) as lock:
        assert json.loads(read_bytes(root.join(LOCK_NAME)))["token"] == lock.token
    assert "taking over" in caplog.text and "dead-node" in caplog.text
    write_bytes(root.join(LOCK_NAME), b"not json")  # unreadable: no live job wrote it
    with OutputLock(root, OWNER, settle_s=0):
        pass


def test_lock_of_a_killed_job_on_this_host_is_taken_over_at_once(root, caplog):
    """A fresh heartbeat, but its process on this host is gone (SIGKILL): no need to wait it out."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {"owner": {"host": socket.gethostname(), "pid": gone.pid}, "token": "old", "heartbeat": time.time()}
    write_bytes(root.join(LOCK_NAME), json.dumps(dead).encode())
    with caplog.at_level(logging.WARNING, logger="fescale"), OutputLock(root, OWNER, settle_s=0):
        pass
    assert "its process on this host is gone" in caplog.text
    alive = {"owner": {"host": socket.gethostname(), "pid": os.getpid()}, "token": "live", "heartbeat": time.time()}
    write_bytes(root.join(LOCK_NAME), json.dumps(alive).encode())
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        OutputLock(root, OWNER, settle_s=0).__enter__()


def test_lock_heartbeat_and_deleting_a_dead_jobs_lock(root):
    first = OutputLock(root, {"host": "node-a"}, heartbeat_s=0.05, settle_s=0).__enter__()  # never exits: a killed job
    beat = json.loads(read_bytes(root.join(LOCK_NAME)))["heartbeat"]
    time.sleep(0.5)
    assert json.loads(read_bytes(root.join(LOCK_NAME)))["heartbeat"] > beat
    first._stop.set()  # the job dies: no more heartbeats, the lock stays
    first._thread.join()
    with pytest.raises(ConfigError, match="node-a"):
        OutputLock(root, {"host": "node-b"}, settle_s=0).__enter__()
    delete(root.join(LOCK_NAME))  # what the message tells the user to do once sure it is dead
    with OutputLock(root, {"host": "node-b"}, settle_s=0) as second:
        first.__exit__(None, None, None)  # a late exit of the old job leaves the new job's lock alone
        assert json.loads(read_bytes(root.join(LOCK_NAME)))["token"] == second.token


def test_lock_two_jobs_starting_together_one_wins(root):
    barrier = threading.Barrier(3)
    won, lost = [], []

    def start(host: str) -> None:
        lock = OutputLock(root, {"host": host}, settle_s=1.0)
        barrier.wait()
        try:
            won.append(lock.__enter__())
        except ConfigError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=start, args=(f"node-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 2
    winner = won[0].owner["host"]
    assert all(winner in message for message in lost)
    won[0].__exit__(None, None, None)
    assert not exists(root.join(LOCK_NAME))


def test_a_job_that_finds_a_lock_still_settling_names_the_job_that_keeps_it(root):
    """Jobs starting together: A reads B's lock, then C (which read before B wrote) writes over it and
    keeps it. A's error names C, the job that runs, not B, which loses too. The interleaving is made
    exact by doing C's write right after A's first read."""
    OutputLock(root, {"host": "node-b"})._write()
    c = OutputLock(root, {"host": "node-c"})

    class A(OutputLock):
        reads = 0

        def _read(self):
            record = super()._read()
            self.reads += 1
            if self.reads == 1:
                c._write()
            return record

    with pytest.raises(ConfigError, match="node-c"):
        A(root, {"host": "node-a"}, settle_s=0.2).__enter__()
    assert json.loads(read_bytes(root.join(LOCK_NAME)))["token"] == c.token  # A wrote nothing


def test_missing_bucket_is_a_backend_error_naming_the_uri(s3_server):
    out = resolve("s3://no-such-bucket-fescale/run")
    with pytest.raises(BackendError, match="s3://no-such-bucket-fescale/run/data/x.jsonl: the bucket does not exist"):
        write_bytes(out.join("data", "x.jsonl"), b"{}")
    with pytest.raises(BackendError, match="s3://no-such-bucket-fescale/run/_fescale.lock: the bucket does not exist"):
        OutputLock(out, OWNER, settle_s=0).__enter__()


def test_unreachable_endpoint_is_a_backend_error(s3_server, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    with pytest.raises(BackendError, match="s3://bucket/run/x: the storage endpoint cannot be reached"):
        read_bytes(resolve("s3://bucket/run").join("x"))


def test_local_failures_are_backend_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(BackendError, match=re.escape(f"storage {tmp_path}/file/out/x: ")):
        write_bytes(resolve(str(tmp_path / "file" / "out")).join("x"), b"")


def test_access_denied_reads_as_one_line():
    error = OSError("When reading 'x' in bucket 'b': AWS Error ACCESS_DENIED during GetObject operation: Access Denied (Request ID: 1)")
    assert str(storage_error("s3://b/x", error)) == "storage s3://b/x: access denied (check the credentials and the bucket's permissions)"
    odd = OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate. (Request ID: 2)\nmore")
    assert str(storage_error("s3://b/x", odd)) == "storage s3://b/x: AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."


def test_ray_data_reads_and_writes_the_s3_server(ray_session, s3_bucket):
    """Ray Data's readers and writers take the same pyarrow filesystem (`filesystem=loc.fs`), and a
    Location pickled into a Ray task writes from the worker: the distill job's shard writers."""
    ray = ray_session
    out = resolve(s3_bucket + "/ray")
    rows = ray.data.from_items([{"id": i, "text": f"row {i}"} for i in range(20)], override_num_blocks=2)
    rows.write_parquet(out.join("table").path, filesystem=out.fs)
    assert len(listing(out.join("table"))) == 2
    back = ray.data.read_parquet(out.join("table").path, filesystem=out.fs)
    assert sorted(r["id"] for r in back.take_all()) == list(range(20))
    ray.get(ray.remote(write_bytes).remote(out.join("in", "a.jsonl"), b'{"id": "a"}\n'))
    files = ray.data.read_binary_files([out.join("in", "a.jsonl").path], filesystem=out.fs, include_paths=True).take_all()
    assert files == [{"bytes": b'{"id": "a"}\n', "path": out.join("in", "a.jsonl").path}]
