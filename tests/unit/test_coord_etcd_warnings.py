"""The etcd client makes no urllib3 FutureWarning per request ("The 'strict' parameter is
no longer needed"), and the filter that silences it silences nothing else."""

from __future__ import annotations

import socket
import warnings

import pytest

pytest.importorskip("etcd3gw")

from vmdr.agent.coord_etcd import EtcdCoordinator

STRICT = "The 'strict' parameter is no longer needed on Python 3+. This will raise an error."


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_creating_and_using_the_etcd_client_emits_no_future_warning() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        coord = EtcdCoordinator([f"http://127.0.0.1:{_closed_port()}"], ttl=4)
        client = coord._connect()
        with pytest.raises(Exception):  # noqa: B017 - nobody listens: any connection error
            client.status()  # a request goes through requests and urllib3's pool manager
    assert [w for w in seen if issubclass(w.category, FutureWarning)] == []


def test_the_filter_is_that_warning_from_urllib3_only() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        EtcdCoordinator(["http://127.0.0.1:2379"])._connect()
        warnings.warn_explicit(STRICT, FutureWarning, "poolmanager.py", 1,
                               module="urllib3.poolmanager")
        warnings.warn_explicit("something else", FutureWarning, "poolmanager.py", 2,
                               module="urllib3.poolmanager")
        warnings.warn_explicit(STRICT, FutureWarning, "elsewhere.py", 3, module="elsewhere")
        warnings.warn_explicit(STRICT, DeprecationWarning, "poolmanager.py", 4,
                               module="urllib3.poolmanager")
    assert sorted(w.lineno for w in seen) == [2, 3, 4]
