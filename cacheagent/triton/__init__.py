"""The Triton side: config, layout rules, parameters, actions, prefetch, stub, check,
worker, install, and the C shim."""
