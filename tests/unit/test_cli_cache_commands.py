"""The cache commands with `hf cache` manners: ls filters, rm, purge, verify TARGET, help."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import pytest

from cacheagent.cache import Cache
from cacheagent.cli.main import main
from cacheagent.cli.targets import TargetError, parse_filter, resolve_target


def make_model(root: Path, name: str, size: int, versions: tuple[int, ...] = (1,)) -> Path:
    model = root / name
    for version in versions:
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "w.bin").write_bytes(os.urandom(size))
    (model / "config.pbtxt").write_text(f'name: "{name}"\n')
    return model


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def filled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, str]]:
    """A cache with three models of 2 KB, 20 KB and 200 KB; their keys by model name."""
    cache = str(tmp_path / "c")
    keys = {}
    for name, size in (("small", 2_000), ("medium", 20_000), ("large", 200_000)):
        model = make_model(tmp_path / "repo", name, size)
        code, out, _ = run(capsys, "warm", str(model), "--cache-dir", cache, "--json")
        assert code == 0
        keys[name] = json.loads(out)["key"]
    return cache, keys


def ls_models(capsys: pytest.CaptureFixture[str], cache: str, *flags: str) -> list[str]:
    code, out, err = run(capsys, "ls", "--cache-dir", cache, "--json", *flags)
    assert code == 0, err
    return [row["model"] for row in json.loads(out)]


def test_ls_filters_by_size_model_and_source(filled, capsys):
    cache, _ = filled
    assert sorted(ls_models(capsys, cache, "--filter", "size>10KB")) == ["large", "medium"]
    assert ls_models(capsys, cache, "--filter", "size<=3KB") == ["small"]
    assert ls_models(capsys, cache, "--filter", "size>10KB", "--filter", "size<100KiB") == [
        "medium"
    ]
    assert ls_models(capsys, cache, "--filter", "model=l*") == ["large"]
    assert sorted(ls_models(capsys, cache, "--filter", "model!=l*")) == ["medium", "small"]
    assert ls_models(capsys, cache, "--filter", "source=*/repo/medium") == ["medium"]


def test_ls_filters_by_last_use(filled, capsys):
    cache, keys = filled
    with Cache(cache) as c:  # make "small" look unused for 40 days
        record = c.index.get_snapshot(keys["small"])
        record.last_used = time.time() - 40 * 86400
        c.index.put_snapshot(record)
    assert ls_models(capsys, cache, "--filter", "accessed>30d") == ["small"]
    assert sorted(ls_models(capsys, cache, "--filter", "accessed<2h")) == ["large", "medium"]


def test_ls_sorts_limits_and_reverses(filled, capsys):
    cache, _ = filled
    assert ls_models(capsys, cache, "--sort", "size") == ["small", "medium", "large"]
    assert ls_models(capsys, cache, "--sort=-size") == ["large", "medium", "small"]
    assert ls_models(capsys, cache, "--sort", "size", "--reverse") == ["large", "medium", "small"]
    assert ls_models(capsys, cache, "--sort", "model", "--limit", "2") == ["large", "medium"]


def test_ls_quiet_prints_full_keys_and_csv_parses(filled, capsys):
    cache, keys = filled
    code, out, _ = run(capsys, "ls", "--cache-dir", cache, "-q", "--filter", "size>10KB")
    assert code == 0 and sorted(out.split()) == sorted([keys["medium"], keys["large"]])
    code, out, _ = run(capsys, "ls", "--cache-dir", cache, "--format", "csv", "--sort", "size")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["model"] for r in rows] == ["small", "medium", "large"]
    assert rows[0]["key"] == keys["small"] and rows[0]["last_used"].endswith("Z")
    code, out, _ = run(capsys, "ls", "--cache-dir", cache, "--filter", "model=nothing")
    assert code == 0 and "(no snapshots match)" in out


def test_rm_by_model_prefix_and_source(filled, capsys, tmp_path):
    cache, keys = filled
    code, out, _ = run(capsys, "rm", "small", keys["medium"][:8], "--cache-dir", cache, "--yes")
    assert code == 0 and "removed 2 snapshot(s)" in out
    assert ls_models(capsys, cache) == ["large"]
    source = str(tmp_path / "repo" / "large") + "/"
    code, out, _ = run(capsys, "rm", source, "--cache-dir", cache, "--yes", "--json")
    assert code == 0 and [r["model"] for r in json.loads(out)["removed"]] == ["large"]
    with Cache(cache) as c:
        assert c.size() == 0  # the blobs went with the snapshots


def test_rm_dry_run_removes_nothing(filled, capsys):
    cache, _ = filled
    code, out, _ = run(capsys, "rm", "large", "--cache-dir", cache, "--dry-run", "--json")
    report = json.loads(out)
    # 200 KB of weights and the model's config.pbtxt
    assert code == 0 and report["dry_run"] and 200_000 < report["freed_bytes"] < 200_100
    assert sorted(ls_models(capsys, cache)) == ["large", "medium", "small"]


def test_rm_without_a_terminal_needs_yes(filled, capsys, monkeypatch):
    cache, _ = filled
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal
    code, _, err = run(capsys, "rm", "small", "--cache-dir", cache)
    assert code == 2 and "--yes" in err
    assert "small" in ls_models(capsys, cache)


def test_rm_unknown_or_ambiguous_target_removes_nothing(filled, capsys):
    cache, _ = filled
    code, _, err = run(capsys, "rm", "small", "nosuchmodel", "--cache-dir", cache, "--yes")
    assert code == 2 and "nosuchmodel" in err and "cacheagent ls" in err
    assert "small" in ls_models(capsys, cache)  # all targets resolve before anything goes


def test_rm_reports_a_leased_snapshot_and_keeps_it(filled, capsys):
    cache, keys = filled
    with Cache(cache) as c:  # a lease lives while its holder does: keep the cache open
        c.lease(keys["small"], "triton-test", pid=os.getpid())
        code, out, _ = run(capsys, "rm", "small", "medium", "--cache-dir", cache, "--yes")
    assert code == 1
    assert "kept" in out and "leased by running process" in out and str(os.getpid()) in out
    assert sorted(ls_models(capsys, cache)) == ["large", "small"]


def test_target_resolution_rules():
    class R:
        def __init__(self, key: str, model: str, source: str) -> None:
            self.key, self.model, self.source = key, model, source
            self.size, self.last_used = 1, 0.0

    records = [R("abcd1111", "m", "s3://b/m"), R("abcd2222", "n", "s3://b/n")]
    assert [r.key for r in resolve_target(records, "abcd2")] == ["abcd2222"]
    assert [r.key for r in resolve_target(records, "n")] == ["abcd2222"]
    assert [r.key for r in resolve_target(records, "s3://b/m/")] == ["abcd1111"]
    with pytest.raises(TargetError, match="matches 2 snapshots"):
        resolve_target(records, "abcd")
    with pytest.raises(TargetError):
        resolve_target(records, "abc")  # too short to be taken as a key prefix


def test_purge_dry_run_and_confirmation(filled, capsys, monkeypatch):
    cache, _ = filled
    code, out, _ = run(capsys, "purge", "--cache-dir", cache, "--dry-run", "--json")
    assert code == 0 and 222_000 < json.loads(out)["freed_bytes"] < 222_100
    assert len(ls_models(capsys, cache)) == 3
    monkeypatch.setattr("cacheagent.cli.commands.stdin_is_terminal", lambda: True)
    monkeypatch.setattr("cacheagent.cli.commands.confirm", lambda question: False)
    code, _, err = run(capsys, "purge", "--cache-dir", cache)
    assert code == 2 and "nothing removed" in err and len(ls_models(capsys, cache)) == 3
    asked = []
    monkeypatch.setattr("cacheagent.cli.commands.confirm", lambda q: asked.append(q) or True)
    code, out, _ = run(capsys, "purge", "--cache-dir", cache)
    assert code == 0 and "3 snapshots" in asked[0] and ls_models(capsys, cache) == []


def test_purge_without_terminal_or_yes_refuses(filled, capsys, monkeypatch):
    cache, _ = filled
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, "purge", "--cache-dir", cache)
    assert code == 2 and "pass --yes" in err and len(ls_models(capsys, cache)) == 3


def _corrupt_blob_of(cache: str, key: str) -> None:
    with Cache(cache) as c:
        digest = c.index.get_snapshot(key).files[0][4]
        path = c.store.blob_path(digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_one_target_checks_only_its_blobs(filled, capsys):
    cache, keys = filled
    _corrupt_blob_of(cache, keys["large"])
    code, out, _ = run(capsys, "verify", "small", "--cache-dir", cache, "--json")
    report = json.loads(out)
    assert code == 0 and report["snapshots_checked"] == 1 and report["blobs_checked"] <= 2
    code, out, _ = run(capsys, "verify", "large", "--cache-dir", cache, "--no-repair")
    assert code == 3 and "1 broken snapshot" in out and "--no-repair" in out
    code, out, _ = run(capsys, "verify", keys["large"][:10], "--cache-dir", cache, "--json")
    assert code == 4 and json.loads(out)["broken_snapshots"] == [keys["large"]]
    assert sorted(ls_models(capsys, cache)) == ["medium", "small"]
    code, _, _ = run(capsys, "verify", "--cache-dir", cache)
    assert code == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["ls"],
        ["stats"],
        ["stats", "--format", "prometheus"],
        ["verify"],
        ["rm", "x", "--yes"],
        ["purge", "--yes"],
        ["evict", "--max-size", "1GB"],
    ],
)
def test_read_only_commands_refuse_a_missing_cache(tmp_path, capsys, argv):
    missing = tmp_path / "nope"
    code, out, err = run(capsys, *argv, "--cache-dir", str(missing))
    assert code == 2 and "no cache at" in err and str(missing) in err and out == ""
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, *argv, "--cache-dir", str(empty))
    assert code == 2 and "holds no cacheagent cache" in err and os.listdir(empty) == []


def test_warm_creates_the_cache(tmp_path, capsys):
    model = make_model(tmp_path, "m", 100)
    code, _, _ = run(capsys, "warm", str(model), "--cache-dir", str(tmp_path / "new" / "c"))
    assert code == 0 and (tmp_path / "new" / "c" / "snapshots").is_dir()


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_states_exit_codes_and_examples(capsys):
    commands = ["warm", "ls", "stats", "evict", "purge", "rm", "verify", "stub", "check"]
    for command in [*commands, "install-triton"]:
        text = _help(capsys, command)
        assert "example" in text and f"cacheagent {command}" in text, command
        assert "exit codes:" in text and "2  bad usage" in text, command
    verify = _help(capsys, "verify")
    assert "3  corruption found and left" in verify and "4  corruption found and repaired" in verify
    assert "exits 1 when it finds an error" in _help(capsys, "check")
    assert "cacheagent-worker" in _help(capsys, "install-triton")  # it has a description


def test_format_convention_json_alias(filled, capsys):
    cache, _ = filled
    for command in (["stats"], ["verify"], ["ls"], ["evict", "--max-size", "none", "--dry-run"]):
        _, by_alias, _ = run(capsys, *command, "--cache-dir", cache, "--json")
        _, by_format, _ = run(capsys, *command, "--cache-dir", cache, "--format", "json")
        assert json.loads(by_alias) == json.loads(by_format), command
        _, text, _ = run(capsys, *command, "--cache-dir", cache)
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)  # the default format is for people


def test_verbose_logs_info_to_stderr_only_when_asked(tmp_path, capsys):
    model = make_model(tmp_path, "m", 100)
    cache = str(tmp_path / "c")
    _, out, err = run(capsys, "warm", str(model), "--cache-dir", cache)
    assert "INFO" not in err
    _, out, err = run(capsys, "warm", str(model), "--cache-dir", cache, "-v")
    assert "cacheagent: INFO:" in err and "version_policy" in err and "INFO" not in out
    _, _, err = run(capsys, "-v", "ls", "--cache-dir", cache)
    assert "cacheagent: INFO: cache" in err
    _, _, err = run(capsys, "ls", "--cache-dir", cache, "-vv")
    assert "INFO" in err


def test_filter_parser_words():
    assert parse_filter("size > 1GB").test.__name__  # spaces allowed
    for bad in ("size", "size>", "model>x", "accessed>3y"):
        with pytest.raises(ValueError, match="--filter"):
            parse_filter(bad)
