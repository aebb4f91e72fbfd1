"""Liveness without pids: held tokens, leases across pid namespaces, owners of temp files.

Every holder here is a real process; the pid-namespace tests run it with
``unshare --pid --fork --mount-proc`` (root), where it is pid 1 as a Triton
in a container is, and is killed with SIGKILL from outside.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.cache import Cache, LeaseSpec
from cacheagent.local.liveness import OWNERS, hold_token, is_held, remove_if_unheld
from cacheagent.local.store import Store

REPO = Path(__file__).resolve().parents[2]


def make_model(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


class Holder:
    """A real process running ``script``; it prints one JSON line when ready, then sleeps."""

    def __init__(self, script: str, *args: str, namespace: bool = False) -> None:
        command = [sys.executable, "-c", script, *args]
        if namespace:
            command = ["unshare", "--pid", "--fork", "--mount-proc", *command]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"the holder exited early with {self.proc.returncode}")
        self.ready = json.loads(line)
        # With --fork the holder is unshare's child; signals must reach the holder itself.
        self.pid = _only_child(self.proc.pid) if namespace else self.proc.pid

    def kill9(self) -> None:
        """SIGKILL the holder and reap everything."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Kill whatever still runs (the holder first: killing unshare would not stop it)."""
        for pid in (self.pid, self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


def _only_child(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise AssertionError(f"unshare (pid {pid}) started no child")


@pytest.fixture
def pid_namespaces() -> None:
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot create pid namespaces here (needs root): {probe.stderr.strip()}")


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.stop()


# ---- the token itself -------------------------------------------------------------


def test_token_is_held_while_open_and_free_once_closed(tmp_path):
    token = hold_token(tmp_path / "t.lock", shared=True, content=b"x")
    assert is_held(token.path)
    assert not remove_if_unheld(token.path) and token.path.exists()
    token.close()
    assert not is_held(token.path)
    assert remove_if_unheld(token.path) and not token.path.exists()
    assert not is_held(tmp_path / "missing.lock")


def test_token_is_never_followed_through_a_symlink(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    (tmp_path / "t.lock").symlink_to(target)
    assert not is_held(tmp_path / "t.lock")
    assert remove_if_unheld(tmp_path / "t.lock")
    assert target.read_bytes() == b"keep" and not os.path.lexists(tmp_path / "t.lock")


def test_token_of_a_killed_process_is_dead_at_once(tmp_path, holders):
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from cacheagent.local.liveness import hold_token\n"
        "token = hold_token(Path(sys.argv[1]), shared=True)\n"
        "print(json.dumps({'path': str(token.path)}), flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = Holder(script, str(tmp_path / "t.lock"))
    holders.append(holder)
    assert is_held(tmp_path / "t.lock")
    holder.kill9()
    assert not is_held(tmp_path / "t.lock")


def test_a_forked_child_gets_an_owner_of_its_own(tmp_path):
    store = Store(tmp_path / "c")
    mine = OWNERS.name_in(store.owners_dir)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read)
        os.write(write, OWNERS.name_in(store.owners_dir).encode())
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(child, 0)
    assert theirs and theirs != mine
    assert OWNERS.is_alive(store.owners_dir, mine)
    assert not OWNERS.is_alive(store.owners_dir, theirs)


# ---- leases ------------------------------------------------------------------------

LEASE_SCRIPT = (
    "import json, os, sys, time\n"
    "from cacheagent.cache import Cache, LeaseSpec\n"
    "cache = Cache(sys.argv[1])\n"
    "snap = cache.fetch(sys.argv[2], lease=LeaseSpec('ns-lease', os.getpid(), 'm'))\n"
    "print(json.dumps({'pid': os.getpid(), 'key': snap.key}), flush=True)\n"
    "time.sleep(600)\n"
)


def test_lease_of_pid_1_in_a_pid_namespace_is_live_from_outside_until_killed(
    tmp_path, pid_namespaces, holders
):
    model = make_model(tmp_path / "m", {"1/w.bin": os.urandom(5000), "config.pbtxt": b"c"})
    other = make_model(tmp_path / "o", {"1/w.bin": os.urandom(3000)})
    root = tmp_path / "cache"
    holder = Holder(LEASE_SCRIPT, str(root), str(model), namespace=True)
    holders.append(holder)
    assert holder.ready["pid"] == 1, "the holder should be pid 1 in its namespace"
    key = holder.ready["key"]

    with Cache(root) as cache:
        spare = cache.fetch(str(other))
        (lease,) = cache.leases()
        assert (lease.lease_id, lease.key, lease.pid, lease.is_live()) == ("ns-lease", key, 1, True)
        assert cache.purge() > 0  # the unleased one goes...
        assert not spare.path.exists()
        assert cache.store.has_snapshot(key)  # ...the one pid 1 of the namespace uses stays
        report = cache.evict(0)
        assert report.evicted == [] and report.kept_leased == 1
        assert not cache.remove(key)
        assert (cache.store.snapshot_path(key) / "1/w.bin").read_bytes() == (
            model / "1/w.bin"
        ).read_bytes()

        holder.kill9()
        assert cache.index.live_leased_keys() == set()  # dead at once, no grace period
        assert cache.purge() > 0
        assert not cache.store.has_snapshot(key) and cache.leases() == []


def test_lease_survives_an_index_rebuild(tmp_path, holders):
    model = make_model(tmp_path / "m", {"1/w.bin": os.urandom(4000)})
    root = tmp_path / "cache"
    holder = Holder(LEASE_SCRIPT, str(root), str(model))
    holders.append(holder)
    db = root / "index" / "cache.db"
    db.write_bytes(os.urandom(db.stat().st_size))
    with Cache(root) as cache:
        assert cache.fetch(str(model)).hit  # rebuilt from the records
        assert cache.index.live_leased_keys() == {holder.ready["key"]}
        assert cache.purge() == 0 and cache.store.has_snapshot(holder.ready["key"])


def test_release_ends_the_lease_for_every_holder(tmp_path, holders):
    model = make_model(tmp_path / "m", {"1/w.bin": os.urandom(4000)})
    root = tmp_path / "cache"
    holder = Holder(LEASE_SCRIPT, str(root), str(model))
    holders.append(holder)
    with Cache(root) as cache:
        # Another process (here: us, as the new worker after a crash) releases by id.
        assert cache.release("ns-lease").key == holder.ready["key"]
        assert cache.leases() == [] and cache.index.live_leased_keys() == set()
        cache.evict(0)
        assert not cache.store.has_snapshot(holder.ready["key"])


def test_close_ends_the_leases_a_cache_took(tmp_path):
    model = make_model(tmp_path / "m", {"1/w.bin": b"w" * 100})
    cache = Cache(tmp_path / "cache")
    cache.fetch(str(model), lease=LeaseSpec("mine", os.getpid()))
    token = cache.lease_token("mine")
    assert token is not None and is_held(token)
    cache.close()
    assert not is_held(token)
    with Cache(tmp_path / "cache") as again:
        assert again.index.live_leased_keys() == set()


# ---- temp files named by owner, not pid -----------------------------------------------

TEMP_SCRIPT = (
    "import json, sys, time\n"
    "from pathlib import Path\n"
    "from cacheagent.local.store import Store\n"
    "store = Store(Path(sys.argv[1]))\n"
    "writer = store.new_blob(10)\n"
    "writer.write(0, b'part')\n"
    "print(json.dumps({'temp': str(writer.path)}), flush=True)\n"
    "time.sleep(600)\n"
)


def test_temp_blob_of_a_live_writer_in_a_pid_namespace_is_kept_then_cleaned_at_its_death(
    tmp_path, pid_namespaces, holders
):
    root = tmp_path / "cache"
    holder = Holder(TEMP_SCRIPT, str(root), namespace=True)
    holders.append(holder)
    temp = Path(holder.ready["temp"])
    assert temp.parent == root / "tmp" and temp.exists()
    with Cache(root) as cache:  # opening a cache cleans temp files: not a live writer's
        assert temp.exists()
        assert cache.store.clean_tmp() == 0 and temp.exists()
        holder.kill9()
        assert cache.store.clean_tmp() == 1 and not temp.exists()
        assert os.listdir(root / "owners") == []  # the dead owner's token went too
