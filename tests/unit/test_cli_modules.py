"""The CLI imports only the module of the command being run: its table must be right."""

from __future__ import annotations

import argparse
import importlib

from vmdr.cli.main import COMMANDS, MODULES, build_parser, command_word


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_maps_to_the_module_that_registers_it() -> None:
    assert _commands(build_parser()) == set(COMMANDS)
    for name in MODULES:
        importlib.import_module(f"vmdr.cli.{name}")
    for word, module in COMMANDS.items():
        assert word in _commands(build_parser(word)), (word, module)


def test_command_word_skips_global_options() -> None:
    assert command_word(["-r", "/srv/x", "--json", "backup", "web01"]) == "backup"
    assert command_word(["--repo=/srv/x", "snapshots"]) == "snapshots"
    assert command_word(["--config", "c.toml", "-v", "plan", "coverage"]) == "plan"
    assert command_word(["--help"]) is None
    assert command_word([]) is None
