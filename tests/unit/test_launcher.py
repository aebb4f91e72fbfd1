"""``cacheagent run`` without Triton: argument rewriting, the start listing, stub upkeep,
and the launcher as a process (signals, exit status) around plain shell commands."""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cacheagent.errors import RemoteNotFoundError, StorageUnavailableError
from cacheagent.remote.location import Location, parse_location
from cacheagent.remote.manifest import build_manifest
from cacheagent.triton import tritonargs
from cacheagent.triton.config import CONFIG_FILE
from cacheagent.triton.launcher import (
    Launcher,
    RunOptions,
    StartDir,
    UsageError,
    cloud_repositories,
    parse_run_args,
    record_policy,
    remove_leftover_starts,
)
from cacheagent.triton.startlisting import (
    PENDING,
    START_ENV,
    ModelRecord,
    claimed_at_start,
    listed_at_start,
    portable_info,
    record_name,
)
from cacheagent.triton.stubmark import recorded_digest
from cacheagent.triton.stubsync import CONTENT_MARK, split_by_model, sync_stub

LAUNCHER = [sys.executable, "-m", "cacheagent.triton.launcher"]
REPO = "s3://127.0.0.1:9/bucket/models"
S3_ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


# ---- Triton's arguments ----


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model-repository=s3://b/m"], ["--model-repository=/stub"]),
        (["--model-repository", "s3://b/m"], ["--model-repository", "/stub"]),
        (["--model-store=s3://b/m"], ["--model-store=/stub"]),
        (["--model-store", "s3://b/m"], ["--model-store", "/stub"]),
        (["--model-repository=/local/repo"], ["--model-repository=/local/repo"]),
    ],
)
def test_every_form_of_model_repository_is_rewritten(args: list[str], expected: list[str]) -> None:
    assert tritonargs.rewrite(args, {"s3://b/m": "/stub"}) == expected


def test_unknown_arguments_stay_untouched_and_in_place() -> None:
    args = [
        "--log-verbose=1",
        "--model-repository",
        "s3://b/m",
        "--http-port",
        "8000",
        "--model-repository=/local",
        "--weird-flag",
        "s3://b/m",  # the value of another flag is not a repository
        "--model-repository=gs://other/x",
    ]
    out = tritonargs.rewrite(args, {"s3://b/m": "/stub1", "gs://other/x": "/stub2"})
    assert out == [
        "--log-verbose=1",
        "--model-repository",
        "/stub1",
        "--http-port",
        "8000",
        "--model-repository=/local",
        "--weird-flag",
        "s3://b/m",
        "--model-repository=/stub2",
    ]


def test_repoagent_directory_is_added_only_when_absent() -> None:
    added = tritonargs.rewrite(["--model-repository=/r", "--log-info=true"], {}, "/agents")
    assert added == ["--model-repository=/r", "--log-info=true", "--repoagent-directory=/agents"]
    for named in (["--repoagent-directory=/mine"], ["--repoagent-directory", "/mine"]):
        assert tritonargs.rewrite(named, {}, "/agents") == named
    # Before a "--" that ends Triton's options, where it still counts as an option.
    assert tritonargs.rewrite(["-x", "--", "rest"], {}, "/a") == [
        "-x",
        "--repoagent-directory=/a",
        "--",
        "rest",
    ]


def test_mode_poll_interval_and_load_models_follow_tritons_rules() -> None:
    assert tritonargs.control_mode([]) == "none"
    args = ["--model-control-mode=explicit", "--model-control-mode", "POLL"]
    assert tritonargs.control_mode(args) == "poll"  # the last one wins, as in getopt
    assert tritonargs.poll_seconds([]) == 15
    assert tritonargs.poll_seconds(["--repository-poll-secs", "3"]) == 3
    assert tritonargs.poll_seconds(["--repository-poll-secs=x"]) == 15  # Triton refuses it
    assert tritonargs.load_models(["--load-model=a", "--load-model", "b"]) == ["a", "b"]
    assert tritonargs.repositories(["--model-repository"]) == []  # no value: Triton's error


def test_only_cloud_locations_get_a_stub(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = [
        f"--model-repository={REPO}",
        "--model-repository=gs://bucket/models",
        "--model-repository=as://account/container/models",
        "--model-repository=/local/models",
        "--model-repository=relative/models",
        f"--model-repository={REPO}",  # twice: one stub
        "--model-repository=s3://Bad_Bucket/x",
    ]
    repos = cloud_repositories(args, tmp_path, {}, S3_ENV)
    assert [r.text for r in repos] == [REPO, "gs://bucket/models", "as://account/container/models"]
    assert len({r.stub_dir for r in repos}) == 3
    assert all(r.stub_dir.parent == tmp_path / "stubs" for r in repos)
    assert "s3://Bad_Bucket/x" in caplog.text and "unchanged" in caplog.text
    # Other launcher parameters, another stub: two launchers never rewrite each other's.
    other = cloud_repositories(args[:1], tmp_path, {"verify": "hash"}, S3_ENV)
    assert other[0].stub_dir != repos[0].stub_dir


def test_record_policy_per_control_mode() -> None:
    none = record_policy([])
    assert (none.models, none.fresh_for, none.once) == (None, None, True)
    poll = record_policy(["--model-control-mode=poll", "--repository-poll-secs=4"])
    assert (poll.models, poll.fresh_for, poll.once) == (None, 4.0, False)
    explicit = record_policy(["--model-control-mode=explicit", "--load-model=a"])
    assert (explicit.models, explicit.once) == (frozenset({"a"}), True)
    assert record_policy(["--model-control-mode=explicit", "--load-model=*"]).models is None


# ---- the launcher's own arguments ----


def test_run_arguments(tmp_path: Path) -> None:
    options = parse_run_args(
        [
            *("--cache-dir", str(tmp_path), "--max-size", "2GiB", "--param", "verify=hash"),
            *("--", "tritonserver", "--model-repository=s3://b/m"),
        ],
        env={},
    )
    assert options.cache_dir == tmp_path
    assert options.max_size == "2GiB"
    assert options.params == {"verify": "hash"}
    assert options.command == ["tritonserver", "--model-repository=s3://b/m"]
    default = parse_run_args(["--", "tritonserver"], env={"CACHEAGENT_CACHE_DIR": str(tmp_path)})
    assert default.cache_dir == tmp_path


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["tritonserver"], "after '--'"),
        (["--cache-dir", "/c", "--"], "no command"),
        (["--max-size", "lots", "--", "t"], "--max-size"),
        (["--cache-dir", "relative", "--", "t"], "absolute"),
        (["--param", "verify=maybe", "--", "t"], "verify"),
        (["--param", "nokey", "--", "t"], "KEY=VALUE"),
        (["--param", "colour=blue", "--", "t"], "unknown cacheagent parameter 'colour'"),
        (["--param", "source=s3://b/m", "--", "t"], "source"),
    ],
)
def test_bad_run_arguments_say_what_to_write(argv: list[str], words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        parse_run_args(argv, env={})


# ---- the start listing ----


class ContentSettings:
    """Shaped like azure-storage-blob's ContentSettings (what adlfs returns)."""

    def __init__(self, content_md5: bytearray | None) -> None:
        self.content_md5 = content_md5


SAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "s3fs": {
        "b/m/add/1/w.bin": {
            "name": "b/m/add/1/w.bin",
            "size": 5,
            "ETag": '"0123456789abcdef0123456789abcdef"',
            "LastModified": datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc),
            "type": "file",
            "StorageClass": "STANDARD",
        },
        "b/m/add/1/big.bin": {"name": "b/m/add/1/big.bin", "size": 9, "ETag": '"ab-3"'},
        "b/m/add/2/": {"name": "b/m/add/2/", "size": 0, "type": "directory"},
    },
    "gcsfs": {
        "b/m/add/1/w.bin": {
            "name": "b/m/add/1/w.bin",
            "size": 5,
            "generation": "1714",
            "md5Hash": "ASNFZ4mrze8BI0VniavN7w==",
            "metadata": {"k": "v"},
            "type": "file",
        },
        "b/m/add/1/x.bin": {"name": "b/m/add/1/x.bin", "size": 2, "generation": "99"},
    },
    "adlfs": {
        "c/m/add/1/w.bin": {
            "name": "c/m/add/1/w.bin",
            "size": 5,
            "etag": "0x8DB",
            "content_settings": ContentSettings(bytearray(range(16))),
            "last_modified": datetime.datetime(2024, 5, 1),
            "type": "file",
        },
        "c/m/add/1/nomd5": {
            "name": "c/m/add/1/nomd5",
            "size": 3,
            "etag": "0x8DC",
            "content_settings": ContentSettings(None),
        },
        "c/m/add/2": {"name": "c/m/add/2", "size": 0, "type": "directory", "metadata": None},
    },
}


@pytest.mark.parametrize("sdk", sorted(SAMPLES))
def test_portable_entries_give_the_same_manifest(sdk: str) -> None:
    raw = SAMPLES[sdk]
    root = next(iter(raw)).split("/add/")[0] + "/add"
    portable = json.loads(json.dumps({k: portable_info(v) for k, v in raw.items()}))
    expected = build_manifest("s3://x/add", root, raw)
    again = build_manifest("s3://x/add", root, portable)
    assert again == expected and again.key == expected.key


def write_record(start_dir: Path, location: Location, **changes: Any) -> Path:
    fields: dict[str, Any] = {
        "start": start_dir.name,
        "source": location.url,
        "entries": {
            f"{location.root}/config.pbtxt": {"name": "x", "size": 3, "ETag": '"' + "a" * 32 + '"'},
            f"{location.root}/1/model.py": {"name": "y", "size": 4, "ETag": '"' + "b" * 32 + '"'},
            f"{location.root}/2/model.py": {"name": "z", "size": 4, "ETag": '"' + "c" * 32 + '"'},
        },
        "listed_at": time.time(),
        "fresh_for": None,
        "once": True,
    }
    fields.update(changes)
    start_dir.mkdir(parents=True, exist_ok=True)
    path = start_dir / record_name(location.url)
    path.write_text(ModelRecord(**fields).to_json())
    return path


def latest_only(paths: Any) -> set[str]:
    return {p for p in paths if not p.startswith("1/")}


def test_a_start_record_validates_one_load_with_the_agents_own_selection(tmp_path: Path) -> None:
    location = parse_location("s3://bucket/models/add", S3_ENV)
    start = tmp_path / "starts" / "123-abc"
    write_record(start, location)
    env = {START_ENV: str(start)}
    # A prefetch of the model during start-up leaves the record for its LOAD.
    assert listed_at_start(location, None, env, claim=False) is not None
    listed = listed_at_start(location, latest_only, env)
    assert listed is not None
    manifest = listed()
    assert [f.path for f in manifest.files] == ["2/model.py", "config.pbtxt"]
    assert manifest.source == location.url
    # Once: the start-up LOAD took it; any later load lists storage itself, and a
    # prefetch of it now knows its LOAD came first.
    assert listed_at_start(location, None, env) is None
    assert listed_at_start(location, None, env, claim=False) is None
    assert claimed_at_start(location, env)
    assert [name.endswith(".claimed") for name in os.listdir(start)] == [True]


def test_a_load_waits_for_a_pending_listing_and_stops_waiting_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Triton started before the launcher's listing: the LOAD waits for its record."""
    location = parse_location("s3://bucket/models/add", S3_ENV)
    start = tmp_path / "starts" / "123-abc"
    start.mkdir(parents=True)
    env = {START_ENV: str(start)}
    (start / PENDING).touch()

    def list_then_clear() -> None:
        time.sleep(1.3)
        write_record(start, location)
        (start / PENDING).unlink()

    writer = threading.Thread(target=list_then_clear)
    writer.start()
    with caplog.at_level(logging.INFO, logger="cacheagent"):
        listed = listed_at_start(location, None, env)
    writer.join()
    assert listed is not None and listed().source == location.url
    assert "waiting for cacheagent run's listing" in caplog.text
    # A model the listing did not find: the marker gone, no record, no wait.
    other = parse_location("s3://bucket/models/gone", S3_ENV)
    began = time.monotonic()
    assert listed_at_start(other, None, env) is None
    assert time.monotonic() - began < 1.0


def test_a_start_record_never_serves_another_start_or_source_or_after_its_time(
    tmp_path: Path,
) -> None:
    location = parse_location("s3://bucket/models/add", S3_ENV)
    start = tmp_path / "starts" / "1-new"
    assert listed_at_start(location, None, {}) is None  # not started by cacheagent run
    write_record(start, location, start="1-old")  # a stale leftover's id
    assert listed_at_start(location, None, {START_ENV: str(start)}) is None
    write_record(start, location, source="s3://bucket/models/other")
    assert listed_at_start(location, None, {START_ENV: str(start)}) is None
    write_record(start, location, fresh_for=5.0, once=False, listed_at=time.time() - 6)
    assert listed_at_start(location, None, {START_ENV: str(start)}) is None  # poll: too old
    write_record(start, location, fresh_for=5.0, once=False, listed_at=time.time() + 60)
    assert listed_at_start(location, None, {START_ENV: str(start)}) is None  # not our clock
    write_record(start, location, fresh_for=5.0, once=False)
    for _ in range(2):  # poll mode: valid for every load within the interval
        listed = listed_at_start(location, None, {START_ENV: str(start)})
        assert listed is not None and len(listed().files) == 3
    (start / record_name(location.url)).write_text("{not json")
    assert listed_at_start(location, None, {START_ENV: str(start)}) is None


def test_a_start_record_with_nothing_selected_fails_like_a_listing(tmp_path: Path) -> None:
    location = parse_location("s3://bucket/models/add", S3_ENV)
    start = tmp_path / "starts" / "1-a"
    write_record(start, location)
    listed = listed_at_start(location, lambda paths: set(), {START_ENV: str(start)})
    assert listed is not None
    with pytest.raises(RemoteNotFoundError, match="version_policy"):
        listed()


def test_leftover_start_dirs_go_and_live_ones_stay(tmp_path: Path) -> None:
    root = tmp_path / "starts"
    (root / "999-dead").mkdir(parents=True)
    (root / "999-dead.live").write_text("")  # nobody holds it
    live = StartDir(root)
    remove_leftover_starts(root)
    assert sorted(os.listdir(root)) == sorted([live.id, f"{live.id}.live"])
    live.close()
    assert os.listdir(root) == []


# ---- the stub, from one listing ----


def s3_info(name: str, content: bytes) -> dict[str, Any]:
    import hashlib

    return {"name": name, "size": len(content), "ETag": f'"{hashlib.md5(content).hexdigest()}"'}


CONFIG = b"""name: "%s"
backend: "python"
model_repository_agents {
  agents [
    { name: "checksum", parameters [ { key: "MD5:1/model.py", value: "abc" } ] },
    { name: "cacheagent", parameters [ { key: "verify", value: "hash" } ] },
    { name: "other", parameters [ { key: "k", value: "v" } ] }
  ]
}
"""


class Bucket:
    """A repository as a listing: files by path below bucket/models, and who read what."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.reads: list[str] = []
        self.repo = parse_location("s3://bucket/models", S3_ENV)

    def add_model(self, name: str, weights: bytes = b"w1", config: bytes | None = None) -> None:
        self.files[f"{name}/config.pbtxt"] = config or CONFIG % name.encode()
        self.files[f"{name}/1/model.py"] = b"# model"
        self.files[f"{name}/1/weights.bin"] = weights

    def listing(self) -> Any:
        found = {
            f"bucket/models/{p}": s3_info(f"bucket/models/{p}", data)
            for p, data in self.files.items()
        }
        return split_by_model(self.repo, found, time.time())

    def read(self, location: Location, relpath: str) -> bytes:
        self.reads.append(f"{location.url}/{relpath}")
        return self.files[f"{location.url.rsplit('/', 1)[1]}/{relpath}"]


def test_stub_sync_reads_a_config_only_when_its_fingerprint_changed(tmp_path: Path) -> None:
    bucket, out = Bucket(), tmp_path / "stub"
    bucket.add_model("add")
    bucket.add_model("mul")
    bucket.files["loose.txt"] = b"a file beside the models"
    bucket.files["noconfig/1/model.onnx"] = b"x"
    params = {"cache_dir": "/var/cache/ca"}

    listing = bucket.listing()
    assert sorted(listing.models) == ["add", "mul"] and listing.without_config == ["noconfig"]
    report = sync_stub(listing, out, params, bucket.read)
    assert sorted(report.written) == ["add", "mul"]
    assert sorted(bucket.reads) == [f"{REPO_URL}/add/config.pbtxt", f"{REPO_URL}/mul/config.pbtxt"]
    assert sorted(os.listdir(out)) == ["add", "mul"]
    mtime = (out / "add" / CONFIG_FILE).stat().st_mtime_ns

    bucket.reads.clear()
    again = sync_stub(bucket.listing(), out, params, bucket.read)
    assert sorted(again.unchanged) == ["add", "mul"] and not again.changed
    assert bucket.reads == []  # a restart reads no config
    assert (out / "add" / CONFIG_FILE).stat().st_mtime_ns == mtime  # nor rewrites one

    # Weights only: the content mark changes (so poll mode reloads), the config stays
    # as it is (so Triton's own config rules still apply), and no config is read.
    config_before = (out / "add" / CONFIG_FILE).read_text()
    mark_before = (out / "add" / CONTENT_MARK).read_text()
    bucket.files["add/1/weights.bin"] = b"w2"
    weights = sync_stub(bucket.listing(), out, params, bucket.read)
    assert weights.updated == ["add"] and bucket.reads == []
    assert (out / "add" / CONTENT_MARK).read_text() != mark_before
    assert (out / "add" / CONFIG_FILE).read_text() == config_before
    assert (out / "add" / CONFIG_FILE).stat().st_mtime_ns == mtime

    # The config itself: read again, once.
    bucket.files["mul/config.pbtxt"] = CONFIG % b"mul" + b"max_batch_size: 4\n"
    changed = sync_stub(bucket.listing(), out, params, bucket.read)
    assert changed.written == ["mul"] and bucket.reads == [f"{REPO_URL}/mul/config.pbtxt"]
    assert "max_batch_size: 4" in (out / "mul" / CONFIG_FILE).read_text()

    # Other launcher parameters: every config is rebuilt.
    bucket.reads.clear()
    rebuilt = sync_stub(bucket.listing(), out, {"cache_dir": "/elsewhere"}, bucket.read)
    assert sorted(rebuilt.written) == ["add", "mul"] and len(bucket.reads) == 2


REPO_URL = "s3://bucket/models"


def test_stub_follows_models_added_and_removed(tmp_path: Path) -> None:
    bucket, out = Bucket(), tmp_path / "stub"
    bucket.add_model("add")
    sync_stub(bucket.listing(), out, {}, bucket.read)
    bucket.add_model("mul")
    added = sync_stub(bucket.listing(), out, {}, bucket.read)
    assert added.written == ["mul"] and sorted(os.listdir(out)) == ["add", "mul"]
    for path in list(bucket.files):
        if path.startswith("add/"):
            del bucket.files[path]
    removed = sync_stub(bucket.listing(), out, {}, bucket.read)
    assert removed.removed == ["add"] and os.listdir(out) == ["mul"]
    # No work directory is left beside the stub.
    assert sorted(os.listdir(tmp_path)) == ["stub"]


def test_stub_keeps_every_other_agent_in_order_after_cacheagent(tmp_path: Path) -> None:
    bucket, out = Bucket(), tmp_path / "stub"
    bucket.add_model("add")
    sync_stub(bucket.listing(), out, {"cache_dir": "/c", "verify": "size"}, bucket.read)
    text = (out / "add" / CONFIG_FILE).read_text()
    names = [text.index(f'name: "{n}"') for n in ("cacheagent", "checksum", "other")]
    assert names == sorted(names), text
    from cacheagent.triton.config import agent_parameters, parse_config

    config = parse_config(text)
    assert [a.name for a in config.model_repository_agents.agents] == [
        "cacheagent",
        "checksum",
        "other",
    ]
    # The model's own cacheagent parameters win over the launcher's.
    assert agent_parameters(config) == {
        "cache_dir": "/c",
        "verify": "hash",
        "source": f"{REPO_URL}/add",
    }
    assert dict(config.model_repository_agents.agents[1].parameters) == {"MD5:1/model.py": "abc"}
    assert recorded_digest(text) is not None  # the agent's stale-config check still works


def test_a_broken_config_keeps_its_last_stub(tmp_path: Path) -> None:
    bucket, out = Bucket(), tmp_path / "stub"
    bucket.add_model("add")
    sync_stub(bucket.listing(), out, {}, bucket.read)
    good = (out / "add" / CONFIG_FILE).read_text()
    bucket.files["add/config.pbtxt"] = b"name: {{{"
    report = sync_stub(bucket.listing(), out, {}, bucket.read)
    assert list(report.kept) == ["add"] and (out / "add" / CONFIG_FILE).read_text() == good
    bucket.add_model("new", config=b"backend: [")
    report = sync_stub(bucket.listing(), out, {}, bucket.read)
    assert list(report.skipped) == ["new"] and not (out / "new").exists()


def test_storage_down_at_a_first_start_with_no_stub_fails_before_triton(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cacheagent.triton.launcher as launcher

    def down(location: Location) -> Any:
        raise StorageUnavailableError(f"list failed: storage for {location.url} is unreachable")

    monkeypatch.setattr(launcher, "list_repository", down)
    options = RunOptions(tmp_path / "c", ["/bin/true", f"--model-repository={REPO}"])
    with pytest.raises(Exception, match="no stub of it exists yet"):
        Launcher(options, env=S3_ENV).run()
    assert os.listdir(tmp_path / "c" / "starts") == []  # this start's directory is gone


def test_a_failure_after_the_command_started_is_logged_and_the_command_still_supervised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The stub exists, so the command starts before the listing; the stub update then
    fails (a full disk, injected: it cannot be timed to that write for real). The
    launcher must still wait for the command and return its status, not say that it
    was never started and leave it running unsupervised."""
    import cacheagent.triton.launcher as launcher
    from cacheagent.errors import CacheFullError

    bucket = Bucket()
    bucket.add_model("add")

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise CacheFullError("no space left on device writing the stub")

    monkeypatch.setattr(launcher, "list_repository", lambda location: bucket.listing())
    monkeypatch.setattr(launcher, "sync_stub", disk_full)
    cache = tmp_path / "c"
    done = tmp_path / "done"
    options = RunOptions(
        cache, ["/bin/sh", "-c", f"sleep 0.3; touch {done}; exit 7", f"--model-repository={REPO}"]
    )
    launcher_ = Launcher(options, env=S3_ENV)
    launcher_.repos[0].stub_dir.mkdir(parents=True)  # from an earlier start
    with caplog.at_level(logging.ERROR, logger="cacheagent"):
        assert launcher_.run() == 7
    assert done.exists()  # waited for to its end
    assert "updating the stubs failed after Triton started" in caplog.text
    assert os.listdir(cache / "starts") == []


def test_a_signal_before_the_command_starts_stops_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import cacheagent.triton.launcher as launcher

    listing, release = threading.Event(), threading.Event()

    def hung(location: Location) -> Any:
        listing.set()
        release.wait(30)
        raise StorageUnavailableError("the test let the listing go")

    def terminate_while_listing() -> None:
        if listing.wait(30):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(launcher, "list_repository", hung)
    ran = tmp_path / "ran"
    options = RunOptions(
        tmp_path / "c", ["/bin/sh", "-c", f"touch {ran}", f"--model-repository={REPO}"]
    )
    threading.Thread(target=terminate_while_listing, daemon=True).start()
    try:
        assert Launcher(options, env=S3_ENV).run() == 128 + signal.SIGTERM
    finally:
        release.set()
    assert not ran.exists()  # the command never started
    assert os.listdir(tmp_path / "c" / "starts") == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


# ---- the launcher as a process ----


def run_launcher(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCHER, "--cache-dir", str(tmp_path / "cache"), "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_commands_exit_status_is_the_launchers(tmp_path: Path) -> None:
    assert run_launcher(tmp_path, "/bin/sh", "-c", "exit 3").returncode == 3
    killed = run_launcher(tmp_path, "/bin/sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + signal.SIGTERM
    missing = run_launcher(tmp_path, str(tmp_path / "no-such-program"))
    assert missing.returncode == 127
    assert missing.stderr.startswith("cacheagent run: error: cannot run"), missing.stderr


def test_the_commands_output_is_untouched_and_the_environment_names_the_cache(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [
            *(*LAUNCHER, "--cache-dir", str(tmp_path / "cache"), "--max-size", "3GiB", "--"),
            *("/bin/sh", "-c", 'echo "$CACHEAGENT_CACHE_DIR $CACHEAGENT_MAX_SIZE $0"; echo e >&2'),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    repoagents = tmp_path / "cache" / "repoagents"
    assert done.stdout == f"{tmp_path / 'cache'} 3GiB --repoagent-directory={repoagents}\n"
    assert done.stderr == "e\n"  # the launcher itself had nothing to say
    assert (repoagents / "cacheagent" / "libtritonrepoagent_cacheagent.so").is_file()


def test_cacheagent_run_is_a_subcommand_of_the_cli(tmp_path: Path) -> None:
    from cacheagent.cli.main import main

    command = ["--", "/bin/sh", "-c", "exit 3"]
    assert main(["run", "--cache-dir", str(tmp_path / "cache"), *command]) == 3
    assert main(["-v", "run", "--cache-dir", str(tmp_path / "cache"), *command]) == 3
    assert main(["run", "tritonserver"]) == 2  # no "--": a usage error


def test_signals_are_forwarded(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = f'trap "exit 7" TERM; trap "exit 8" HUP; touch {ready}; while :; do sleep 0.05; done'
    for signum, status in ((signal.SIGTERM, 7), (signal.SIGHUP, 8)):
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [*LAUNCHER, "--cache-dir", str(tmp_path / "cache"), "--", "/bin/sh", "-c", script]
        )
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signum)
            assert proc.wait(30) == status
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
