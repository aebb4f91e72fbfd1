"""Property tests: no input crashes the parsers with anything but the package's own errors."""

from hypothesis import given, settings
from hypothesis import strategies as st

from cacheagent.errors import CacheAgentError
from cacheagent.remote.credentials import longest_prefix_match
from cacheagent.remote.location import parse_location
from cacheagent.remote.manifest import build_manifest, validate_relpath

URLISH = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda s, rest: s + rest,
        st.sampled_from(["s3://", "gs://", "as://", "s3://http://", "x://"]),
        st.text(max_size=60),
    ),
)


@settings(max_examples=400, deadline=None)
@given(URLISH)
def test_location_parser_never_crashes(text):
    try:
        loc = parse_location(text, {})
    except CacheAgentError:
        return
    assert loc.scheme in {"s3", "gs", "as", "file"}
    assert "\x00" not in loc.root


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=8), st.text(max_size=40))
def test_prefix_match_returns_a_true_prefix_and_the_longest(names, url):
    found = longest_prefix_match(names, url)
    matching = [n for n in names if url.startswith(n)]
    if not matching:
        assert found is None
    else:
        assert found is not None and url.startswith(found) and len(found) == max(map(len, matching))


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_relpath_validation_accepts_only_contained_paths(relpath):
    try:
        safe = validate_relpath(relpath)
    except CacheAgentError:
        return
    parts = safe.split("/")
    assert not safe.startswith("/") and ".." not in parts and "" not in parts and "\\" not in safe


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=40), st.integers(0, 10**9), max_size=10))
def test_manifest_builder_never_crashes(names):
    listing = {"b/m/" + name: {"size": size, "ETag": '"e"'} for name, size in names.items()}
    try:
        manifest = build_manifest("s3://b/m", "b/m", listing)
    except CacheAgentError:
        return
    assert len(manifest.key) == 32
