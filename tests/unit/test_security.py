"""Security of the cache directory and of the command line, with real files and processes.

- The cache directory is private (0700) and an unsafe one is refused.
- Symlinks planted inside the cache are never followed out of it: no fetch,
  eviction, purge, verification or temp cleanup deletes, changes or reads what
  they point at, and no snapshot ever serves their target's bytes.
- Every flag of every ``cacheagent`` subcommand refuses a bad value with exit
  code 2 and a message naming the flag (and the accepted values, where there
  are any).
- Property tests for the parameter and size parsers (gaps in test_fuzz.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheagent.cache import Cache, LeaseSpec
from cacheagent.cli.main import main
from cacheagent.cli.parser import build_parser
from cacheagent.errors import CacheAgentError, UnsafeCacheDirError
from cacheagent.remote.listing import list_manifest
from cacheagent.remote.location import parse_location
from cacheagent.remote.manifest import build_manifest
from cacheagent.sizes import parse_size
from cacheagent.triton.params import PARAMETERS, parse_params

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---- the cache directory ---------------------------------------------------------


def test_cache_dir_and_its_parts_are_created_0700(tmp_path):
    old = os.umask(0)  # even a permissive umask must not open the cache up
    try:
        root = tmp_path / "a" / "b" / "cache"
        with Cache(root):
            pass
    finally:
        os.umask(old)
    for part in (root, *(root / d for d in ("blobs", "snapshots", "tmp", "locks", "index"))):
        assert stat.S_IMODE(part.stat().st_mode) == 0o700, part


def test_world_writable_cache_dir_is_refused(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(UnsafeCacheDirError, match="world-writable") as failure:
        Cache(root)
    assert str(root) in str(failure.value) and "chmod 700" in str(failure.value)
    assert list(root.iterdir()) == []  # refused before writing anything


@pytest.mark.skipif(not IS_ROOT, reason="giving a directory away to another uid needs root")
def test_foreign_owned_cache_dir_is_refused(tmp_path):
    root = tmp_path / "theirs"
    root.mkdir(mode=0o700)
    os.chown(root, 54321, 54321)
    with pytest.raises(UnsafeCacheDirError, match="owned by uid 54321"):
        Cache(root)
    assert list(root.iterdir()) == []


def test_cache_dir_that_is_a_symlink_or_a_file_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeCacheDirError, match="not a plain directory"):
        Cache(link)
    assert list(real.iterdir()) == []
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UnsafeCacheDirError, match="not a directory"):
        Cache(afile)
    assert afile.read_text() == "x"


# ---- symlinks planted inside the cache ----------------------------------------------


class Untouchable:
    """A file or directory outside the cache that nothing may delete, change or read.

    Reads are caught through the access time: it is set behind the modification
    time, so the kernel (relatime) advances it on the next read.
    """

    def __init__(self, path: Path, content: bytes = b"", *, probe_reads: bool = True) -> None:
        self.path = path
        if content or not path.exists():
            path.write_bytes(content)
        self.is_dir = path.is_dir()
        self.content = None if self.is_dir else path.read_bytes()
        self.listing = sorted(os.listdir(path)) if self.is_dir else []
        info = path.stat()
        self.mode = info.st_mode
        self.probe_reads = probe_reads and ATIME_WORKS
        if self.probe_reads:
            os.utime(path, (info.st_mtime - 3600, info.st_mtime))
        self.atime = path.stat().st_atime

    def assert_untouched(self) -> None:
        assert self.path.exists(), f"{self.path} was deleted"
        info = self.path.stat()
        assert info.st_mode == self.mode, f"{self.path} changed mode"
        if self.is_dir:
            assert sorted(os.listdir(self.path)) == self.listing, f"{self.path} changed"
        else:
            assert self.path.read_bytes() == self.content, f"{self.path} changed"
            if self.probe_reads:
                assert info.st_atime == self.atime, f"{self.path} was read"


def _atime_works() -> bool:
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"atime-probe-{os.getpid()}"
    probe.write_bytes(b"p")
    try:
        info = probe.stat()
        os.utime(probe, (info.st_mtime - 3600, info.st_mtime))
        before = probe.stat().st_atime
        probe.read_bytes()
        return probe.stat().st_atime != before
    finally:
        probe.unlink()


ATIME_WORKS = _atime_works()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "1").mkdir(parents=True)
    (root / "1" / "w.bin").write_bytes(os.urandom(4096))
    (root / "config.pbtxt").write_text('name: "m"')
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    return directory


def housekeeping(cache: Cache) -> None:
    """Everything that walks or deletes inside the cache."""
    cache.verify()
    cache.evict(0)
    cache.purge()
    cache.store.clean_tmp()


def test_snapshot_dir_replaced_by_symlink_is_never_followed(tmp_path, model, outside):
    (outside / "sub").mkdir(mode=0o750)
    keep = Untouchable(outside / "sub" / "keep.bin", b"keep me")
    tree = Untouchable(outside / "sub")
    with Cache(tmp_path / "cache") as cache:
        first = cache.fetch(str(model))
        shutil.rmtree(first.path)
        first.path.symlink_to(outside)
        again = cache.fetch(str(model))  # rebuilt as a real directory, in place of the link
        assert again.path == first.path and not again.path.is_symlink()
        assert (again.path / "1" / "w.bin").read_bytes() == (model / "1" / "w.bin").read_bytes()
        shutil.rmtree(again.path)
        again.path.symlink_to(outside)
        cache.remove(again.key)
        housekeeping(cache)
        assert cache.snapshots() == []
    keep.assert_untouched()
    tree.assert_untouched()


@pytest.mark.parametrize("target", ["same-size file", "/etc/passwd"])
def test_blob_replaced_by_symlink_is_never_served_or_followed(tmp_path, model, outside, target):
    with Cache(tmp_path / "cache") as cache:
        cache.fetch(str(model))
        (record,) = cache.snapshots()
        blob = cache.store.blob_path(record.blobs()["1/w.bin"])
        if target == "/etc/passwd":
            victim = Untouchable(Path("/etc/passwd"), probe_reads=False)  # a system file
        else:  # same size as the blob, so a size check alone would take it for the blob
            victim = Untouchable(outside / "secret.bin", os.urandom(blob.stat().st_size))
        blob.unlink()
        blob.symlink_to(victim.path)
        # A new version of the model that reuses the weights: its snapshot must not
        # link (and so serve) what the planted symlink points at.
        (model / "config.pbtxt").write_text('name: "m" # v2')
        snap = cache.fetch(str(model))
        served = snap.path / "1" / "w.bin"
        assert not served.is_symlink()
        assert served.read_bytes() == (model / "1" / "w.bin").read_bytes()
        assert not blob.is_symlink()  # the fetched bytes took the blob's name back
        housekeeping(cache)
    victim.assert_untouched()


def test_file_in_snapshot_replaced_by_symlink_is_refetched(tmp_path, model, outside):
    # The symlink's own size (the length of its target's name) equals the file's, so
    # only a check that refuses to follow it (lstat, O_NOFOLLOW) can tell them apart.
    length = len(str(outside)) + 64
    target = str(outside) + "/" * (length - len(str(outside)) - len("secret.bin")) + "secret.bin"
    (model / "1" / "w.bin").write_bytes(os.urandom(length))
    victim = Untouchable(Path(target), os.urandom(length))
    with Cache(tmp_path / "cache", verify="hash") as cache:
        snap = cache.fetch(str(model))
        served = snap.path / "1" / "w.bin"
        served.parent.chmod(0o755)
        served.unlink()
        served.symlink_to(target)
        assert served.lstat().st_size == length
        again = cache.fetch(str(model))
        assert not again.hit
        assert not (again.path / "1" / "w.bin").is_symlink()
        assert (again.path / "1" / "w.bin").read_bytes() == (model / "1" / "w.bin").read_bytes()
        housekeeping(cache)
    victim.assert_untouched()


def test_verify_reports_a_symlink_planted_in_a_snapshot(tmp_path, model, outside):
    with Cache(tmp_path / "cache") as cache:
        snap = cache.fetch(str(model))
        served = snap.path / "1" / "w.bin"
        victim = outside / "secret.bin"
        victim.write_bytes(os.urandom(served.stat().st_size))
        served.parent.chmod(0o755)
        served.unlink()
        served.symlink_to(victim)
        assert cache.verify(repair=False).broken_snapshots == [snap.key]
        report = cache.verify()
        assert report.repaired and not snap.path.exists() and victim.exists()


def test_symlinks_in_tmp_are_removed_not_followed(tmp_path, model, outside):
    with Cache(tmp_path / "cache") as cache:
        cache.fetch(str(model))
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        file_target = Untouchable(outside / "file.bin", b"file")
        (outside / "dir").mkdir()
        dir_content = Untouchable(outside / "dir" / "inner.bin", b"inner")
        tmp = cache.store.tmp_dir
        planted = [
            tmp / f"{dead.pid}-aaaa.blob",
            tmp / f"{dead.pid}-bbbb.snap",
            tmp / f"{dead.pid}-cccc.gone",
            tmp / "not-a-pid.snap",
        ]
        planted[0].symlink_to(file_target.path)
        planted[1].symlink_to(outside / "dir")
        planted[2].symlink_to(outside)
        planted[3].symlink_to(outside / "dir")
        assert cache.store.clean_tmp() == 4
        assert not any(os.path.lexists(p) for p in planted)
        housekeeping(cache)
    file_target.assert_untouched()
    dir_content.assert_untouched()


@pytest.mark.parametrize("part", ["tmp", "blobs", "snapshots", "locks", "index"])
def test_cache_subdirectory_replaced_by_symlink_is_refused(tmp_path, model, outside, part):
    root = tmp_path / "cache"
    with Cache(root) as cache:
        cache.fetch(str(model))
    precious = Untouchable(outside / "precious.txt", b"precious")
    shutil.rmtree(root / part)
    (root / part).symlink_to(outside)
    with pytest.raises(UnsafeCacheDirError, match=rf"cache/{part} is not a plain directory"):
        Cache(root)
    precious.assert_untouched()
    assert sorted(os.listdir(outside)) == ["precious.txt"]


def test_blob_shard_replaced_by_symlink_is_never_followed(tmp_path, model, outside):
    # Files whose names start like the shard would be "blobs" of it, for gc to delete.
    precious = Untouchable(outside / "pr-precious.bin", b"p")
    lonely = Untouchable(outside / "prlonely", b"q")
    with Cache(tmp_path / "cache") as cache:
        cache.fetch(str(model))
        (cache.store.blobs_dir / "pr").symlink_to(outside)
        housekeeping(cache)
        assert cache.stats().blobs == 0
    precious.assert_untouched()
    lonely.assert_untouched()
    assert sorted(os.listdir(outside)) == ["pr-precious.bin", "prlonely"]


def test_lock_file_replaced_by_symlink_creates_nothing_outside(tmp_path, model, outside):
    with Cache(tmp_path / "cache") as cache:
        snap = cache.fetch(str(model))
        existing = Untouchable(outside / "existing.lock", b"do not touch")
        for name, target in (
            ("gc.lock", outside / "created-by-gc.lock"),
            (f"snap-{snap.key}.lock", existing.path),
        ):
            lock = cache.store.locks_dir / name
            lock.unlink(missing_ok=True)
            lock.symlink_to(target)
        (model / "config.pbtxt").write_text("changed")  # a miss takes both locks
        new_key = list_manifest(parse_location(str(model))).key
        lock = cache.store.locks_dir / f"snap-{new_key}.lock"
        lock.symlink_to(outside / "created-by-fetch.lock")
        assert cache.fetch(str(model)).key == new_key
        housekeeping(cache)
    assert sorted(os.listdir(outside)) == ["existing.lock"]
    existing.assert_untouched()


def test_leased_snapshot_survives_purge_and_evict(tmp_path, model):
    with Cache(tmp_path / "cache") as cache:
        snap = cache.fetch(str(model), lease=LeaseSpec("mine", os.getpid(), "m"))
        cache.evict(0)
        cache.purge()
        assert cache.remove(snap.key) is False
        assert (snap.path / "1" / "w.bin").read_bytes() == (model / "1" / "w.bin").read_bytes()


# ---- every CLI flag with a bad value -------------------------------------------------
#
# Flags argparse judges by form (switches, choices, sizes, bounded integers,
# required options) get bad-value cases generated from the real parser, so a
# flag added later is covered without editing this file. Flags whose bad values
# mean something (paths, KEY=VALUE) are listed in SEMANTIC_CASES; a test fails
# when a flag is covered by neither.


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    ]


def _checks_form(action: argparse.Action) -> bool:
    # The settings-backed and bounded-integer parsers of the CLI: any garbage is a bad
    # value for them.
    name = getattr(action.type, "__qualname__", "")
    return name.startswith(("_setting_arg.", "_int_arg."))


def _argv(command: str, tmp: Path, without: str = "") -> list[str]:
    """A valid command line for ``command``, leaving out option ``without``."""
    argv = [command]
    for action in _subparsers()[command]._actions:
        if not action.option_strings and action.dest != "help":
            argv.append(str(tmp / "model"))  # the location
        elif action.required and _flag(action) != without:
            argv += [_flag(action), {"--max-size": "1GB"}.get(_flag(action), str(tmp / "dir"))]
    if command in CACHE_COMMANDS and without != "--cache-dir":
        argv += ["--cache-dir", str(tmp / "c")]
    return argv


def _generated_cases() -> list[tuple[str, str, str | None, list[str]]]:
    """(command, flag, bad value or None for 'left out', words the message must hold)."""
    cases: list[tuple[str, str, str | None, list[str]]] = []
    for command, parser in _subparsers().items():
        for action in _options(parser):
            flag = _flag(action)
            if action.required:
                cases.append((command, flag, None, ["required"]))
            if action.nargs == 0:
                cases.append((command, flag, f"{flag}=yes", []))
            elif action.choices:
                cases.append((command, flag, "not-a-choice", [str(c) for c in action.choices]))
            elif _checks_form(action):
                for bad in ("@@", "-1", "²"):
                    cases.append((command, flag, bad, [f"'{bad}'"]))
    return cases


GENERATED = _generated_cases()
CACHE_COMMANDS = [c for c, p in _subparsers().items() if "--cache-dir" in p._option_string_actions]


def _run_bad(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "flag", "bad", "words"),
    GENERATED,
    ids=[f"{c}{f}={b}" for c, f, b, _ in GENERATED],
)
def test_bad_flag_value_exits_2_naming_flag_and_accepted_values(
    tmp_path, capsys, command, flag, bad, words
):
    argv = _argv(command, tmp_path, without=flag if bad is None else "")
    if bad is not None:
        argv += [bad] if bad.startswith(flag) else [flag, bad]
    code, err = _run_bad(capsys, argv)
    assert code == 2, err
    assert flag in err and f"cacheagent {command}" in err
    for word in words:
        assert word in err
    # A custom check explains itself; argparse's generic "invalid <function> value" does not.
    assert "invalid" not in err.split(flag, 1)[1] or "choice" in err
    assert not (tmp_path / "c").exists()  # refused before touching anything


def test_size_and_count_flags_state_their_accepted_values(tmp_path, capsys):
    cases = [
        (["warm", "m", "--max-size", "lots"], ["500MB", "200GiB"]),
        (["warm", "m", "--max-size", "9" * 400], ["--max-size"]),  # no overflow traceback
        (["warm", "m", "--concurrency", "257"], ["1 to 256"]),
        (["warm", "m", "--part-size", "2GiB"], ["1MiB to 1GiB"]),
        (["stats", "--top", "1001"], ["0 to 1000"]),
    ]
    for argv, words in cases:
        code, err = _run_bad(capsys, [*argv, "--cache-dir", str(tmp_path / "c")])
        assert code == 2 and all(word in err for word in words), err


# (command, flag, bad value, words the message must hold). "<file>" and "<dir>" stand
# for an existing file and directory.
SEMANTIC_CASES: list[tuple[str, str, str, list[str]]] = [
    *[(c, "--cache-dir", "<file>", ["not a directory"]) for c in CACHE_COMMANDS],
    *[(c, "--cache-dir", "", ["empty"]) for c in CACHE_COMMANDS],
    ("stub", "--out", "<file>", ["not a directory"]),
    ("stats", "--output", "<dir>", ["directory"]),
    ("stub", "--param", "noequals", ["KEY=VALUE"]),
    ("stub", "--param", "max_size=lots", ["max_size", "500MB"]),
    ("ls", "--filter", "size~1GB", ["FIELD OP VALUE", "size>1GB"]),
    ("ls", "--filter", "color=red", ["unknown field", "accessed"]),
    ("ls", "--filter", "accessed>soon", ["duration", "30d"]),
    ("ls", "--filter", "size>lots", ["200GiB"]),
    ("stats", "--serve", "nowhere", ["HOST:PORT", "127.0.0.1:9400"]),
]


@pytest.mark.parametrize(
    ("command", "flag", "bad", "words"),
    SEMANTIC_CASES,
    ids=[f"{c}{f}={b or 'empty'}" for c, f, b, _ in SEMANTIC_CASES],
)
def test_bad_path_or_pair_exits_2_naming_flag(tmp_path, capsys, model, command, flag, bad, words):
    afile = tmp_path / "afile"
    afile.write_text("x")
    adir = tmp_path / "adir"
    adir.mkdir()
    value = {"<file>": str(afile), "<dir>": str(adir)}.get(bad, bad)
    argv = _argv(command, tmp_path, without=flag)
    code, err = _run_bad(capsys, [*argv, flag, value])
    assert code == 2, err
    # A bad KEY=VALUE may be named by its key (the agent parameter) instead of the flag.
    assert flag in err or (flag == "--param" and value.split("=")[0] in err)
    assert "Traceback" not in err
    for word in words:
        assert word in err
    assert afile.read_text() == "x" and os.listdir(adir) == []
    assert not (tmp_path / "c").exists() and not (tmp_path / "dir").exists()


def test_every_flag_of_every_subcommand_has_a_bad_value_case():
    covered = {(c, f) for c, f, _, _ in GENERATED} | {(c, f) for c, f, _, _ in SEMANTIC_CASES}
    covered.add(("install-triton", "--repoagent-dir"))  # see the test below
    wanted = {(c, _flag(a)) for c, parser in _subparsers().items() for a in _options(parser)}
    assert wanted - covered == set(), "add a bad-value case for these flags"


def test_install_triton_into_a_file_fails_naming_the_flag(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = _run_bad(capsys, ["install-triton", "--repoagent-dir", str(afile)])
    assert code != 0 and "--repoagent-dir" in err and "Traceback" not in err
    assert afile.read_text() == "x"


def test_bad_location_exits_2_naming_accepted_forms(tmp_path, capsys):
    code = main(["warm", "ftp://host/m", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "ftp://" in err and "s3://bucket/path" in err and "gs://" in err


def test_unknown_subcommand_and_flag_exit_2(capsys):
    for argv in (["frobnicate"], ["ls", "--frobnicate"], ["--version=2"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "frobnicate" in err and "warm" in err  # the subcommands on offer are listed


# ---- property tests (what test_fuzz.py does not cover) ---------------------------------


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(PARAMETERS)), st.text(max_size=30), max_size=4))
def test_parameter_parser_raises_only_its_own_errors(raw):
    try:
        params = parse_params(raw, "m", {})
    except CacheAgentError:
        return
    assert params.concurrency >= 1 and params.part_size >= 1024 * 1024


def test_concurrency_with_a_superscript_digit_is_a_parameter_error():
    with pytest.raises(CacheAgentError):
        parse_params({"concurrency": "²"}, "m", {})


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A\s*\d{1,30}(\.\d{1,5})?\s*[a-zA-Z]{0,3}\s*\Z"))
def test_size_parser_raises_only_its_own_errors(text):
    try:
        value = parse_size(text)
    except CacheAgentError:
        return
    assert value >= 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=8))
def test_every_accepted_manifest_path_stays_inside_a_snapshot(names):
    listing = {f"b/m/{name}": {"size": 1, "ETag": '"e"'} for name in names}
    try:
        manifest = build_manifest("s3://b/m", "b/m", listing)
    except CacheAgentError:
        return
    base = "/cache/snapshots/key"
    for entry in manifest.files:
        joined = os.path.normpath(os.path.join(base, entry.path))
        assert joined.startswith(base + "/"), entry.path
        assert os.path.join(base, entry.path) == joined  # nothing for normpath to fold


def test_atime_probe_is_meaningful_or_reported():
    # Documents whether read detection is active on this machine (it is on relatime/strict).
    if not ATIME_WORKS:
        pytest.skip("the temp filesystem does not update access times: reads are not detected")
    probe = Untouchable(Path(os.environ.get("TMPDIR", "/tmp")) / f"p-{os.getpid()}", b"x")
    try:
        time.sleep(0.01)
        probe.path.read_bytes()
        with pytest.raises(AssertionError, match="was read"):
            probe.assert_untouched()
    finally:
        probe.path.unlink()


@pytest.fixture(autouse=True)
def _no_stray_cache_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A CLI bug could build a cache in the current directory: keep that in tmp_path.
    monkeypatch.chdir(tmp_path)
    yield
