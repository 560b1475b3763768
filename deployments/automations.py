"""Mark this project's flow runs ``Crashed`` when their process stops reporting.

    PREFECT_API_URL=http://localhost:4200/api python -m deployments.automations [--after S] [--pending-after S]

A worker watches the flow-run processes it starts and marks a run ``Crashed`` when its process
dies, but when the worker dies with it (a lost node, an evicted pod or container, a host
rebooted, a worker and its runs OOM-killed together) nothing is left to report: the run stays
``Running`` for ever. It then holds its slot of a work pool's or deployment's concurrency limit,
and a sweep never triggers its file again (it waits for a run that will not end).

Flow runs of deployments send a heartbeat event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
seconds (:data:`HEARTBEAT_S`, set by prefect.yaml, the job templates in infra/ and
deployments/serve.py). This saves the automation Prefect documents for self-hosted servers
("detect zombie flows"): a run tagged ``whisperx`` (every deployment of this project) with no
heartbeat and no final state for :data:`AFTER_S` seconds after its last heartbeat (or its start)
is set ``Crashed``. Prefect Cloud has the same as a managed automation ("Unresponsive run detection").
A second one covers the time before the run's process starts: a run a worker submitted
(``Pending``) that says nothing more for :data:`PENDING_AFTER_S` seconds is set ``Crashed`` too.
The next sweep triggers a crashed run's file again (up to ``max_attempts``); its finished
stages hit the shared cache.

Re-running updates the saved automations (their windows); called by infra/bootstrap.sh and
deployments/serve.py.
"""
from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import Any, Optional

NAME = "whisperx-crash-unresponsive-runs"
PENDING_NAME = "whisperx-crash-runs-stuck-pending"
TAG = "whisperx"  # every deployment of prefect.yaml and deployments/serve.py carries it
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of this project's flow runs (Prefect's minimum)
AFTER_S = 120  # four heartbeats missed: a run busy in native code still beats (the beat is a thread)
PENDING_AFTER_S = 1800  # submitted, never started: a GPU image pull and container start take minutes
MESSAGE = "no heartbeat for {after} s: its process, or the machine running it, was lost"
PENDING_MESSAGE = "Pending for {after} s without starting: its worker, or the machine it was starting on, was lost"
_FINAL = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
          "prefect.flow-run.Crashed")
_WAITING = ("prefect.flow-run.Paused", "prefect.flow-run.Suspended", "prefect.flow-run.AwaitingRetry")  # no beats


def _crash_when_silent(name: str, description: str, after: set[str], expect: set[str], after_s: int,
                       message: str) -> Any:
    """An automation: after an ``after`` event of a run tagged :data:`TAG`, expect an ``expect``
    event of the same run within ``after_s`` seconds, else set the run ``Crashed``."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=name,
        description=f"{description} Saved by deployments/automations.py.",
        trigger=EventTrigger(
            after=after, expect=expect,
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.tag.{TAG}"}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message.format(after=after_s))],
    )


def automation(after_s: int = AFTER_S) -> Any:
    """After a tagged run starts (``Running``) and after each of its heartbeats, another
    heartbeat (or a final state, or a pause) within ``after_s``. The start arms it too, so a
    run lost before its first heartbeat reached the server is caught as well; a run resumed
    from a pause is armed again by its ``Running``."""
    if after_s <= HEARTBEAT_S:
        raise ValueError(f"--after must be more than the heartbeat interval ({HEARTBEAT_S} s), "
                         f"or every running flow run would be marked Crashed: got {after_s}")
    return _crash_when_silent(
        NAME, f"Set a flow run tagged {TAG!r} Crashed when it sends no heartbeat for {after_s} s "
        f"(its flow runs beat every {HEARTBEAT_S} s).",
        {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
        {"prefect.flow-run.heartbeat", *_FINAL, *_WAITING}, after_s, MESSAGE)


def pending_automation(after_s: int = PENDING_AFTER_S) -> Any:
    """After a tagged run turns Pending (a worker submitted it), any event of it within
    ``after_s``: it started (Running), was rescheduled, or ended. A worker lost between
    submitting a run and its process starting leaves it Pending, before any heartbeat."""
    if after_s < 30:
        raise ValueError(f"--pending-after must be at least 30 s (a run needs that to start): got {after_s}")
    return _crash_when_silent(
        PENDING_NAME, f"Set a flow run tagged {TAG!r} Crashed when it stays Pending for {after_s} s "
        "with no other event (its worker was lost while starting it).",
        {"prefect.flow-run.Pending"}, {"prefect.flow-run.*"}, after_s, PENDING_MESSAGE)


def _save(wanted: Any, update: bool) -> str:
    from prefect.automations import Automation

    after = int(wanted.trigger.within.total_seconds())
    try:
        saved = Automation.read(name=wanted.name)
    except ValueError:  # none saved yet
        wanted.create()
        return f"saved    automation {wanted.name!r} ({after} s)"
    if not update:
        return f"kept     automation {wanted.name!r} ({int(saved.trigger.within.total_seconds())} s)"
    wanted.id = saved.id
    wanted.update()
    return f"updated  automation {wanted.name!r} ({after} s)"


def ensure(after_s: int = AFTER_S, pending_after_s: int = PENDING_AFTER_S, update: bool = True) -> str:
    """Save both automations, or update the ones saved before (``update=False``: leave them as
    they are); one line per automation saying which."""
    wanted = [automation(after_s), pending_automation(pending_after_s)]  # both valid before saving either
    return "\n".join(_save(a, update) for a in wanted)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deployments.automations", description=__doc__.split("\n\n")[0])
    p.add_argument("--after", type=int, default=AFTER_S, metavar="SECONDS",
                   help=f"mark a run Crashed this long after its last heartbeat (default {AFTER_S}; "
                        f"runs beat every {HEARTBEAT_S} s)")
    p.add_argument("--pending-after", type=int, default=PENDING_AFTER_S, metavar="SECONDS",
                   help=f"mark a run Crashed when it stays Pending this long with no other event "
                        f"(default {PENDING_AFTER_S})")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(ensure(args.after, args.pending_after))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
