"""Thin Prefect task wrappers around :mod:`speech`: retries, caching, artifacts, logging."""
from tasks.common import send_engine_logs_to_prefect

send_engine_logs_to_prefect()  # the engine's log records show in each run's logs
