"""Callers who do not trust each other share one RunPod-compatible endpoint, each with a key of its
own (``ENDPOINT_API_KEYS``): none can read, stream, cancel or purge another's jobs (a foreign job
id answers exactly as an unknown one), fill the queue for the others, or push another's unread
results out of the endpoint's memory, or name shared outputs (``output_name``) another could
replace; in the in-process mode a free worker takes the callers'
jobs in turn. Driven over real HTTP in the in-process mode, on real flow runs of a deployment
(a restarted endpoint still knows whose run is whose), and through ``main`` as an operator
starts it. The task-worker mode's share is checked on a real worker in ``test_runpod_tasks``."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import requests

from conftest import DATA, serving_runpod_api
from deployments.callers import Callers

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-9876543210"}
BODY = {"input": {"audio_file": "https://example.com/a.wav"}}


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def _wait(check, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_keys_are_read_strictly_and_never_echoed(monkeypatch, capsys, tmp_path):
    callers = Callers.from_env({"ENDPOINT_API_KEYS": " alice:alice-key-0123456789,\nbob:bob-key-9876543210 ,",
                                "ENDPOINT_API_KEY": "old-single-key"})
    assert callers.keys == {**KEYS, "default": "old-single-key"}
    assert callers.who("bob-key-9876543210") == "bob" and callers.who("old-single-key") == "default"
    assert callers.who("bob-key-987654321") is None and callers.who("") is None
    assert Callers.from_env({}) is None
    listed = tmp_path / "keys"
    listed.write_text("# the callers of this endpoint\nalice: alice-key-0123456789\n\nbob:bob-key-9876543210\n")
    assert Callers.from_env({"ENDPOINT_API_KEYS_FILE": str(listed)}).keys == KEYS
    for env, error in (({"ENDPOINT_API_KEYS_FILE": str(tmp_path / "missing")}, "cannot be read: FileNotFoundError"),
                       ({"ENDPOINT_API_KEYS_FILE": str(listed), "ENDPOINT_API_KEYS": "c:d"}, "not both")):
        with pytest.raises(ValueError, match=error):
            Callers.from_env(env)
    for value, error in {"alice": "entry 1 is not name:key", "alice:secret-a,alice:secret-b": "alice twice",
                         "alice:secret-a,bob:secret-a": "same key", "al ice:secret-a": "caller name",
                         "alice:": "empty key", "default:secret-a": None}.items():
        env = {"ENDPOINT_API_KEYS": value, "ENDPOINT_API_KEY": "old-single-key"}
        if error is None:
            with pytest.raises(ValueError, match="must not name it too"):
                Callers.from_env(env)
            continue
        with pytest.raises(ValueError, match=error) as caught:
            Callers.from_env(env)
        assert "secret-" not in str(caught.value)

    from deployments.runpod_api import main

    monkeypatch.setenv("ENDPOINT_API_KEYS", "alice:secret-a,bob:secret-a")
    with pytest.raises(SystemExit):
        main(["--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert "alice and bob have the same key" in err and "secret-a" not in err


def test_main_gives_each_caller_an_equal_share_of_the_queue(monkeypatch):
    """What an operator starts: the keys from the environment, --max-queued split between them."""
    import uvicorn

    from deployments.runpod_api import main

    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.setenv("ENDPOINT_API_KEYS", ",".join(f"{k}:{v}" for k, v in KEYS.items()))
    monkeypatch.setenv("ENDPOINT_API_KEY", "old-single-key")
    # main() closes s3:// sources in this process's environment (several callers): undone after the
    # test, so later tests and the processes they start do not inherit it
    monkeypatch.setenv("ALLOW_S3_SOURCES", "")
    monkeypatch.delenv("ALLOW_S3_SOURCES")
    assert main(["--host", "0.0.0.0", "--max-queued", "10"]) == 0
    assert os.environ["ALLOW_S3_SOURCES"] == "none"
    from starlette.testclient import TestClient

    client = TestClient(started["app"], base_url="http://127.0.0.1")
    assert client.post("/v2/e/purge-queue", headers=_auth("bob")).json()["removed"] == 0
    assert client.post("/v2/e/purge-queue", headers={"Authorization": "Bearer x"}).status_code == 401
    jobs = started["app"].state.jobs
    assert (jobs.max_queued, jobs.per_caller) == (10, 3)  # 3 callers: alice, bob, default
    assert started["app"].state.max_waits == 1000 // 6  # half of each caller's share of --max-connections
    monkeypatch.delenv("ENDPOINT_API_KEYS")
    assert main(["--max-queued", "10"]) == 0
    assert started["app"].state.jobs.per_caller == 10  # one caller: the whole queue
    assert main(["--max-queued", "10", "--max-queued-per-caller", "4"]) == 0
    assert started["app"].state.jobs.per_caller == 4


def test_callers_see_only_their_own_jobs_and_take_turns(roots_in_process):
    """One worker busy with alice's first job; alice queues two more, then bob one: bob's runs
    next. bob cannot read, stream, cancel or purge alice's jobs; his purge removes only his own."""
    from deployments.runpod_api import Jobs

    release, order = threading.Event(), []

    def run(job, job_id):
        order.append(job["input"]["tag"])
        release.wait(60)
        return {"tag": job["input"]["tag"]}

    table = Jobs(run, workers=1)
    with serving_runpod_api(Callers(KEYS), table) as base:
        def send(name: str, tag: str) -> str:
            body = {"input": {**BODY["input"], "tag": tag}}
            reply = requests.post(f"{base}/e/run", json=body, headers=_auth(name), timeout=30)
            assert reply.status_code == 200, reply.text
            return reply.json()["id"]

        a1 = send("alice", "a1")
        _wait(lambda: order == ["a1"])
        a2, a3, b1 = send("alice", "a2"), send("alice", "a3"), send("bob", "b1")
        unknown = requests.get(f"{base}/e/status/00000000-0000-4000-8000-000000000000-u1", headers=_auth("bob"),
                               timeout=30)
        for route, method in (("status", "get"), ("stream", "get"), ("cancel", "post")):
            reply = getattr(requests, method)(f"{base}/e/{route}/{a2}", headers=_auth("bob"), timeout=30)
            assert reply.status_code == 404 == unknown.status_code, (route, reply.text)
            assert reply.json() == {"error": f"no job {a2}"}  # the same answer as for an id that never existed
        assert requests.post(f"{base}/e/run", json=BODY, headers={"Authorization": "Bearer alice-key"},
                             timeout=30).json() == {"error": "Unauthorized"}
        shared = requests.post(f"{base}/e/run", json={"input": {**BODY["input"], "output_name": "report"}},
                               headers=_auth("bob"), timeout=30)  # alice's report.json would be bob's to replace
        assert shared.status_code == 400 and "output_name asks for outputs every caller" in shared.json()["error"]
        mine = requests.get(f"{base}/e/status/{a2}", headers=_auth("alice"), timeout=30).json()
        assert mine["status"] == "IN_QUEUE"
        release.set()
        for job, name in ((a1, "alice"), (a2, "alice"), (a3, "alice"), (b1, "bob")):
            _wait(lambda: table.view(job)["status"] == "COMPLETED")
        assert order == ["a1", "b1", "a2", "a3"]  # bob's one job did not wait for alice's backlog

        release.clear()
        send("alice", "a4")
        _wait(lambda: order[-1] == "a4")
        a5, b2 = send("alice", "a5"), send("bob", "b2")
        purged = requests.post(f"{base}/e/purge-queue", headers=_auth("bob"), timeout=30).json()
        assert purged == {"removed": 1, "status": "completed"}
        assert table.view(a5)["status"] == "IN_QUEUE" and table.view(b2)["status"] == "CANCELLED"
        release.set()
        _wait(lambda: table.view(a5)["status"] == "COMPLETED")


def test_no_caller_fills_the_queue_or_the_memory_for_another(roots_in_process):
    """--max-queued 4, 2 per caller: alice's third waiting job is refused (429) while bob still
    gets in; with --keep 2, alice's many finished jobs never push out bob's unread result."""
    from deployments.runpod_api import Jobs

    release = threading.Event()
    table = Jobs(lambda job, job_id: {"done": release.wait(60)}, workers=1, keep=2, max_queued=4, per_caller=2)
    with serving_runpod_api(Callers(KEYS), table) as base:
        def post(name: str) -> requests.Response:
            return requests.post(f"{base}/e/run", json=BODY, headers=_auth(name), timeout=30)

        first = post("alice").json()["id"]
        _wait(lambda: table.view(first)["status"] == "IN_PROGRESS")
        assert post("alice").status_code == post("alice").status_code == 200
        full = post("alice")
        assert full.status_code == 429 and full.headers["Retry-After"] == "5"
        assert "your share of the queue is full: 2 of your jobs wait" in full.json()["error"]
        bobs = post("bob")
        assert bobs.status_code == 200, bobs.text
        release.set()
        bob_job = bobs.json()["id"]
        _wait(lambda: table.view(bob_job)["status"] == "COMPLETED")
        for _ in range(6):  # alice keeps sending; her oldest results go, bob's stays
            job = post("alice").json()["id"]
            _wait(lambda: table.view(job)["status"] == "COMPLETED")
        assert requests.get(f"{base}/e/status/{bob_job}", headers=_auth("bob"), timeout=30).json()["output"] == {
            "done": True}
        assert sum(s["caller"] == "alice" for s in table.jobs.values()) == 2


def test_no_caller_takes_the_connections_of_another_with_parked_waits(roots_in_process):
    """At most 2 runsync calls of a caller wait at once: alice's third answers at once with its
    job's status (she polls /status, as after any runsync wait), bob's runsync still waits for
    his job and returns its output."""
    import concurrent.futures

    from deployments.runpod_api import Jobs

    release = threading.Event()
    table = Jobs(lambda job, job_id: {"done": release.wait(60)}, workers=4)
    with serving_runpod_api(Callers(KEYS), table, max_waits=2) as base:
        def runsync(name: str) -> requests.Response:
            return requests.post(f"{base}/e/runsync?wait=60000", json=BODY, headers=_auth(name), timeout=90)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            parked = [pool.submit(runsync, "alice") for _ in range(2)]
            _wait(lambda: table.counts()["inProgress"] == 2)
            start = time.monotonic()
            third = runsync("alice")
            assert time.monotonic() - start < 5 and third.json()["status"] == "IN_PROGRESS", third.text
            bobs = pool.submit(runsync, "bob")
            _wait(lambda: table.counts()["inProgress"] == 4)
            time.sleep(0.5)
            assert not bobs.done()  # parked, not answered at once
            release.set()
            assert bobs.result().json()["output"] == {"done": True}
            assert all(f.result().json()["status"] == "COMPLETED" for f in parked)


@pytest.fixture
def roots_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv("ALLOW_LOCAL_PATHS", str(DATA))
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "results"))


@pytest.mark.prefect
def test_deployment_runs_belong_to_the_caller_who_sent_them(prefect_harness, monkeypatch):
    """--deployment: each flow run carries its caller's tag (never the key); another caller
    cannot read or cancel it, a purge stays within the caller's runs, each caller's share is
    counted from the Prefect API, and a new endpoint process (a restart) still knows the owner."""
    from prefect.client.orchestration import get_client

    from deployments.runpod_jobs import DeploymentJobs, QueueFull
    from flows.transcribe import transcribe_audio

    monkeypatch.setenv("ALLOW_LOCAL_PATHS", str(DATA))
    deployment_id = transcribe_audio.to_deployment(name="callers").apply()  # no worker: runs wait
    table = DeploymentJobs("transcribe-audio/callers", per_caller=2)
    body = {"input": {"audio_file": str(DATA / "enrol_slt.wav")}}
    try:
        alice = [table.submit(body, "alice") for _ in range(2)]
        with pytest.raises(QueueFull, match="your share of the queue is full: 2 of your jobs"):
            table.submit(body, "alice")
        bob = table.submit(body, "bob")
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(alice[0])
        assert "runpod-caller:alice" in run.tags and not any(KEYS["alice"] in t for t in run.tags)
        restarted = DeploymentJobs("transcribe-audio/callers")
        assert restarted.view(alice[0], "alice")["status"] == "IN_QUEUE"
        assert restarted.view(alice[0], "bob") is None and restarted.cancel(alice[0], "bob") is None
        assert restarted.purge("bob") == 1
        assert [restarted.view(i, "alice")["status"] for i in alice] == ["IN_QUEUE", "IN_QUEUE"]
        assert restarted.view(bob, "bob")["status"] == "CANCELLED"
        assert restarted.cancel(alice[1], "alice")["status"] == "CANCELLED"
        refused = table.submit({"input": {"audio_file": "/etc/passwd"}}, "alice")
        assert table.view(refused, "bob") is None and table.view(refused, "alice")["status"] == "FAILED"
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)


@pytest.mark.prefect
def test_deployment_runs_of_several_callers_take_turns_on_the_pool(prefect_harness, monkeypatch):
    """--deployment with two callers: alice sends 3 jobs, then bob 1, to a pool whose workers
    take one at a time. One run is released ahead of the workers, the rest are held (Scheduled,
    AwaitingTurn, hours ahead: no worker takes them); each time a worker takes the released run,
    the next goes to the caller served longest ago, so bob's job is second, not fourth. A new
    endpoint (a restart) goes on releasing what the first one held. The "worker" here sets the
    Prefect states a process worker sets (Pending, Running); a cancelled held job is never
    released, not even by a release that read it before the cancel."""
    import datetime as dt

    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    from deployments.runpod_jobs import DeploymentJobs
    from deployments.turns import HELD, HOLD_S
    from flows.transcribe import transcribe_audio

    monkeypatch.setenv("ALLOW_LOCAL_PATHS", str(DATA))
    deployment_id = transcribe_audio.to_deployment(name="turns").apply()  # no worker: runs wait
    table = DeploymentJobs("transcribe-audio/turns", callers=["alice", "bob"], ahead=1)
    body = {"input": {"audio_file": str(DATA / "enrol_slt.wav")}}
    try:
        with get_client(sync_client=True) as client:
            def released() -> list[str]:  # jobs waiting for a worker, not held
                return [i for i in alice + bob if (s := client.read_flow_run(i).state).type.value == "SCHEDULED"
                        and s.name != HELD]

            def worker_takes(job: str) -> None:
                for state in (Pending(), Running()):
                    client.set_flow_run_state(job, state)

            alice = [table.submit(body, "alice") for _ in range(3)]
            bob = [table.submit(body, "bob")]
            assert released() == [alice[0]]
            held = client.read_flow_run(alice[1]).state
            assert held.name == HELD and held.state_details.scheduled_time > dt.datetime.now(dt.timezone.utc) + \
                dt.timedelta(seconds=HOLD_S - 60)
            assert {table.view(i)["status"] for i in alice + bob} == {"IN_QUEUE"}
            table.turns.start()  # as the endpoint does
            worker_takes(alice[0])
            _wait(lambda: len(released()) == 1, 30)  # the releaser, in the background
            assert released() == [bob[0]]

            table.turns.stop()  # the endpoint stops; a new one starts
            worker_takes(bob[0])
            table = DeploymentJobs("transcribe-audio/turns", callers=["alice", "bob"], ahead=1)
            table.turns.start()
            _wait(lambda: len(released()) == 1, 30)
            assert released() == [alice[1]]

            stale = client.read_flow_run(alice[2])  # a release that read it before the cancel
            assert table.cancel(alice[2], "alice")["status"] == "CANCELLED"
            assert table.turns._release(client, stale) is False
            worker_takes(alice[1])
            time.sleep(3)  # looks of the releaser: nothing left to release
            assert released() == [] and client.read_flow_run(alice[2]).state.type.value == "CANCELLED"

        # a release that fails right after a job was made does not fail the job's /run (a warning;
        # the background releaser tries again)
        from deployments.turns import Turns

        said: list[str] = []  # Prefect's logging setup replaces the root handlers (caplog's) mid-test
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: said.append(record.getMessage())
        logging.getLogger("deployments.turns").addHandler(handler)
        try:
            Turns("transcribe-audio/no-such", ["alice", "bob"], ["runpod-api"]).release_soon()
        finally:
            logging.getLogger("deployments.turns").removeHandler(handler)
        assert said == ["releasing held runs of transcribe-audio/no-such: LookupError: no deployment "
                        "transcribe-audio/no-such on this Prefect API"], said
    finally:
        table.turns.stop()
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)


def test_a_purge_goes_past_the_apis_page_of_200():
    """The Prefect API lists 200 runs at most (and refuses a larger limit): a purge reads page after
    page until none is left, so 450 queued jobs are all cancelled."""
    from types import SimpleNamespace

    from deployments.runpod_jobs import PAGE, cancel_pages

    queued = [SimpleNamespace(id=i) for i in range(450)]
    cancelled: list[int] = []
    assert cancel_pages(lambda: [r for r in queued if r.id not in cancelled][:PAGE], cancelled.append) == 450
    assert sorted(cancelled) == list(range(450))


class _Tarpit:
    """A webhook receiver that reads the request and does not answer until ``stop`` is set (then
    200, so that deliveries still queued when a test ends finish at once)."""

    def __init__(self):
        import socketserver

        stop = self.stop = threading.Event()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.recv(65536)
                if stop.wait(60):
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_a_callers_slow_webhook_receiver_delays_only_its_own_webhooks(roots_in_process, monkeypatch):
    """alice's 8 jobs name a receiver that never answers, bob's one a working receiver: bob's
    webhook arrives at once (his own delivery threads), and each of alice's deliveries is given up
    at its deadline (every attempt together), not after minutes of timeouts and retries."""
    import deployments.webhooks as webhooks
    from deployments.runpod_api import Jobs
    from speech.settings import get_settings
    from test_runpod_routes import Receiver

    monkeypatch.setenv("FETCH_ALLOW_HOSTS", "127.0.0.1")  # both receivers are on this machine
    get_settings.cache_clear()
    tarpit, receiver = _Tarpit(), Receiver()
    start = time.monotonic()
    assert webhooks.deliver(tarpit.url, {"id": "x", "status": "COMPLETED"}, max_seconds=2) is False
    assert 2 <= time.monotonic() - start < 7
    monkeypatch.setattr(webhooks, "MAX_SECONDS", 6.0)
    with serving_runpod_api(Callers(KEYS), Jobs(lambda job, job_id: {"done": True}, workers=2)) as base:
        for _ in range(8):
            assert requests.post(f"{base}/e/run", json={**BODY, "webhook": tarpit.url}, headers=_auth("alice"),
                                 timeout=30).status_code == 200
        time.sleep(1.5)  # alice's deliveries have begun: her 4 threads wait on the tarpit
        sent = time.monotonic()
        job = requests.post(f"{base}/e/run", json={**BODY, "webhook": receiver.url}, headers=_auth("bob"),
                            timeout=30).json()["id"]
        assert receiver.wait(1, seconds=30)[0]["id"] == job
        assert time.monotonic() - sent < 4  # the watcher looks every second; alice's 8 would take >= 12 s
        tarpit.stop.set()
    get_settings.cache_clear()
