"""The ``cacheagent`` command."""
