"""The CLI imports only the module of the command being run (every command's start is
mostly imports), and the top-level help still lists every command with its help."""

from __future__ import annotations

import subprocess
import sys

from diskvault.cli.main import COMMANDS, build_parser

_IMPORTED = """
import sys
from diskvault.cli.main import build_parser
build_parser(sys.argv[1:])
print(" ".join(sorted(m.rsplit(".", 1)[1] for m in sys.modules
                      if m.startswith("diskvault.cli.") and m.endswith("_cmd"))))
"""


def _command_modules(*argv: str) -> set[str]:
    p = subprocess.run([sys.executable, "-c", _IMPORTED, *argv], capture_output=True,
                       check=True, timeout=120)
    return set(p.stdout.decode().split())


def test_only_the_running_commands_module_is_imported() -> None:
    assert _command_modules("--log-json", "list", "--json", "/repo") == {"list_cmd"}
    # disk's subcommands live in their own modules, imported by disk's
    assert "disk_cmd" in _command_modules("disk", "list")
    assert not {"check_cmd", "vm_cmd", "mount_cmd"} & _command_modules("disk", "list")
    # help before the command, or no command: every command is there
    assert _command_modules("--help") >= set(COMMANDS.values())


def test_top_level_help_lists_every_command_with_its_help() -> None:
    sub = build_parser(["--help"])._subparsers._group_actions[0]  # type: ignore[union-attr]
    listed = {a.dest: a.help for a in sub._choices_actions}
    assert list(listed) == list(COMMANDS)
    assert all(listed.values())


def test_a_command_parses_its_own_options_next_to_named_stubs() -> None:
    args = build_parser(["list", "--json", "/repo"]).parse_args(["list", "--json", "/repo"])
    assert args.command == "list" and args.json
    assert set(build_parser(["list"])._subparsers._group_actions[0].choices) == set(COMMANDS)  # type: ignore[union-attr]
