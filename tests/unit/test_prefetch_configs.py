"""How the background prefetch reads its siblings' configs: with Triton's schema."""

from __future__ import annotations

import os

from cacheagent.cache import Cache
from cacheagent.triton.prefetch import Prefetcher


def test_a_sibling_config_triton_refuses_is_skipped_with_its_line(tmp_path, caplog):
    caplog.set_level("INFO", logger="cacheagent")
    remote, stub, cache_dir = tmp_path / "remote", tmp_path / "stub", tmp_path / "cache"
    for name in ("a", "good", "typo"):
        (remote / name / "1").mkdir(parents=True)
        (remote / name / "1" / "w.bin").write_bytes(os.urandom(100))
        (stub / name).mkdir(parents=True)

    def config(name: str, extra: str = "") -> str:
        return (
            f'name: "{name}"\nbackend: "python"\n{extra}'
            'model_repository_agents { agents [ { name: "cacheagent", parameters [ '
            f'{{ key: "cache_dir", value: "{cache_dir}" }}, '
            f'{{ key: "source", value: "{remote / name}" }} ] }} ] }}\n'
        )

    (stub / "a" / "config.pbtxt").write_text(config("a"))
    (stub / "good" / "config.pbtxt").write_text(config("good"))
    typo = config("typo", "instance_group { kind: KIND_GPUU }\n")
    (stub / "typo" / "config.pbtxt").write_text(typo)
    caches: dict = {}
    prefetcher = Prefetcher(lambda d: caches.setdefault(d, Cache(d)))
    assert prefetcher.after_load(str(stub / "a"), "a")
    for thread in prefetcher.threads:
        thread.join(timeout=60)
    assert [r.model for r in Cache(cache_dir).snapshots()] == ["good"]
    err = caplog.text
    assert "prefetch of model 'typo' skipped: line 3, column 24: KIND_GPUU is no value" in err
