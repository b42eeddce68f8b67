"""libvirt lifecycle events, translated into :class:`~.driver.LifecycleEvent`.

libvirt delivers events only on connections opened after an event loop implementation was
registered (``virEventRegisterDefaultImpl``), and only while someone runs that loop. So a
subscription opens its own connection to the host after :func:`_ensure_loop` has registered
the default implementation and started one daemon thread running it for the rest of the
process; the connections vmdr already holds are not touched. Keepalive probes (5 s, 3
misses) and the close callback mark a subscription dead when libvirtd goes away, so the
caller can subscribe again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ._compat import lv
from .driver import EventKind, LifecycleEvent, Subscription
from .errors import libvirt_errors

log = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None
_names: dict[tuple[int, str], dict[int, str]] = {}

# event -> (our kind, prefix of its detail constants)
_KINDS: tuple[tuple[str, EventKind, str], ...] = (
    ("VIR_DOMAIN_EVENT_DEFINED", "defined", "VIR_DOMAIN_EVENT_DEFINED_"),
    ("VIR_DOMAIN_EVENT_UNDEFINED", "undefined", "VIR_DOMAIN_EVENT_UNDEFINED_"),
    ("VIR_DOMAIN_EVENT_STARTED", "started", "VIR_DOMAIN_EVENT_STARTED_"),
    ("VIR_DOMAIN_EVENT_SUSPENDED", "paused", "VIR_DOMAIN_EVENT_SUSPENDED_"),
    ("VIR_DOMAIN_EVENT_RESUMED", "resumed", "VIR_DOMAIN_EVENT_RESUMED_"),
    ("VIR_DOMAIN_EVENT_STOPPED", "stopped", "VIR_DOMAIN_EVENT_STOPPED_"),
    ("VIR_DOMAIN_EVENT_SHUTDOWN", "shutdown", "VIR_DOMAIN_EVENT_SHUTDOWN_"),
    ("VIR_DOMAIN_EVENT_PMSUSPENDED", "pmsuspended", "VIR_DOMAIN_EVENT_PMSUSPENDED_"),
    ("VIR_DOMAIN_EVENT_CRASHED", "crashed", "VIR_DOMAIN_EVENT_CRASHED_"),
)


def const_name(m: Any, prefix: str, value: int) -> str:
    """The libvirt constant ``prefix + NAME`` whose value is ``value``, as ``name`` in lower
    case with hyphens ('' if there is none)."""
    key = (id(m), prefix)
    table = _names.get(key)
    if table is None:
        table = {}
        for attr in sorted(dir(m)):
            if attr.startswith(prefix) and not attr.endswith("_LAST"):
                v = getattr(m, attr)
                if isinstance(v, int):
                    table.setdefault(v, attr[len(prefix):].lower().replace("_", "-"))
        _names[key] = table
    return table.get(int(value), "")


def translate(m: Any, name: str, uuid: str, event: int, detail: int) -> LifecycleEvent:
    """One libvirt lifecycle callback's arguments as a :class:`LifecycleEvent`."""
    for const, kind, prefix in _KINDS:
        if getattr(m, const, None) == event:
            return LifecycleEvent(name, uuid, kind, const_name(m, prefix, detail))
    return LifecycleEvent(name, uuid, "other", str(detail))


def _run_loop() -> None:
    m = lv()
    while True:
        try:
            if m.virEventRunDefaultImpl() < 0:
                log.debug("libvirt event loop iteration failed")
        except Exception as exc:  # keep the loop alive whatever one iteration does
            log.debug("libvirt event loop: %s", exc)


def _ensure_loop() -> None:
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        with libvirt_errors("registering the libvirt event loop"):
            lv().virEventRegisterDefaultImpl()
        _loop_thread = threading.Thread(target=_run_loop, name="vmdr-libvirt-events",
                                        daemon=True)
        _loop_thread.start()


class LibvirtSubscription(Subscription):
    """Lifecycle events of every domain of ``uri``, on a connection of their own."""

    def __init__(self, uri: str, callback: Callable[[LifecycleEvent], None]) -> None:
        m = lv()
        _ensure_loop()
        self._callback = callback
        self._alive = True
        with libvirt_errors(f"cannot connect to {uri}", opening=True):
            self._conn = m.open(uri)
        try:
            self._conn.setKeepAlive(5, 3)
        except m.libvirtError:
            pass  # a driver without keepalive (test:///): the close callback still works
        with libvirt_errors(f"subscribing to the events of {uri}"):
            self._conn.registerCloseCallback(self._on_close, None)
            self._id = self._conn.domainEventRegisterAny(
                None, m.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    @property
    def alive(self) -> bool:
        return self._alive

    def _on_close(self, _conn: Any, _reason: int, _opaque: Any) -> None:
        self._alive = False

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int,
                      _opaque: Any) -> None:
        try:
            ev = translate(lv(), str(dom.name()), str(dom.UUIDString()), event, detail)
            self._callback(ev)
        except Exception as exc:  # never let an exception unwind into libvirt's loop
            log.warning("lifecycle event handler failed: %s", exc)

    def close(self) -> None:
        if self._conn is None:
            return
        m = lv()
        conn, self._conn = self._conn, None
        self._alive = False
        for step in (lambda: conn.domainEventDeregisterAny(self._id),
                     conn.unregisterCloseCallback, conn.close):
            try:
                step()
            except m.libvirtError:
                pass  # the connection is gone already: nothing left to release
