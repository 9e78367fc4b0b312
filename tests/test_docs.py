"""The reference docs keep up with the command line: every option of every subcommand is documented."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lorafit.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


@pytest.mark.parametrize("name", sorted(subcommand_parsers()))
def test_every_option_of_the_subcommand_is_in_the_reference_docs(name: str) -> None:
    docs = (DOCS / "cli.md").read_text(encoding="utf-8") + (DOCS / "serve.md").read_text(encoding="utf-8")
    options = {
        option
        for action in subcommand_parsers()[name]._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert options, f"lorafit {name} has no options?"
    undocumented = sorted(
        option for option in options if f"`{option}" not in docs and f"{option} " not in docs
    )
    assert not undocumented, f"lorafit {name}: not in docs/cli.md or docs/serve.md: {undocumented}"
