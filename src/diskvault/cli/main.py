"""Entry point: build the parser from one module per command, run it, map errors to exits.

Each command module (``COMMANDS``) exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a ``run(args) -> int`` function; only the module of the
command being run is imported. Errors below the CLI are
``DiskvaultError``s and are printed as one line; anything else is a bug, printed as one
line too unless ``DISKVAULT_DEBUG`` is set (then with its traceback).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import select
import signal
import sys
import traceback

from .. import __version__
from ..errors import DiskvaultError
from ..storage.rsh import RSH_ENV
from . import log

# the commands, in the order `--help` lists them, and their modules; each module exposes
# ``register(subparsers)``. A command's module is imported only when that command runs
# (all of them for the top-level help): importing every command's machinery took ~45 ms
# of the ~300 ms each command takes to start.
COMMANDS = {
    "init": "init_cmd", "create": "create_cmd", "extract": "extract_cmd",
    "list": "list_cmd", "info": "info_cmd", "delete": "delete_cmd",
    "rename": "rename_cmd", "disk": "disk_cmd", "vm": "vm_cmd", "check": "check_cmd",
    "prune": "prune_cmd", "compact": "compact_cmd", "key": "key_cmd",
    "break-lock": "lock_cmd", "config": "config_cmd", "serve-nbd": "serve_nbd_cmd",
    "instant-restore": "instant_restore_cmd", "mount": "mount_cmd", "umount": "umount_cmd",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        log.error(message)
        sys.exit(2)


LOG_JSON_HELP = "write warnings, notes, errors and progress as JSON lines (Borg's format)"


def _add_log_json(parser: argparse.ArgumentParser) -> None:
    """--log-json on every (sub)command, as Borg's common option; SUPPRESS keeps a
    subcommand from resetting what was given before the command name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in set(action.choices.values()):
                p.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS,
                               help=LOG_JSON_HELP)
                _add_log_json(p)


def _command_word(argv: list[str]) -> str | None:
    """The command named on the line: the first word that is not an option (no global
    option takes a value); None when help is asked for before it."""
    for a in argv:
        if a in ("-h", "--help"):
            return None
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="diskvault", description="Deduplicating backup of disks and images")
    parser.add_argument("-V", "--version", action="version", version=f"diskvault {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("--log-json", action="store_true", help=LOG_JSON_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    word = _command_word(sys.argv[1:] if argv is None else argv)
    for name, module in COMMANDS.items():
        if word in COMMANDS and name != word:
            # parsing one command never reads another's parser: its name is enough
            sub.add_parser(name)
        else:
            importlib.import_module(f".{module}", __package__).register(sub)
    _add_log_json(parser)
    return parser


def _tune_malloc() -> None:
    """Keep multi-MiB buffers on the heap instead of fresh mmaps.

    glibc serves allocations over 128 KiB with mmap and returns them with munmap, so
    every 4 MiB chunk buffer costs ~1,000 page faults: measured here, that doubled the
    time of a backup (sys time 3.3 s → 1.2 s per GiB with this tuning).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 256 << 20)
        libc.mallopt(m_trim_threshold, 512 << 20)
        # few, large allocations: per-thread arenas only keep more freed memory mapped
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass  # not glibc: correct, just slower


def _stdout_closed() -> bool:
    """Whether the reader of stdout went away (a pipe's read end closed: POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def _die_of_sigpipe() -> None:
    """End as `cat` would when its reader leaves: silently, killed by SIGPIPE (status 141
    in the shell, so `set -o pipefail` sees what it always saw)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # buffered text: gone
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached: the signal ends the process


def main(argv: list[str] | None = None) -> int:
    _tune_malloc()
    # SIGPIPE stays ignored (Python's default): a backup server that resets its
    # connection while paramiko, boto or http.client sends must be an error the storage
    # layer retries, not the death of the process. A closed stdout (`| head`) ends the
    # command quietly instead, below.
    debug = bool(os.environ.get("DISKVAULT_DEBUG")) or "--debug" in (argv or sys.argv)
    # before parsing: a usage error is a JSON line too when --log-json was asked for
    log.configure("--log-json" in (argv or sys.argv[1:]))
    try:
        args = build_parser(argv).parse_args(argv)
        # the modules are imported: the cyclic collector need never walk their ~100,000
        # objects again (its full passes were ~1 % of a backup's CPU)
        gc.freeze()
        log.configure(args.log_json)
        if getattr(args, "rsh", None) is not None:  # read where an SFTP store is opened
            os.environ[RSH_ENV] = args.rsh
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader gone by now is handled below
        return code
    except BrokenPipeError as e:
        if _stdout_closed():
            _die_of_sigpipe()  # after the `with` blocks above released locks and files
        if debug:
            traceback.print_exc()
        log.error(f"broken pipe: {e}")
        return 2
    except DiskvaultError as e:
        if debug:
            traceback.print_exc()
        (log.warning if e.exit_code == 1 else log.error)(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 2
    except MemoryError:
        log.error("out of memory")
        return 2
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a trace
        if debug:
            traceback.print_exc()
        log.error(f"internal error: {type(e).__name__}: {e} (run with --debug for details)")
        return 2
