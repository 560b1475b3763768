"""Thin Prefect task wrappers around :mod:`speech`: retries, caching, artifacts, logging."""
