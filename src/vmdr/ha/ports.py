"""What the watchdog needs of a host, as structural types (``typing.Protocol``).

``vmdr.ha`` sits beside ``plan`` and imports no driver (tests/unit/test_layering.py): the
monitor is handed a factory of host connections, and any object with these methods will
do. :class:`vmdr.hypervisor.driver.Hypervisor` and its ``Domain``, ``Console``,
``LifecycleEvent``, ``GuestExecResult`` and ``Subscription`` match them (the CLI and the
agent pass them in; strict mypy checks the match there); errors are the ones of
:mod:`vmdr.errors` (``DomainNotFound``, ``HypervisorUnavailable``, ``HypervisorError``,
``HypervisorUnsupported``, ``GuestAgentUnavailable``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["ConsolePort", "DomainPort", "EventPort", "ExecResultPort", "HostPort",
           "ScreenshotPort", "SubscriptionPort"]


class EventPort(Protocol):
    """A lifecycle event: ``kind`` started | paused | resumed | stopped | crashed | ...,
    ``detail`` failed | crashed | destroyed | ioerror | panicked | ..."""

    @property
    def domain(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def detail(self) -> str: ...


class ScreenshotPort(Protocol):
    @property
    def mime(self) -> str: ...

    @property
    def data(self) -> bytes: ...


class ExecResultPort(Protocol):
    @property
    def exitcode(self) -> int | None: ...

    @property
    def stdout(self) -> str: ...

    @property
    def stderr(self) -> str: ...

    @property
    def ok(self) -> bool: ...


class ConsolePort(Protocol):
    def read_log(self) -> str: ...

    def screenshot(self) -> ScreenshotPort: ...


class DomainPort(Protocol):
    @property
    def name(self) -> str: ...

    def state(self) -> str: ...

    def state_reason(self) -> str: ...

    def guest_ping(self, timeout: int = 3) -> bool: ...

    def guest_exec(self, argv: Sequence[str], *, timeout: float = 30.0,
                   capture: bool = True) -> ExecResultPort: ...

    def start(self) -> None: ...

    def destroy(self) -> None: ...

    def reset(self) -> None: ...

    def resume(self) -> None: ...

    def console(self) -> ConsolePort: ...


class SubscriptionPort(Protocol):
    @property
    def alive(self) -> bool: ...

    def close(self) -> None: ...


class HostPort(Protocol):
    uri: str

    def lookup(self, name: str) -> DomainPort: ...

    def subscribe(self, callback: Callable[[EventPort], None]) -> SubscriptionPort: ...

    def close(self) -> None: ...
