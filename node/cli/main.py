"""The dicom-node command line: run the node, check its config, and talk to peers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from node import __version__
from node.config.model import ConfigError, load_config
from node.config.render import format_config
from node.daemon.logs import setup_logging

DEFAULT_CONFIG = "config.toml"


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path(DEFAULT_CONFIG),
        help="config file (default: ./config.toml)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from node.daemon.server import Node

    config = load_config(args.config)
    setup_logging(config.node.log_level)
    Node(config).serve_forever()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(format_config(config))
    print(f"OK: {config.source} is valid", file=sys.stderr)
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from node.cli.scu import echo
    from node.net.storelink import Peer

    peer = Peer.parse(args.to)
    status = echo(peer, args.calling_aet, timeout=args.timeout)
    if status == 0:
        print(f"C-ECHO to {args.to}: success")
        return 0
    message = (
        "no association (refused, wrong AE title or unreachable)"
        if status < 0
        else f"status 0x{status:04X}"
    )
    print(f"C-ECHO to {args.to}: {message}", file=sys.stderr)
    return 1


def cmd_send(args: argparse.Namespace) -> int:
    from node.cli.scu import format_summary, send
    from node.net.storelink import Peer

    peer = Peer.parse(args.to)
    summary = send(
        peer, args.inputs, args.calling_aet, timeout=args.timeout, progress=not args.quiet
    )
    print(format_summary(summary))
    return 0 if summary.failed_count == 0 else 1


def cmd_hash_passcode(args: argparse.Namespace) -> int:
    from node.ingest.identity import hash_passcode, read_passcode_interactively

    try:
        passcode = read_passcode_interactively()
    except (ValueError, EOFError) as exc:
        print(f"dicom-node: no hash made: {exc}", file=sys.stderr)
        return 1
    print(hash_passcode(passcode))
    return 0


def _add_peer_options(parser: argparse.ArgumentParser, default_to: str | None) -> None:
    parser.add_argument(
        "--to", required=default_to is None, default=default_to, help="peer as AE@host:port"
    )
    parser.add_argument(
        "--calling-aet", default="DICOMNODE_SCU", help="our AE title (default DICOMNODE_SCU)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")


Subcommand = Callable[[argparse._SubParsersAction], None]


def _optional_subcommands() -> list[tuple[str, Subcommand, Callable[[argparse.Namespace], int]]]:
    """Subcommands owned by other modules: each module adds its own parser."""
    found = []
    for module_name in (
        "node.cli.transcode_cli",
        "node.cli.queue_cli",
        "node.cli.status_cli",
        "node.cli.haproxy_cli",
    ):
        try:
            module = __import__(module_name, fromlist=["add_parser", "run"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        found.append((module_name, module.add_parser, module.run))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the node in the foreground, logging to stderr")
    _add_config_option(run)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser(
        "check-config", help="validate the config and print the effective values"
    )
    _add_config_option(check)
    check.set_defaults(func=cmd_check_config)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM node (verification)")
    _add_peer_options(echo, default_to="DICOMNODE@127.0.0.1:11112")
    echo.set_defaults(func=cmd_echo)

    send = commands.add_parser("send", help="C-STORE files and folders to a DICOM node")
    send.add_argument("inputs", nargs="+", type=Path, metavar="FILES_OR_DIRS")
    _add_peer_options(send, default_to=None)
    send.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    send.set_defaults(func=cmd_send)

    hashing = commands.add_parser(
        "hash-passcode",
        help="print a [[security.users]] passcode_hash (passcode from a prompt or stdin)",
    )
    hashing.set_defaults(func=cmd_hash_passcode)

    for _name, add_parser, run_command in _optional_subcommands():
        before = set(commands.choices)
        add_parser(commands)
        for added in set(commands.choices) - before:
            commands.choices[added].set_defaults(func=run_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
