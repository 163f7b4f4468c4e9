"""Alerts: post new warning/critical findings, remedy actions and the end-of-run summary to webhooks.

A background thread delivers; the training thread only puts a payload on a bounded queue, so a slow,
failing or unreachable endpoint never blocks or crashes training, and never affects the events file
(written by its own sink, before and independently of this one).

Each payload is JSON with a Slack-compatible ``text`` plus structured fields: ``kind`` (``finding``,
``action`` or ``summary``), ``rule``, ``severity``, ``step``, ``epoch``, ``layer``, ``message``,
``advice``, ``run``, ``host``; actions add ``remedy`` and ``detail``, the summary adds ``status``,
``verdict`` and ``summary``. Targets are ``http(s)`` URLs (POSTed with :mod:`urllib`) or callables
taking the payload dict. URLs are secrets (a Slack webhook URL is a credential): they never appear in
a log line; a target is named by its scheme and host only.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from gradwatch.errors import ConfigError
from gradwatch.findings import Action, Finding, Severity, _json_safe
from gradwatch.sinks import webhook
from gradwatch.sinks.base import Sink

log = logging.getLogger("gradwatch")

Target = str | Callable[[dict[str, Any]], Any]

_ICON = {"warning": ":warning:", "critical": ":rotating_light:", "action": ":wrench:"}
_STOP = object()


def check_targets(alert_url: str | None, alerts: Iterable[Target] | None) -> list[Target]:
    """The alert targets of ``alert_url=`` and ``alerts=``, validated; raises :class:`ConfigError`.

    Example:
        >>> check_targets("https://hooks.example/x", [print])  # doctest: +ELLIPSIS
        ['https://hooks.example/x', <built-in function print>]
    """
    hint = 'Write e.g. alerts=["https://hooks.slack.com/services/...", my_function].'
    if alerts is None:
        alerts = []
    elif isinstance(alerts, str) or callable(alerts) or not isinstance(alerts, Iterable):
        raise ConfigError(
            f"alerts must be a list of URLs and/or callables, got {type(alerts).__name__}. {hint}"
        )
    targets: list[Target] = [alert_url] if alert_url is not None else []
    for i, target in enumerate(list(alerts)):
        if isinstance(target, str):
            if not target.startswith(("http://", "https://")):
                raise ConfigError(
                    f"alerts[{i}] must be an http(s) URL, got a string without a scheme. {hint}"
                )
        elif not callable(target):
            raise ConfigError(
                f"alerts[{i}] must be an http(s) URL string or a callable taking the payload dict, got "
                f"{type(target).__name__}. {hint}"
            )
        targets.append(target)
    return targets


def redact(target: Target) -> str:
    """How a target is named in logs: ``https://hooks.slack.com/...`` (never the path), or the callable's name."""
    if isinstance(target, str):
        parts = urllib.parse.urlsplit(target)
        return f"{parts.scheme}://{parts.hostname or '?'}/..."
    return getattr(target, "__qualname__", type(target).__name__)


def _text(p: dict[str, Any]) -> str:
    where = f" {p['run']} on {p['host']}" if p["run"] else f" on {p['host']}"
    if p["kind"] == "finding":
        layer = f" in `{p['layer']}`" if p["layer"] else ""
        return (
            f"{_ICON.get(p['severity'], '')} gradwatch{where}: *{p['severity'].upper()}* `{p['rule']}` "
            f"at step {p['step']}{layer}: {p['message']}\n> {p['advice']}"
        )
    if p["kind"] == "action":
        return f"{_ICON['action']} gradwatch{where}: `{p['remedy']}` at step {p['step']} answering `{p['rule']}`: {p['message']}"
    s = p["summary"]
    rules = "; ".join(
        f"{r['rule']} ({r['severity']}, first step {r['first_step']}, x{r['count']})" for r in s["rules"]
    )
    acts = "; ".join(f"{a['remedy']} x{a['count']}" for a in s["actions"])
    return (
        f"gradwatch{where}: run {s['status']} after {s['steps']} steps, verdict *{s['verdict'].upper()}*"
        + (f"\nrules: {rules}" if rules else "\nno rule fired")
        + (f"\nactions: {acts}" if acts else "")
        + (f"\n({p['suppressed']} repeated or rate-limited alert(s) not sent)" if p["suppressed"] else "")
    )


class Alerts(Sink):
    """Posts alerts to ``targets`` from a background thread.

    Args:
        targets: ``http(s)`` URLs and/or callables taking the payload dict.
        run: the run's name in messages; default the last two parts of the fit's ``meta["run"]``.
        rate_limit: most finding/action alerts per ``rate_period`` seconds; the rest are counted and
            reported in the final message. The final message is always sent.
        rate_period: the rate-limit window in seconds.
        queue_size: alerts waiting for delivery; when full the oldest is dropped (one log line).
        timeout: seconds per HTTP attempt.
        retries: extra attempts after a failed one, with exponential backoff from ``backoff`` seconds.
        backoff: first retry delay in seconds.
        close_timeout: at fit end, how long to wait for pending alerts to be delivered.
    """

    name = "alerts"

    def __init__(
        self,
        targets: list[Target],
        *,
        run: str | None = None,
        rate_limit: int = 10,
        rate_period: float = 60.0,
        queue_size: int = 100,
        timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.5,
        close_timeout: float = 10.0,
    ) -> None:
        self.targets = list(check_targets(None, targets))
        self.run = run
        self.host = socket.gethostname()
        self.rate_limit, self.rate_period = rate_limit, rate_period
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.close_timeout = close_timeout
        self.sent = 0
        self.suppressed = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._seen: set[tuple[str, str | None]] = set()
        self._recent: deque[float] = deque()
        self._dead: set[int] = set()
        self._warned_full = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ training thread: enqueue only
    def start(self, meta: dict[str, Any]) -> None:
        if self.run is None and meta.get("run"):
            self.run = "/".join(str(meta["run"]).replace("\\", "/").rstrip("/").split("/")[-2:])
        self._thread = threading.Thread(target=self._work, name="gradwatch-alerts", daemon=True)
        self._thread.start()

    def _payload(self, kind: str, **fields: Any) -> dict[str, Any]:
        base = dict.fromkeys(("rule", "severity", "step", "epoch", "layer", "message", "advice"))
        p = {"kind": kind, **base, **fields, "run": self.run, "host": self.host}
        p["suppressed"] = self.suppressed
        p["text"] = _text(p)
        return _json_safe(p)

    def _allowed(self) -> bool:
        now = time.monotonic()
        while self._recent and now - self._recent[0] > self.rate_period:
            self._recent.popleft()
        if len(self._recent) >= self.rate_limit:
            self.suppressed += 1
            return False
        self._recent.append(now)
        return True

    def finding(self, finding: Finding) -> None:
        if finding.severity.rank < Severity.WARNING.rank:
            return
        key = (finding.rule, finding.layer)
        if key in self._seen:
            self.suppressed += 1  # one alert per rule and layer per run
            return
        self._seen.add(key)
        if self._allowed():
            self._put(self._payload("finding", **finding.to_dict()))

    def action(self, action: Action) -> None:
        if action.detail.get("routine"):
            return  # everyday adaptive clipping is not news
        if self._allowed():
            self._put(self._payload("action", **action.to_dict()))

    def summary(self, summary: dict[str, Any]) -> None:
        worst = {"critical": "critical", "warnings": "warning"}.get(summary["verdict"])
        self._put(
            self._payload(
                "summary",
                severity=worst,
                step=summary["steps"] - 1,
                message=f"run {summary['status']}, verdict {summary['verdict']}",
                status=summary["status"],
                verdict=summary["verdict"],
                summary=summary,
            )
        )

    def _put(self, payload: Any) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        self._enqueue(payload)

    def _enqueue(self, payload: Any) -> None:
        """Never blocks: when the queue is full the oldest alert makes room."""
        while True:
            try:
                self._queue.put_nowait(payload)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # drop the oldest: the newest (and the summary) matter more
                    self._queue.task_done()
                except queue.Empty:
                    pass
                if not self._warned_full:
                    self._warned_full = True
                    log.warning("gradwatch alerts: delivery is behind; dropping the oldest queued alerts")

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._enqueue(_STOP)
        thread.join(self.close_timeout)
        if thread.is_alive():
            log.warning(
                "gradwatch alerts: gave up waiting %.0f s for %d pending alert(s) at the end of the run",
                self.close_timeout,
                self._queue.qsize(),
            )

    # ------------------------------------------------------------------ worker thread: deliver
    def _work(self) -> None:
        while True:
            payload = self._queue.get()
            try:
                if payload is _STOP:
                    return
                for i, target in enumerate(self.targets):
                    self._deliver(i, target, payload)
            except Exception as err:  # never let the worker die silently
                log.warning("gradwatch alerts: unexpected error: %s", type(err).__name__)
            finally:
                self._queue.task_done()

    def _deliver(self, i: int, target: Target, payload: dict[str, Any]) -> None:
        # A dead target gets one attempt per alert, not a retry ladder, so a backlog cannot build up.
        attempts = 1 if i in self._dead else 1 + self.retries
        error, wait = "", None
        for attempt in range(attempts):
            if attempt:
                time.sleep(wait if wait is not None else self.backoff * 2 ** (attempt - 1))
            try:
                if isinstance(target, str):
                    webhook.post(target, payload, self.timeout)
                else:
                    target(payload)
            except Exception as err:
                error, wait = self._describe(err, target), webhook.retry_after(err)
                if not webhook.retryable(err):
                    attempts = attempt + 1
                    break
                continue
            self.sent += 1
            if i in self._dead:
                self._dead.discard(i)
                log.warning("gradwatch alerts: %s is delivering again", redact(target))
            return
        if i not in self._dead:
            self._dead.add(i)
            log.warning(
                "gradwatch alerts: could not deliver to %s after %d attempt(s) (%s); training goes on, "
                "later alerts to it are tried once each and not reported again",
                redact(target),
                attempts,
                error,
            )

    @staticmethod
    def _describe(err: Exception, target: Target) -> str:
        """What went wrong, safe to log: for a URL, the status or the error's type and an OS error's words
        only (urllib's messages quote pieces of the URL: a path with a space, ``'PASSWORD@host'``)."""
        if isinstance(err, urllib.error.HTTPError):
            return f"HTTP {err.code}"
        if not isinstance(target, str):
            return f"{type(err).__name__}: {err}"
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        words = getattr(reason, "strerror", None) if isinstance(reason, OSError) else None
        return f"{type(reason).__name__}: {words}" if words else type(reason).__name__
