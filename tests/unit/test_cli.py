import json
import os

import pytest

from cacheagent.cli.main import main


@pytest.fixture
def model(tmp_path):
    root = tmp_path / "model"
    (root / "1").mkdir(parents=True)
    (root / "1" / "w.bin").write_bytes(os.urandom(4096))
    (root / "config.pbtxt").write_text("name: 'm'")
    return root


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_warm_json_then_hit(tmp_path, model, capsys):
    cache = str(tmp_path / "c")
    code, out, _ = run(capsys, "warm", str(model), "--cache-dir", cache, "--json")
    first = json.loads(out)
    assert code == 0 and first["hit"] is False and first["bytes_fetched"] == 4096 + 9
    assert {"path", "key", "hit", "bytes_fetched", "stale"} <= set(first)
    code, out, _ = run(capsys, "warm", str(model), "--cache-dir", cache)
    assert code == 0 and out.strip() == first["path"]


def test_cache_dir_from_environment(tmp_path, model, capsys, monkeypatch):
    monkeypatch.setenv("CACHEAGENT_CACHE_DIR", str(tmp_path / "envcache"))
    code, out, _ = run(capsys, "warm", str(model), "--json")
    assert code == 0 and json.loads(out)["path"].startswith(str(tmp_path / "envcache"))


def test_ls_stats_evict_purge_verify(tmp_path, model, capsys):
    cache = str(tmp_path / "c")
    run(capsys, "warm", str(model), "--cache-dir", cache)
    code, out, _ = run(capsys, "ls", "--cache-dir", cache, "--json")
    rows = json.loads(out)
    assert code == 0 and rows[0]["model"] == "model" and rows[0]["versions"] == ["1"]
    code, out, _ = run(capsys, "ls", "--cache-dir", cache)
    assert "model" in out and str(model) in out
    code, out, _ = run(capsys, "stats", "--cache-dir", cache, "--json")
    assert json.loads(out)["misses"] == 1
    code, out, _ = run(capsys, "stats", "--cache-dir", cache)
    assert "hit ratio" in out
    code, out, _ = run(capsys, "verify", "--cache-dir", cache)
    assert code == 0 and "all intact" in out
    code, out, _ = run(
        capsys, "evict", "--cache-dir", cache, "--max-size", "0", "--dry-run", "--json"
    )
    dry = json.loads(out)
    assert dry["dry_run"] and len(dry["evicted"]) == 1 and os.path.exists(rows[0]["path"])
    code, out, _ = run(capsys, "evict", "--cache-dir", cache, "--max-size", "0")
    assert "evicted 1 snapshot" in out and not os.path.exists(rows[0]["path"])
    run(capsys, "warm", str(model), "--cache-dir", cache)
    code, out, _ = run(capsys, "purge", "--cache-dir", cache, "--json", "--yes")
    assert json.loads(out)["freed_bytes"] == 4096 + 9


@pytest.mark.parametrize(
    "argv",
    [
        ["evict", "--max-size", "big"],
        ["warm", "/x", "--concurrency", "0"],
        ["warm", "/x", "--part-size", "1KB"],
        ["warm", "/x", "--verify", "md5"],
        ["stats", "--max-size", "-3"],
    ],
)
def test_bad_flags_exit_2_naming_flag(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--cache-dir", str(tmp_path / "c")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert argv[1] if argv[1].startswith("--") else argv[2] in err


def test_bad_location_is_an_error_not_a_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "warm", "ftp://nope/x", "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and "unknown storage scheme" in err and "Traceback" not in err


def test_unsafe_cache_dir_is_refused(tmp_path, model, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    code, _, err = run(capsys, "warm", str(model), "--cache-dir", str(shared))
    assert code == 1 and "world-writable" in err


def test_check_command_exit_codes(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "good" / "1").mkdir(parents=True)
    (repo / "good" / "1" / "model.py").write_text("# model")
    (repo / "good" / "config.pbtxt").write_text('name: "good"\nbackend: "python"\n')
    assert main(["check", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "good" in out
    (repo / "bad").mkdir()
    (repo / "bad" / "config.pbtxt").write_text('name: "other"\nbackend: "python"\n')
    assert main(["check", str(repo), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["errors"] >= 2
    assert {f["model"] for f in report["findings"] if f["severity"] == "error"} == {"bad"}
