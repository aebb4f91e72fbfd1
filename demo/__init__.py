"""The cacheagent demo: native Triton vs cacheagent (cold, then cached) on a local S3 emulator."""
