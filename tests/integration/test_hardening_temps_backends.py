"""``Backend.list_temporary`` on every backend: the temporary objects a killed write left
(file, SFTP) are listed with their full names and ``delete`` removes them; ordinary
listings never show them; S3 writes are single PUTs and leave none."""

from __future__ import annotations

from tests.integration.conftest import BackendCase


def test_list_temporary(backend_case: BackendCase) -> None:
    b = backend_case.backend
    b.put("data/ab/" + "ab" * 32, b"whole")
    assert list(b.list_temporary("data")) == []
    if backend_case.raw_write is None:  # S3: nothing to leave behind
        return
    tmp = "data/ab/" + "ab" * 32 + ".0123456789ab.tmp"
    backend_case.raw_write(tmp, b"half")
    assert [o.name for o in b.list("data")] == ["data/ab/" + "ab" * 32]
    temps = list(b.list_temporary("data"))
    assert [(o.name, o.size) for o in temps] == [(tmp, 4)]
    assert list(b.list_temporary("snapshots")) == []
    b.delete(tmp)
    assert list(b.list_temporary("data")) == []
    assert b.get("data/ab/" + "ab" * 32) == b"whole"
