"""The rig shared by tests, benchmarks and the demo.

Storage emulators, the counting and link-shaping proxy, and a real tritonserver runner.
Nothing user-facing (the ``cacheagent`` package) imports it.
"""
