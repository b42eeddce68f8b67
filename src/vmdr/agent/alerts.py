"""Alerts by webhook and e-mail, de-duplicated: one message when a condition starts, one
"resolved" when it ends, nothing in between (state in the history's ``alerts`` table).

Kinds: ``job_failed``, ``rpo_breach``, ``verify_failed``, ``repository_unreachable``,
``state_disk``. Sending happens on a worker thread; a receiver that is down is logged and
never blocks the agent.
"""

from __future__ import annotations

import json
import logging
import queue
import smtplib
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from vmdr.agent.clock import iso, wall
from vmdr.agent.history import History
from vmdr.config import AlertConfig
from vmdr.credentials import read_secret
from vmdr.storage.registry import redact

log = logging.getLogger("vmdr.agent")


def payload(fmt: str, status: str, kind: str, key: str, message: str,
            when: float) -> dict[str, Any]:
    """The webhook body: vmdr's own JSON, or Slack/Teams (``text``) or Gotify shape."""
    title = f"[vmdr {status}] {kind}"
    if fmt == "slack":
        return {"text": f"{title}: {message}"}
    if fmt == "gotify":
        return {"title": title, "message": message, "priority": 8 if status == "firing" else 2}
    return {"status": status, "kind": kind, "key": key, "message": message,
            "time": iso(when)}


class Alerter:
    def __init__(self, cfg: AlertConfig, history: History,
                 clock: Callable[[], float] = wall) -> None:
        self.cfg, self.history, self.clock = cfg, history, clock
        self.sent: list[dict[str, Any]] = []  # what went out (tests, the dashboard)
        # one delivery thread, so a "resolved" never overtakes its "firing"
        self._queue: queue.Queue[tuple[str, str, str, str, dict[str, Any]]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._volatile: dict[str, str] = {}  # alerts raised while the history was unwritable

    def fire(self, key: str, kind: str, message: str) -> bool:
        """Raise *key*; True when this is news (it was not already firing)."""
        try:
            if self.history.alert_state(key) == "firing":
                return False
            self.history.set_alert(key, kind, "firing", message, self.clock())
        except Exception as exc:  # the history itself is the problem (disk full): remember
            if key in self._volatile:  # in memory and still send
                return False
            self._volatile[key] = kind
            log.error("alert %s not recorded in the history: %s", kind, exc)
        log.warning("alert %s: %s", kind, message)
        self._send("firing", kind, key, message)
        return True

    def resolve(self, key: str, message: str) -> bool:
        """End *key*; True when it was firing (a "resolved" is sent)."""
        if key in self._volatile:
            self._send("resolved", self._volatile.pop(key), key, message)
            return True
        if self.history.alert_state(key) != "firing":
            return False
        kind = next((a["kind"] for a in self.history.alerts("firing") if a["key"] == key), "")
        self.history.set_alert(key, kind, "resolved", message, self.clock())
        log.info("alert resolved %s: %s", kind, message)
        self._send("resolved", kind, key, message)
        return True

    def _send(self, status: str, kind: str, key: str, message: str) -> None:
        body = payload(self.cfg.webhook_format, status, kind, key, message, self.clock())
        self.sent.append(body)
        self._queue.put((status, kind, key, message, body))
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._drain, daemon=True,
                                            name="vmdr-alerts")
            self._worker.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._deliver(*item)
            finally:
                self._queue.task_done()

    def wait(self, timeout: float = 30.0) -> None:
        """Wait until every queued alert was delivered or given up (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def _deliver(self, status: str, kind: str, key: str, message: str,
                 body: dict[str, Any]) -> None:
        c = self.cfg
        if c.webhook:
            try:
                if not c.webhook.startswith(("http://", "https://")):
                    raise ValueError("the webhook must be an http(s) URL")
                req = urllib.request.Request(  # noqa: S310 (checked above)
                    c.webhook, data=json.dumps(body).encode(), method="POST",
                    headers={"Content-Type": "application/json", "User-Agent": "vmdr-agent"})
                with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
                    r.read()
            except Exception as exc:
                log.warning("webhook %s failed: %s", redact(c.webhook), exc)
        if c.smtp_host and c.mail_to:
            try:
                self._mail(status, kind, message)
            except Exception as exc:
                log.warning("mail via %s failed: %s", c.smtp_host, type(exc).__name__)

    def _mail(self, status: str, kind: str, message: str) -> None:
        c = self.cfg
        msg = EmailMessage()
        msg["Subject"] = f"[vmdr {status}] {kind}: {message[:120]}"
        msg["From"], msg["To"] = c.mail_from, ", ".join(c.mail_to)
        msg.set_content(f"{status.upper()}: {message}\n\n-- the vmdr agent\n")
        assert c.smtp_host is not None
        with smtplib.SMTP(c.smtp_host, c.smtp_port, timeout=15) as s:
            if c.smtp_starttls:
                s.starttls(context=ssl.create_default_context(cafile=c.smtp_cafile))
            if c.smtp_user:
                pw = read_secret(c.smtp_password_file) if c.smtp_password_file else ""
                s.login(c.smtp_user, pw)
            s.send_message(msg)
