"""The agent actions as the worker calls them, on real directories (no Triton here)."""

import os
import subprocess
import sys

import pytest

from cacheagent.errors import InvalidParameterError
from cacheagent.triton import actions
from harness.agent_requests import agent_request, write_start_record


def request(action, location, cache_dir, artifact="REMOTE_FILESYSTEM", **params):
    return agent_request(
        action, location, {"cache_dir": str(cache_dir), **params}, artifact=artifact
    )


@pytest.fixture
def logs():
    lines = []
    yield lines
    actions._CACHES.clear()


def make_model(root):
    for version in ("1", "2"):
        (root / version).mkdir(parents=True)
        (root / version / "model.py").write_text(f"# v{version}")
    (root / "config.pbtxt").write_text("name: 'add'")
    return root


def test_local_model_is_left_untouched(tmp_path, logs):
    model = make_model(tmp_path / "add")
    out = actions.handle(
        request("LOAD", model, tmp_path / "c", artifact="FILESYSTEM"), lambda *a: logs.append(a)
    )
    assert out is None


def test_source_parameter_fetches_even_for_a_local_stub(tmp_path, logs):
    model = make_model(tmp_path / "remote")
    out = actions.handle(
        request(
            "LOAD", tmp_path / "stub", tmp_path / "c", artifact="FILESYSTEM", source=str(model)
        ),
        lambda *a: logs.append(a),
    )
    assert out and (tmp_path / "c") in __import__("pathlib").Path(out).parents


def test_load_logs_one_line_and_leases_then_unload_releases(tmp_path, logs):
    model = make_model(tmp_path / "add")
    log = lambda level, msg: logs.append((level, msg))  # noqa: E731
    path = actions.handle(request("LOAD", model, tmp_path / "c"), log)
    assert sorted(os.listdir(path)) == ["2", "config.pbtxt"]  # default policy: latest 1
    info = [m for lvl, m in logs if lvl == "INFO"]
    assert len(info) == 1 and "model 'add' MISS" in info[0] and " s from " in info[0]
    cache = actions.cache_for(tmp_path / "c")
    assert [lease.model for lease in cache.leases()] == ["add"]
    actions.handle(request("UNLOAD_COMPLETE", model, tmp_path / "c"), log)
    assert cache.leases() == []
    assert os.path.isdir(path)  # kept across restarts by default
    logs.clear()
    actions.handle(request("LOAD", model, tmp_path / "c"), log)
    assert "HIT" in logs[0][1]


def test_versions_all_and_on_unload_evict(tmp_path, logs):
    model = make_model(tmp_path / "add")
    log = lambda level, msg: logs.append((level, msg))  # noqa: E731
    path = actions.handle(
        request("LOAD", model, tmp_path / "c", versions="all", on_unload="evict"), log
    )
    assert sorted(os.listdir(path)) == ["1", "2", "config.pbtxt"]
    actions.handle(
        request("UNLOAD_COMPLETE", model, tmp_path / "c", versions="all", on_unload="evict"), log
    )
    assert not os.path.exists(path)


def test_load_fail_releases_lease(tmp_path, logs):
    model = make_model(tmp_path / "add")
    actions.handle(request("LOAD", model, tmp_path / "c"), lambda *a: None)
    actions.handle(request("LOAD_FAIL", model, tmp_path / "c"), lambda *a: None)
    cache = actions.cache_for(tmp_path / "c")
    assert cache.leases() == []


def test_bad_parameter_fails_the_load(tmp_path, logs):
    model = make_model(tmp_path / "add")
    with pytest.raises(InvalidParameterError, match=r"model 'add'.*'max_size'"):
        actions.handle(request("LOAD", model, tmp_path / "c", max_size="huge"), lambda *a: None)


def test_a_fresh_worker_lists_before_it_imports_the_cache(tmp_path):
    # The first LOAD of a fresh worker starts its listing before the cache, its
    # SQLite index and the download pool are imported, so the storage round trip
    # overlaps that work (bench/README.md has the timings; here only the order).
    probe = (
        "import sys, cacheagent.triton.worker, cacheagent.triton.actions\n"
        "heavy = ('cacheagent.cache', 'diskcache', 'sqlite3', 'concurrent.futures',\n"
        "         'cacheagent.triton.prefetch', 'google.protobuf', 'fsspec')\n"
        "print(' '.join(m for m in heavy if m in sys.modules) or 'none')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "none"


@pytest.mark.parametrize("start", ["every model", "explicit", "none"])
def test_a_load_the_start_listing_validated_starts_no_sibling_prefetch(
    tmp_path, logs, monkeypatch, start
):
    """Under 'cacheagent run' the launcher fetches every model of the start's listing
    itself: the LOAD answers without building the prefetcher (its storage client's
    imports were 30 ms between the HIT and Triton's "loading:"). In explicit mode it
    fetches the --load-model models alone, and without a start record there is no
    start fetch: the LOAD then still hands its siblings to the prefetcher."""
    from cacheagent.triton.startlisting import START_ALL_ENV, START_ENV

    model = make_model(tmp_path / "remote" / "add")
    if start != "none":
        write_start_record(tmp_path / "c" / "starts" / "1-ab", model)
        monkeypatch.setenv(START_ENV, str(tmp_path / "c" / "starts" / "1-ab"))
    if start == "every model":
        monkeypatch.setenv(START_ALL_ENV, "1")
    handed: list[str] = []

    class Tripwire:  # records what a real prefetcher would have been given
        def after_load(self, location, name):
            handed.append(name)

    monkeypatch.setattr(actions, "prefetcher", Tripwire)
    stub = tmp_path / "stub" / "add"
    stub.mkdir(parents=True)
    out = actions.handle(
        request("LOAD", stub, tmp_path / "c", artifact="FILESYSTEM", source=str(model)),
        lambda *a: logs.append(a),
    )
    assert out and sorted(os.listdir(out)) == ["2", "config.pbtxt"]
    validated = any("validated by this start's listing" in m for _lvl, m in logs)
    assert validated == (start != "none")
    assert handed == ([] if start == "every model" else ["add"])
