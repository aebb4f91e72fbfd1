"""`cacheagent stats --format prometheus` and `--serve`: conventions, validity, a live endpoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cacheagent import __version__
from cacheagent.cli.main import main
from cacheagent.cli.prometheus import exposition, label_value

SERVE_WAIT_S = 20.0


def warmed_cache(tmp_path: Path, name: str = "c") -> Path:
    model = tmp_path / f"model-{name}"
    (model / "1").mkdir(parents=True)
    (model / "1" / "w.bin").write_bytes(os.urandom(5000))
    (model / "config.pbtxt").write_text(f'name: "model-{name}"\n')
    cache = tmp_path / name
    assert main(["warm", str(model), "--cache-dir", str(cache)]) == 0
    assert main(["warm", str(model), "--cache-dir", str(cache)]) == 0  # a hit
    return cache


def prometheus(capsys: pytest.CaptureFixture[str], cache: Path, *flags: str) -> str:
    capsys.readouterr()
    assert main(["stats", "--cache-dir", str(cache), "--format", "prometheus", *flags]) == 0
    return capsys.readouterr().out


def samples(text: str) -> dict[str, tuple[dict[str, str], float]]:
    """name -> (labels, value), parsed with prometheus_client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] = (sample.labels, sample.value)
    return found


def validate(text: str) -> None:
    """promtool's lint when it is installed (Debian's prometheus package), else the parser."""
    promtool = shutil.which("promtool")
    if promtool:
        done = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    assert samples(text)  # the client's parser reads it whatever promtool said


def test_names_units_and_labels_follow_prometheus_conventions(tmp_path, capsys):
    cache = warmed_cache(tmp_path)
    text = prometheus(capsys, cache, "--max-size", "1Gi")
    validate(text)
    found = samples(text)
    for name in (
        "cacheagent_fetched_bytes_total",
        "cacheagent_served_from_cache_bytes_total",
        "cacheagent_evicted_bytes_total",
        "cacheagent_hits_total",
        "cacheagent_misses_total",
        "cacheagent_cache_size_bytes",
        "cacheagent_cache_max_size_bytes",
    ):
        assert name in found, name
    assert not any("ratio" in name for name in found)  # computed at query time instead
    assert found["cacheagent_hits_total"][1] == 1 and found["cacheagent_misses_total"][1] == 1
    assert found["cacheagent_fetched_bytes_total"][1] == 5000 + len('name: "model-c"\n')
    assert found["cacheagent_cache_max_size_bytes"][1] == 2**30
    assert found["cacheagent_build_info"] == ({"version": __version__, "cache_dir": str(cache)}, 1)
    assert all(labels.get("cache_dir") == str(cache) for labels, _ in found.values())


def test_two_caches_on_one_node_do_not_collide(tmp_path, capsys):
    one, two = warmed_cache(tmp_path, "one"), warmed_cache(tmp_path, "two")
    both = prometheus(capsys, one) + prometheus(capsys, two)
    # What node-exporter's textfile collector would merge: series differ by cache_dir.
    lines = [line for line in both.splitlines() if not line.startswith("#")]
    assert len(lines) == len(set(lines)) and len({line.split(" ")[0] for line in lines}) == len(
        lines
    )


def test_no_budget_means_no_budget_series(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CACHEAGENT_MAX_SIZE", raising=False)
    text = prometheus(capsys, warmed_cache(tmp_path))
    assert "cacheagent_cache_max_size_bytes{" not in text
    validate(text)


def test_output_file_is_valid_for_the_textfile_collector(tmp_path, capsys):
    cache = warmed_cache(tmp_path)
    out = tmp_path / "cacheagent.prom"
    prometheus(capsys, cache, "--output", str(out))
    validate(out.read_text())


def test_label_values_are_escaped():
    assert label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    text = exposition({"size": 1}, {"hits": 2}, '/odd "dir"\\x')
    validate(text)
    assert samples(text)["cacheagent_hits_total"][0]["cache_dir"] == '/odd "dir"\\x'


def _wait_for_line(proc: subprocess.Popen[str], needle: str) -> str:
    deadline = time.monotonic() + SERVE_WAIT_S
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if needle in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no {needle!r} from the server within {SERVE_WAIT_S} s")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_scrapes_computed_each_time_and_stops_on_signals(tmp_path, stop):
    cache = warmed_cache(tmp_path)
    cmd = [sys.executable, "-m", "cacheagent.cli", "stats", "--cache-dir", str(cache)]
    argv = [*cmd, "--serve", "127.0.0.1:0"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        line = _wait_for_line(proc, "serving metrics on")
        url = line.split("serving metrics on ", 1)[1].split(";", 1)[0]
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200 and "text/plain" in answer.headers["Content-Type"]
            first = answer.read().decode()
        validate(first)
        assert samples(first)["cacheagent_hits_total"][1] == 1
        model = tmp_path / "model-c"
        assert main(["warm", str(model), "--cache-dir", str(cache)]) == 0  # one more hit
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert samples(answer.read().decode())["cacheagent_hits_total"][1] == 2
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=10)
        assert info.value.code == 404
        proc.send_signal(stop)
        assert proc.wait(timeout=SERVE_WAIT_S) == 0
        assert "metrics server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=SERVE_WAIT_S)


def test_serve_refuses_a_missing_cache_and_a_taken_port(tmp_path, capsys):
    assert main(["stats", "--cache-dir", str(tmp_path / "none"), "--serve", "127.0.0.1:0"]) == 2
    assert "no cache at" in capsys.readouterr().err
    import socket

    cache = warmed_cache(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["stats", "--cache-dir", str(cache), "--serve", f"127.0.0.1:{port}"])
    assert code == 1 and "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_serve_bounds_its_connections(tmp_path):
    import http.client
    import socket

    from cacheagent.cli.prometheus import MAX_CONNECTIONS

    cache = warmed_cache(tmp_path)
    argv = [sys.executable, "-m", "cacheagent.cli", "stats", "--cache-dir", str(cache)]
    argv += ["--serve", "127.0.0.1:0"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    idle: list[socket.socket] = []
    try:
        url = _wait_for_line(proc, "serving metrics on").split(" on ", 1)[1].split(";")[0]
        host, port = url.split("/")[2].split(":")
        for _ in range(MAX_CONNECTIONS):  # clients that connect and never send
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        time.sleep(0.5)
        with pytest.raises((http.client.HTTPException, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(url, timeout=10).read()
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + SERVE_WAIT_S
        while True:  # the slots free up as the idle connections' threads end
            try:
                with urllib.request.urlopen(url, timeout=10) as answer:
                    assert answer.status == 200
                break
            except (http.client.HTTPException, ConnectionError, urllib.error.URLError):
                assert time.monotonic() < deadline, "the server never recovered its slots"
                time.sleep(0.2)
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(timeout=SERVE_WAIT_S)
