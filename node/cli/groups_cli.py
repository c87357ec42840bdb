"""`dicom-node queue status` (its groups table), `queue release` and `queue hold`: series and
study groups waiting for their trigger, as an operator sees and steers them."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from node.jobs.interface import QueueOperations
from node.jobs.model import GroupReport, GroupState, group_due, group_waits_for

ACTIONS = ("release", "hold")


def add_actions(
    actions: argparse._SubParsersAction,
    add_config_option: Callable[[argparse.ArgumentParser, object], None],
) -> None:
    release = actions.add_parser(
        "release", help="send waiting or held series/study groups now (--study or --series)"
    )
    hold = actions.add_parser(
        "hold", help="pause waiting series/study groups until `queue release` (--study or --series)"
    )
    for parser in (release, hold):
        add_config_option(parser, argparse.SUPPRESS)
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--study", metavar="UID", help="groups of this Study Instance UID")
        which.add_argument(
            "--series",
            metavar="UID",
            help="groups of this Series Instance UID (and study groups holding it)",
        )
        only = parser.add_mutually_exclusive_group()
        only.add_argument("--destination", metavar="NAME", help="only this [[destination]]")
        only.add_argument("--storage", metavar="NAME", help="only this [[storage]] target")


def run(queue: QueueOperations, args: argparse.Namespace) -> int:
    target = args.destination or args.storage
    which = (
        f"Study Instance UID {args.study}" if args.study else f"Series Instance UID {args.series}"
    )
    if args.queue_action == "release":
        count = queue.release_groups(study=args.study, series=args.series, target=target)
        print(f"{count} groups of {which} released: their instances are due now")
    else:
        count = queue.hold_groups(study=args.study, series=args.series, target=target)
        print(f"{count} groups of {which} held: sent only after `dicom-node queue release`")
    return 0 if count else 1


def group_lines(queue: QueueOperations, now: float, age: Callable[[float], str]) -> list[str]:
    """The groups table of `queue status`: waiting, held and not yet delivered groups."""
    groups = [*queue.waiting_groups(), *queue.dispatched_groups()]
    if not groups:
        return []
    table: list[Sequence[str]] = [
        (
            "ROUTE",
            "KIND",
            "TARGET",
            "LEVEL",
            "STUDY INSTANCE UID",
            "SERIES INSTANCE UID",
            "VERSION",
            "STATE",
            "INSTANCES",
            "AGE",
            "DUE",
            "NOTE",
        )
    ]
    table += [_line(group, now, age) for group in groups]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)), line[-1]]).rstrip()
        for line in table
    ]


def _line(group: GroupReport, now: float, age: Callable[[float], str]) -> Sequence[str]:
    at, reason = group_due(group)
    if group.state == GroupState.DISPATCHED:
        due, note = "sending", group.reason
    elif at is None:
        due, note = "-", group_waits_for(group) or "waits for force_after"
    else:
        due = "now" if at <= now else f"in {age(at - now)}"
        note = reason if not group_waits_for(group) else f"{reason}; {group_waits_for(group)}"
    return (
        group.route,
        group.kind,
        group.target,
        group.level,
        group.study_instance_uid,
        group.series_instance_uid or "-",
        str(group.version),
        group.state,
        str(group.members),
        age(now - group.first_arrival_at),
        due,
        note,
    )
