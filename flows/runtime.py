"""What every flow run does first, whichever flow it is: the original worker's env switches,
and erasing tokens passed as plain parameters from the stored flow run."""
from __future__ import annotations

import logging
from typing import Any, Optional

from prefect.logging import get_run_logger

from speech.schema import SECRET_FIELDS
from speech.settings import get_settings

MASK = "**********"  # what Prefect stores for a SecretStr parameter


def set_console_level(level: str | int) -> None:
    """Level of Prefect's console handlers (on the root logger in Prefect's default logging
    config, on prefect loggers in custom ones); the API handlers are left alone."""
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ == "PrefectConsoleHandler":
                handler.setLevel(level)


def apply_runtime_switches() -> None:
    """The original worker's env switches, once per flow run: CONSOLE_LOG_LEVEL (the console
    handler's level only; the Prefect API still receives every log) and PRINT_MOUNTS."""
    settings = get_settings()
    if settings.console_log_level:
        set_console_level(settings.console_log_level)
    if settings.print_mounts:
        from speech.output.report import mounted_volumes

        get_run_logger().info("mounts:\n%s", "\n".join(mounted_volumes()))


def redact_stored_secrets(given: dict[str, Any], nested: Optional[str] = None) -> None:
    """A token the run was given as a plain parameter (``given``: the request fields, stored at
    the top level or, e.g. for a batch, under the parameter ``nested``) is used for this run but
    erased from the stored flow-run parameters.

    (Passed as ``SecretStr`` it is stored masked from the start; the CLI does that.)
    """
    if not any(isinstance(given.get(k), str) and given.get(k) not in ("", MASK) for k in SECRET_FIELDS):
        return
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    stored = dict(ctx.flow_run.parameters)
    target = dict(stored.get(nested) or {}) if nested else stored
    for k in SECRET_FIELDS:
        if target.get(k):
            target[k] = MASK
    if nested:
        stored[nested] = target
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, parameters=stored)
