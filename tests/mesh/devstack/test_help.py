"""`sluice up`, `env`, `token`, `down` and `traces` explain every flag in their help (no empty help)."""

from __future__ import annotations

import argparse

import pytest

from mesh.cli import build_parser

COMMANDS = ("up", "env", "token", "down", "traces")


def subparser(name: str) -> argparse.ArgumentParser:
    (choices,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return choices.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help(command: str) -> None:
    parser = subparser(command)
    assert parser.description, command
    missing = [action.dest for action in parser._actions if not action.help]
    assert missing == []


def test_commands_have_help_and_defaults_are_shown() -> None:
    (choices,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {action.dest: action.help for action in choices._choices_actions}
    assert all(helps[command] for command in COMMANDS)
    shown = subparser("up").format_help()
    assert "(default 90.0)" in " ".join(shown.split())  # --start-timeout
    assert "(default 60)" in " ".join(subparser("down").format_help().split())  # --timeout
