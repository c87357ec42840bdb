"""The dicom-node command line: run the node, check its config, and talk to peers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from node import __version__
from node.config.model import Config, ConfigError, UserConfig, load_config
from node.daemon.logs import setup_logging
from node.dicom.syntaxes import syntax_name
from node.transcode.targets import Target

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


_TARGET_OPTIONS = {
    "near": "near_lossless",
    "ratio": "j2k_ratio",
    "psnr": "j2k_psnr",
    "quality": "jpeg_quality",
}
_SERVER_TLS_KEYS = frozenset({"require_client_cert", "port", "plain_listener"})


@dataclass(frozen=True)
class _Routing:
    unrouted_storage: str | None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Target):
        options = {
            option: getattr(value, attribute)
            for option, attribute in _TARGET_OPTIONS.items()
            if getattr(value, attribute) is not None
        }
        if not options:
            return _toml_value(value.name)
        pairs = [("syntax", value.name), *options.items()]
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in pairs) + " }"
    if isinstance(value, UID):
        return (
            _toml_value(syntax_name(value)) if value.is_transfer_syntax else _toml_value(str(value))
        )
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value) + " }"
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def _toml_table(header: str, table: Any, skip: frozenset[str] = frozenset()) -> list[str]:
    lines = [header]
    nested = []
    arrays = []
    for item in fields(table):
        value = getattr(table, item.name)
        if item.name in skip:
            continue
        if is_dataclass(value):
            nested.append((item.name, value))
        elif isinstance(value, tuple) and value and all(isinstance(v, UserConfig) for v in value):
            arrays.append((item.name, value))  # [[security.users]]
        elif value is None:
            lines.append(f"# {item.name} is not set")
        else:
            lines.append(f"{item.name} = {_toml_value(value)}")
    name = header.strip("[]")
    for key, value in nested:
        # A destination's TLS is the client side: the listener-only keys do not apply.
        only_server = _SERVER_TLS_KEYS if name == "destination" else frozenset()
        lines += ["", *_toml_table(f"[{name}.{key}]", value, only_server)]
    for key, values in arrays:
        for value in values:
            lines += ["", *_toml_table(f"[[{name}.{key}]]", value)]
    return lines


def format_config(config: Config) -> str:
    """The effective config as TOML: every default filled in, syntaxes by keyword."""
    lines = [f"# effective configuration of {config.source}"]
    for name in ("node", "accept", "security", "limits", "metrics"):
        lines += ["", *_toml_table(f"[{name}]", getattr(config, name))]
    lines += ["", *_toml_table("[routing]", _Routing(config.unrouted_storage))]
    for name, tables in (
        ("storage", config.storage),
        ("destination", config.destinations),
        ("route", config.routes),
    ):
        for table in tables:
            lines += ["", *_toml_table(f"[[{name}]]", table)]
    return "\n".join(lines) + "\n"


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
    for module_name in ("node.cli.transcode_cli", "node.cli.queue_cli", "node.cli.status_cli"):
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
