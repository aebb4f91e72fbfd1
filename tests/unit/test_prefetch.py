"""Background prefetch of a repository's other models, on real directories."""

import os

from cacheagent.cache import Cache
from cacheagent.triton.config import agent_parameters, config_json, parse_config
from cacheagent.triton.layout import version_dirs
from cacheagent.triton.prefetch import Prefetcher


def agent_config(name, params, policy="latest { num_versions: 1 }"):
    items = ", ".join(f'{{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return (
        f'name: "{name}"\nbackend: "python"\nversion_policy: {{ {policy} }}\n'
        "model_repository_agents { agents [ "
        f'{{ name: "cacheagent", parameters [ {items} ] }} ] }}\n'
    )


def test_agent_parameters_and_policy_from_pbtxt():
    config = parse_config(
        agent_config("m", {"cache_dir": "/c", "max_size": "1GB"}, "specific { versions: 3 }")
    )
    assert agent_parameters(config) == {"cache_dir": "/c", "max_size": "1GB"}
    # Triton's JSON shape: a lone version still comes as a list.
    assert config_json(config) == {"name": "m", "version_policy": {"specific": {"versions": [3]}}}
    assert agent_parameters(parse_config('name: "x"')) is None


def test_siblings_named_cacheagent_are_fetched_in_the_background(tmp_path):
    remote = tmp_path / "remote"
    stub = tmp_path / "stub"
    cache_dir = tmp_path / "cache"
    for name in ("a", "b", "c"):
        for version in ("1", "2"):
            (remote / name / version).mkdir(parents=True)
            (remote / name / version / "w.bin").write_bytes(os.urandom(1000))
        (stub / name).mkdir(parents=True)
    params = {"cache_dir": str(cache_dir)}
    (stub / "a" / "config.pbtxt").write_text(
        agent_config("a", {**params, "source": str(remote / "a")})
    )
    (stub / "b" / "config.pbtxt").write_text(
        agent_config("b", {**params, "source": str(remote / "b")})
    )
    (stub / "c" / "config.pbtxt").write_text('name: "c"\nbackend: "python"\n')  # no agent: skipped
    caches = {}

    def cache_for(cache_dir):
        return caches.setdefault(cache_dir, Cache(cache_dir))

    prefetcher = Prefetcher(cache_for)
    assert prefetcher.after_load(str(stub / "a"), "a")
    assert not prefetcher.after_load(str(stub / "b"), "b")  # one prefetch per repository
    for thread in prefetcher.threads:
        thread.join(timeout=60)
    records = Cache(cache_dir).snapshots()
    assert [r.model for r in records] == ["b"]
    paths = [row[0] for row in records[0].files]
    assert version_dirs(paths, records[0].empty_dirs) == ["2"]  # its own policy: latest 1
