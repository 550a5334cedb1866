"""``refseg``: the command line. One subcommand per job, each in its own module.

Every subcommand is a row of :data:`COMMANDS`: ``(name, module, add-args function, run
function, help)``. The module is imported when the parser is built; a module that does not
exist (yet) is left out of the parser. A run function takes the parsed ``Namespace`` and
returns the exit status.

Exit status: 0 success; 2 usage errors and errors a user can act on (a missing file, a bad
value, an unreachable endpoint), printed as ``refseg CMD: error: MESSAGE`` without a
traceback (``--verbose`` adds it); 1 anything else (a bug or a failed job), with traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

__all__ = ["COMMANDS", "Command", "USER_ERRORS", "build_parser", "main", "scoped_env"]

log = logging.getLogger(__name__)


class Command(NamedTuple):
    name: str
    module: str
    add_args: str
    run: str
    help: str


COMMANDS: tuple[Command, ...] = (
    Command(
        "sample-references",
        "refseg.jobs.cmd_memory",
        "add_sample_references_args",
        "run_sample_references",
        "sample K reference shots per class from a COCO annotation file",
    ),
    Command(
        "build-memory",
        "refseg.jobs.cmd_memory",
        "add_build_memory_args",
        "run_build_memory",
        "encode reference shots into a memory bank (or add shots to one)",
    ),
    Command(
        "label",
        "refseg.jobs.cmd_label",
        "add_label_args",
        "run_label",
        "label images (folder, URI prefix, manifest or COCO list) on Ray",
    ),
    Command(
        "rematch",
        "refseg.jobs.cmd_rematch",
        "add_rematch_args",
        "run_rematch",
        "label a `label --cache-proposals` run again with another memory bank, without SAM2",
    ),
    Command(
        "import-review",
        "refseg.jobs.review",
        "add_import_review_args",
        "run_import_review",
        "turn a Label Studio review (or a CSV of verdicts) into new shots and negatives",
    ),
    Command(
        "evaluate",
        "refseg.jobs.commands",
        "add_evaluate_args",
        "run_evaluate",
        "COCO bbox and segm AP of a labelling run or results file",
    ),
    Command(
        "report", "refseg.jobs.report", "add_report_args", "run_report", "HTML review page of a run"
    ),
    Command(
        "export",
        "refseg.jobs.export",
        "add_export_args",
        "run_export",
        "export a run's labels to other formats",
    ),
    Command(
        "masks-from-boxes",
        "refseg.jobs.box_masks",
        "add_box_masks_args",
        "run_box_masks",
        "turn box-only reference annotations into masks with SAM2",
    ),
    Command(
        "compact",
        "refseg.jobs.cmd_compact",
        "add_compact_args",
        "run_compact",
        "merge OUT's small parts into large ones (also automatic past a threshold)",
    ),
    Command("demo", "refseg.jobs.demo", "add_demo_args", "run_demo", "offline end-to-end demo"),
    Command(
        "checkpoints",
        "refseg.jobs.commands",
        "add_checkpoints_args",
        "run_checkpoints",
        "list or download the official checkpoints",
    ),
    Command(
        "version", "refseg.jobs.commands", "add_version_args", "run_version", "package versions"
    ),
)

# Errors a user can act on: reported in one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)  # ConnectionError is OSError


def _import(module: str):  # -> module | None
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # the module itself is absent: leave the command out
            log.debug("command module %s not available", module)
            return None
        raise


def _verbose_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output (-vv: debug); tracebacks on errors",
    )
    return parent


def build_parser(
    commands: Sequence[Command] = COMMANDS, *, only: str | None = None, lazy: bool = False
) -> argparse.ArgumentParser:
    """The ``refseg`` parser with one subparser per importable row of ``commands``.

    With ``lazy``, only the module of the command ``only`` is imported (torch and Ray are
    slow to import); the other commands get a subparser that carries their help line.
    """
    parser = argparse.ArgumentParser(
        prog="refseg",
        description="Training-free reference-based instance segmentation (SAM2 + DINOv2).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parent = _verbose_parent()
    for cmd in commands:
        if lazy and cmd.name != only:
            sub.add_parser(cmd.name, help=cmd.help, parents=[parent])
            continue
        module = _import(cmd.module)
        if module is None:
            continue
        add_args: Callable[[argparse.ArgumentParser], object] = getattr(module, cmd.add_args)
        run: Callable[[argparse.Namespace], int] = getattr(module, cmd.run)
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help[0].upper() + cmd.help[1:] + ".",
            parents=[parent],
        )
        add_args(p)
        p.set_defaults(_run=run, _command=cmd.name)
    return parser


def _setup_logging(verbose: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    for name in ("refseg",):
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def scoped_env(updates: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of one command, then restore them."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _env_for(args: argparse.Namespace) -> dict[str, str]:
    """Environment a command's flags imply: the checkpoint cache and the S3 endpoint."""
    env: dict[str, str] = {}
    if getattr(args, "cache_dir", None):
        env["REFSEG_CACHE"] = os.path.abspath(os.path.expanduser(args.cache_dir))
    if getattr(args, "s3_endpoint", None):
        env["AWS_ENDPOINT_URL"] = args.s3_endpoint
    return env


def main(argv: list[str] | None = None) -> int:
    """Run ``refseg`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in {c.name for c in COMMANDS}), None)
    parser = build_parser(only=chosen, lazy=True)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    verbose = int(getattr(args, "verbose", 0) or 0)
    _setup_logging(verbose)
    name = getattr(args, "_full_command", None) or args._command
    try:
        with scoped_env(_env_for(args)):
            return int(args._run(args))
    except KeyboardInterrupt:
        print(f"refseg {name}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if verbose:
            traceback.print_exc()
        print(f"refseg {name}: error: {_message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        traceback.print_exc()
        print(f"refseg {name}: failed: {_message(exc)}", file=sys.stderr)
        return 1


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) or not text:
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
