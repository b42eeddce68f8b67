"""``python -m vmdr.agent --config FILE``: the agent process itself.

``vmdr agent`` checks the config and then replaces itself with this (exec, same PID), so
the long-running process carries only what the agent uses — not the repository, storage
and crypto modules every other ``vmdr`` command loads (about 18 MB of its RSS budget).
"""

from __future__ import annotations

import argparse
import sys

from vmdr import config
from vmdr.errors import EXIT_INTERRUPTED, VmdrError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmdr agent", description=__doc__)
    ap.add_argument("--config", metavar="FILE")
    ns = ap.parse_args(argv)
    try:
        from vmdr.agent.server import run_agent

        return run_agent(config.load(ns.config))
    except VmdrError as exc:
        sys.stderr.write(f"vmdr: error: {exc.message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
