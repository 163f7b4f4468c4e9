"""Alerts: real fits posting to a real HTTP server on 127.0.0.1 (good, slow, failing, closed port)."""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import pytorch_lightning as pl
from models import DigitsMLP, trainer

import gradwatch
from gradwatch import ConfigError
from gradwatch.findings import Action, Finding
from gradwatch.sinks import read_events
from gradwatch.sinks.alerts import Alerts

SECRET = "/services/T000/B000/s3cr3t-token"
FIELDS = {"text", "kind", "rule", "severity", "step", "layer", "message", "advice", "run", "host"}


class Server:
    """A webhook on 127.0.0.1 that records each POSTed JSON body; ``status``/``delay`` set its behaviour."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status, self.delay = status, delay
        self.bodies: list[dict] = []
        self.requests = 0
        self.done = 0  # responses completed
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(owner.delay)
                if owner.status == 200:
                    owner.bodies.append(json.loads(body))
                self.send_response(owner.status)
                self.end_headers()
                owner.done += 1

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{SECRET}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers: list[Server] = []

    def make(**kw) -> Server:
        servers.append(Server(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _alert_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("gradwatch alerts:")]


class ActAt(pl.Callback):
    """Records one remedy action at ``step`` through the monitor's public ``record_action`` (the action
    path remedies use), so that an action alert is exercised whatever remedies this version has."""

    def __init__(self, mon: gradwatch.HealthMonitor, step: int) -> None:
        self.mon, self.step = mon, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:  # global_step is already incremented here
            self.mon.monitor.record_action(
                Action("skip_step", self.step, "nonfinite", {"skipped": 1}, message="skipped the NaN step")
            )


def test_good_server_gets_finding_action_and_final_message(tmp_path, loaders, server_factory, gw_log):
    server = server_factory()
    received: list[dict] = []
    mon = gradwatch.HealthMonitor(
        every_n_steps=5, remedies="off", alert_url=server.url, alerts=[received.append], name="exp-1"
    )
    t = trainer(tmp_path, [mon, ActAt(mon, 3)], max_steps=10)
    t.fit(DigitsMLP(nan_at_step=3), loaders[0])

    assert server.bodies == received  # every target gets the same messages
    kinds = [b["kind"] for b in server.bodies]
    assert sorted(kinds[:-1]) == ["action", "finding"] and kinds[-1] == "summary"
    finding = next(b for b in server.bodies if b["kind"] == "finding")
    assert FIELDS <= set(finding)
    assert (finding["rule"], finding["severity"], finding["step"], finding["layer"]) == (
        "nonfinite",
        "critical",
        3,
        "net.0",
    )
    assert finding["run"] == "exp-1" and finding["host"] == socket.gethostname()
    assert "NaN" in finding["advice"] and "nonfinite" in finding["text"] and finding["message"]
    action = next(b for b in server.bodies if b["kind"] == "action")
    assert (action["remedy"], action["rule"], action["step"]) == ("skip_step", "nonfinite", 3)
    final = server.bodies[-1]
    assert (final["status"], final["verdict"]) == ("finished", "critical")
    assert final["summary"]["rules"][0]["rule"] == "nonfinite" and "finished" in final["text"]
    # the weights finding at step 5 is the same (rule, layer): de-duplicated, counted in the final message
    assert len(mon.findings) == 2 and kinds.count("finding") == 1 and final["suppressed"] == 1
    # the URL is a secret: not in the log, the events file or TensorBoard
    assert all(SECRET not in r.getMessage() for r in gw_log.records)
    assert SECRET not in open(mon.events_path).read()
    for path in glob.glob(os.path.join(t.logger.log_dir, "**", "*"), recursive=True):
        if os.path.isfile(path):
            assert SECRET.encode() not in open(path, "rb").read(), path


def test_slow_server_does_not_block_training(tmp_path, loaders, server_factory):
    server = server_factory(delay=1.5)
    seen: dict[str, float] = {}

    class When(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            seen["responses_at_train_end"] = server.done
            seen["requests_at_train_end"] = server.requests

    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off", alert_url=server.url)
    start = time.monotonic()
    trainer(tmp_path, [mon, When()], max_steps=10).fit(DigitsMLP(nan_at_step=3), loaders[0])
    elapsed = time.monotonic() - start
    # training ran to its end while the server was still sleeping on the first alert
    assert seen == {"responses_at_train_end": 0, "requests_at_train_end": 1}
    # at fit end the worker is given a bounded wait; the finding and the final message were delivered
    assert [b["kind"] for b in server.bodies] == ["finding", "summary"]
    assert elapsed < 15


def test_failing_server_retries_then_logs_once_and_events_are_complete(
    tmp_path, loaders, server_factory, gw_log
):
    server = server_factory(status=500)
    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off", alert_url=server.url)
    t = trainer(tmp_path, [mon, ActAt(mon, 3)], max_steps=10)
    t.fit(DigitsMLP(nan_at_step=3), loaders[0])
    # first alert: 1 try + 2 retries; the endpoint is then known dead: one try per later alert
    # (the action, the finding, the final message)
    assert server.requests == 3 + 2
    lines = _alert_lines(gw_log)
    assert len(lines) == 1 and "HTTP 500" in lines[0] and "after 3 attempt(s)" in lines[0]
    assert "http://127.0.0.1/..." in lines[0] and SECRET not in lines[0]
    kinds = [e["kind"] for e in read_events(mon.events_path)]
    assert kinds == ["action", "finding", "finding", "summary"]


def test_closed_port_logs_once_and_training_finishes(tmp_path, loaders, gw_log):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mon = gradwatch.HealthMonitor(
        every_n_steps=5, remedies="off", alert_url=f"http://127.0.0.1:{port}{SECRET}"
    )
    trainer(tmp_path, [mon], max_steps=10).fit(DigitsMLP(nan_at_step=3), loaders[0])
    lines = _alert_lines(gw_log)
    assert len(lines) == 1 and "ConnectionRefusedError" in lines[0] and SECRET not in lines[0]
    assert [e["kind"] for e in read_events(mon.events_path)][-1] == "summary"
    assert mon.findings[0].rule == "nonfinite"


def test_raising_callable_does_not_reach_training(tmp_path, loaders, gw_log):
    def broken(payload: dict) -> None:
        raise RuntimeError("channel down")

    got: list[dict] = []
    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off", alerts=[broken, got.append])
    trainer(tmp_path, [mon], max_steps=10, logger=False).fit(DigitsMLP(nan_at_step=3), loaders[0])
    assert [p["kind"] for p in got] == ["finding", "summary"]  # the other target is unaffected
    lines = _alert_lines(gw_log)
    assert len(lines) == 1 and "RuntimeError: channel down" in lines[0]


def _finding(layer: str, severity: str = "warning") -> Finding:
    return Finding("dead_units", severity, 7, 0, layer, f"{layer} is dead", {"frac": 1.0}, "lower the lr")


def test_rate_limit_severity_filter_and_bounded_close(server_factory, gw_log):
    got: list[dict] = []
    sink = Alerts([got.append], run="r", rate_limit=2, rate_period=60)
    sink.start({})
    sink.finding(_finding("a", "info"))  # info findings are not alerts
    for layer in ("a", "b", "c", "d"):
        sink.finding(_finding(layer))
    sink.summary({"status": "failed", "verdict": "warnings", "steps": 8, "rules": [], "actions": []})
    sink.close()
    assert [(p["kind"], p["layer"]) for p in got] == [("finding", "a"), ("finding", "b"), ("summary", None)]
    assert got[-1]["suppressed"] == 2 and "run failed" in got[-1]["text"]

    hanging = server_factory(delay=5)
    sink = Alerts([hanging.url], close_timeout=0.5, timeout=10)
    sink.start({})
    sink.finding(_finding("a"))
    start = time.monotonic()
    sink.close()
    assert time.monotonic() - start < 2
    assert any("gave up waiting" in line for line in _alert_lines(gw_log))


@pytest.mark.parametrize(
    "alerts, match",
    [
        ("https://hooks.slack.com/x", r"alerts must be a list of URLs and/or callables, got str"),
        (["hooks.slack.com/x"], r"alerts\[0\] must be an http\(s\) URL.*Write e\.g\. alerts=\["),
        ([print, 3], r"alerts\[1\] must be an http\(s\) URL string or a callable.*got int"),
    ],
)
def test_bad_alert_targets_fail_at_construction(alerts, match):
    with pytest.raises(ConfigError, match=match):
        gradwatch.HealthMonitor(alerts=alerts)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hooks/SECRET x?token=TOKEN",  # a space: http.client's InvalidURL quotes the path
        "http://user:SECRET@127.0.0.1:TOKEN/hook",  # a bad port: urllib quotes 'SECRET@127.0.0.1:TOKEN'
        "http://127.0.0.1:9/hooks/SECRET?token=TOKEN",  # connection refused
    ],
    ids=["space", "userinfo_port", "refused"],
)
def test_no_log_line_carries_the_urls_secret(url, caplog):
    """A delivery that fails for any reason is reported by scheme and host only: never the path, the
    query or the userinfo, whatever urllib's own message quotes."""

    from gradwatch.findings import Finding, Severity
    from gradwatch.sinks.alerts import Alerts

    sink = Alerts([url], retries=0, timeout=1, close_timeout=5)
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        sink.start({"run": "r"})
        sink.finding(Finding("nonfinite", Severity.CRITICAL, 3, 0, None, "m", {}, "a"))
        sink.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "could not deliver" in text
    assert "SECRET" not in text and "TOKEN" not in text, text


def test_a_bad_alert_url_is_refused_without_echoing_it():
    with pytest.raises(gradwatch.ConfigError, match="alert_url must be an http") as err:
        gradwatch.HealthMonitor(alert_url="ftp://hooks.example/SECRET")
    assert "SECRET" not in str(err.value)


class Answers:
    """A webhook on 127.0.0.1 that answers each request with the next ``(status, headers)`` of a script,
    and records each request's method, path and time."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script, self.seen = list(script), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.seen.append((self.command, self.path, time.monotonic(), body))
                status, headers = owner.script.pop(0) if owner.script else (200, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _send_one(url: str, **kw):  # noqa: ANN202 - an Alerts sink, imported inside
    from gradwatch.findings import Finding, Severity
    from gradwatch.sinks.alerts import Alerts

    sink = Alerts([url], timeout=2, close_timeout=10, backoff=0.05, **kw)
    sink.start({"run": "r"})
    sink.finding(Finding("nonfinite", Severity.CRITICAL, 3, 0, None, "m", {}, "a"))
    sink.close()
    return sink


@pytest.mark.parametrize("code", [301, 302, 303])
def test_a_redirect_that_would_drop_the_body_is_a_failed_delivery(code, caplog):
    """urllib would follow a 301/302/303 with a bodyless GET, which the target accepts: the alert lost,
    counted as sent. Not followed: reported as failed, and no GET is made."""
    server = Answers([(code, {"Location": "/elsewhere"})] * 3)
    try:
        with caplog.at_level("WARNING", logger="gradwatch"):
            sink = _send_one(server.url)
    finally:
        server.close()
    assert sink.sent == 0 and all(method == "POST" for method, *_ in server.seen)
    assert any(f"HTTP {code}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("code", [307, 308])
def test_a_redirect_that_keeps_the_body_is_followed(code):
    server = Answers([(code, {"Location": "/moved"})])
    try:
        sink = _send_one(server.url)
    finally:
        server.close()
    assert sink.sent == 1
    (first, _, _, body1), (second, path, _, body2) = server.seen
    assert (first, second, path) == ("POST", "POST", "/moved") and body1 == body2 and json.loads(body2)["rule"]


def test_a_client_error_is_not_retried_and_retry_after_is_honoured():
    """A 400 says the request is wrong: one attempt, not 1 + retries. A 429 with Retry-After: 1 waits
    that second before the next attempt (the backoff here is 0.05 s)."""
    bad = Answers([(400, {})] * 3)
    try:
        sink = _send_one(bad.url, retries=2)
    finally:
        bad.close()
    assert sink.sent == 0 and len(bad.seen) == 1
    busy = Answers([(429, {"Retry-After": "1"})])
    try:
        sink = _send_one(busy.url, retries=2)
    finally:
        busy.close()
    assert sink.sent == 1 and len(busy.seen) == 2
    assert busy.seen[1][2] - busy.seen[0][2] >= 0.9
