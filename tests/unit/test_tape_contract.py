"""The tape contract suite (tests/tape/contract.py) over the virtual library; the same
suite runs over the mtx+mt and SG_IO back ends against tgt in
tests/integration/test_tape_tgt.py."""

from tests.tape.contract import *  # noqa: F403 (the suite's tests and fixture)
