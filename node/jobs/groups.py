"""Series and study groups on SQLite: durable membership, dispatch, claims and reports.

A route with trigger = "series" or "study" makes each of its jobs a member of a
group: one per (kind, target, level, Study Instance UID, Series Instance UID,
or "" for a study). Intake records the membership in the transaction that
records the instance (join_group, called by node.jobs.jobqueue), with the job
in state WAITING, which `claim` never takes. The node's timer reads the
waiting groups and dispatches the stable ones (dispatch_group): their store
jobs become pending, their forward jobs are claimed as one group by a forward
worker (claim_group) and sent over one association. A group is DELIVERED once
every member's job is done (settle_groups).

An instance of a group that is already dispatched starts the next version of
it, a new group with its own stable timer: a late arrival, logged and counted
(job_group_totals, in the same transaction, so the count survives restarts).
What was dispatched before is never sent again.

The SQL is portable (no SQLite-only syntax beyond `?` placeholders); a
PostgreSQL backend may run the same statements. Job ids can be reused by
SQLite once a job's rows are deleted, so a member is matched to its job by id
*and* kind, target and SOP Instance UID, and a done member is never matched.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from node.jobs.model import (
    GroupClaim,
    GroupMembership,
    GroupReport,
    GroupState,
    GroupTotals,
    Job,
    JobKind,
    JobSpec,
    JobState,
)
from node.jobs.rows import JOB_COLUMNS, job_from_row

if TYPE_CHECKING:  # node.jobs.database lists SCHEMA below in its EXTRA_SCHEMAS
    from node.jobs.database import Database

log = logging.getLogger("node.groups")

SCHEMA = """
CREATE TABLE IF NOT EXISTS job_groups (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    level TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    route TEXT NOT NULL,
    state TEXT NOT NULL,
    members INTEGER NOT NULL,
    stable_after REAL NOT NULL,
    force_after REAL NOT NULL,
    expected_instances INTEGER NOT NULL,
    required_series TEXT NOT NULL,
    first_arrival_at REAL NOT NULL,
    last_arrival_at REAL NOT NULL,
    dispatched_at REAL,
    delivered_at REAL,
    reason TEXT NOT NULL,
    UNIQUE (kind, target, level, study_instance_uid, series_instance_uid, version)
);
CREATE INDEX IF NOT EXISTS job_groups_by_state ON job_groups (state, kind, target);
CREATE TABLE IF NOT EXISTS job_group_members (
    group_id INTEGER NOT NULL REFERENCES job_groups (id),
    job_id INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    series_number INTEGER,
    instance_number INTEGER,
    series_description TEXT NOT NULL,
    arrived_at REAL NOT NULL,
    done_at REAL,
    PRIMARY KEY (group_id, job_id)
);
CREATE INDEX IF NOT EXISTS job_group_members_by_job ON job_group_members (job_id);
CREATE TABLE IF NOT EXISTS job_group_totals (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

# Delivered groups are remembered this long, so that a late arrival is recognised as one.
# After that an instance of the same series starts a version 1 group again.
REMEMBER_DELIVERED = 30 * 86400.0

# A very large sort key for a missing Series Number or Instance Number: they go last.
_LAST = 2**31 - 1

_GROUP_COLUMNS = """
    g.id, g.kind, g.target, g.route, g.level, g.study_instance_uid, g.series_instance_uid,
    g.version, g.state, g.members, g.first_arrival_at, g.last_arrival_at, g.stable_after,
    g.force_after, g.expected_instances, g.required_series, g.dispatched_at, g.reason
"""

# A member whose job is still there and not done (ids may be reused: match the job too).
_OPEN_MEMBER = """
    FROM job_group_members m
    JOIN jobs ON jobs.id = m.job_id
    JOIN instances ON instances.id = jobs.instance_id
    WHERE m.group_id = g.id AND m.done_at IS NULL AND jobs.kind = g.kind
    AND jobs.target = g.target AND instances.sop_instance_uid = m.sop_instance_uid
"""


def _group_from_row(row: Any, descriptions: tuple[str, ...] = ()) -> GroupReport:
    required = tuple(json.loads(str(row[15]))) if row[15] else ()
    return GroupReport(
        id=int(row[0]),
        kind=str(row[1]),
        target=str(row[2]),
        route=str(row[3]),
        level=str(row[4]),
        study_instance_uid=str(row[5]),
        series_instance_uid=str(row[6]),
        version=int(row[7]),
        state=str(row[8]),
        members=int(row[9]),
        first_arrival_at=float(row[10]),
        last_arrival_at=float(row[11]),
        stable_after=float(row[12]),
        force_after=float(row[13]),
        expected_instances=int(row[14]),
        required_series=required,
        series_descriptions=descriptions,
        dispatched_at=None if row[16] is None else float(row[16]),
        reason=str(row[17] or ""),
    )


# Intake, inside record_instance's transaction (node.jobs.jobqueue).


def join_group(db: sqlite3.Connection, instance_id: int, job: JobSpec, uid: str, now: float) -> int:
    """Insert a grouped job (WAITING) and record it as a member of its group; its job id."""
    membership = job.group
    assert membership is not None
    job_id = int(
        db.execute(
            "INSERT INTO jobs (instance_id, kind, target, state, next_attempt_at,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (instance_id, job.kind, job.target, JobState.WAITING, now, now, now),
        ).lastrowid
        or 0
    )
    group_id = _open_group(db, job, membership, uid, now)
    db.execute(
        "INSERT INTO job_group_members (group_id, job_id, sop_instance_uid, series_instance_uid,"
        " series_number, instance_number, series_description, arrived_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            group_id,
            job_id,
            uid,
            membership.member_series_uid,
            membership.series_number,
            membership.instance_number,
            membership.series_description,
            now,
        ),
    )
    return job_id


def _open_group(
    db: sqlite3.Connection, job: JobSpec, membership: GroupMembership, uid: str, now: float
) -> int:
    """The group this member joins: the newest version if it still waits, else a new one."""
    trigger = membership.trigger
    key = (
        job.kind,
        job.target,
        trigger.level,
        membership.study_instance_uid,
        membership.series_instance_uid,
    )
    newest = db.execute(
        "SELECT id, state, version FROM job_groups WHERE kind = ? AND target = ? AND level = ?"
        " AND study_instance_uid = ? AND series_instance_uid = ? ORDER BY version DESC LIMIT 1",
        key,
    ).fetchone()
    if newest is not None and newest[1] in (GroupState.WAITING, GroupState.HELD):
        db.execute(
            "UPDATE job_groups SET members = members + 1, last_arrival_at = ?,"
            " expected_instances = CASE WHEN expected_instances < ? THEN ?"
            " ELSE expected_instances END WHERE id = ?",
            (now, membership.expected_instances, membership.expected_instances, newest[0]),
        )
        if newest[2] > 1:
            _count(db, "late_arrivals")
        return int(newest[0])
    version = 1 if newest is None else int(newest[2]) + 1
    cursor = db.execute(
        "INSERT INTO job_groups (kind, target, level, study_instance_uid, series_instance_uid,"
        " version, route, state, members, stable_after, force_after, expected_instances,"
        " required_series, first_arrival_at, last_arrival_at, reason)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, '')",
        (
            *key,
            version,
            trigger.route,
            GroupState.WAITING,
            trigger.stable_after,
            trigger.force_after,
            membership.expected_instances,
            json.dumps(list(trigger.required_series)) if trigger.required_series else "",
            now,
            now,
        ),
    )
    if version > 1:
        _count(db, "late_arrivals")
        log.warning(
            "late arrival: SOP Instance UID %s for %s %r of %s %s (Study Instance UID %s)"
            " arrived after version %d was dispatched; it starts version %d, sent on its own"
            " stable timer (what was sent before is not sent again)",
            uid,
            job.kind,
            job.target,
            trigger.level,
            membership.series_instance_uid or membership.study_instance_uid,
            membership.study_instance_uid,
            version - 1,
            version,
        )
    return int(cursor.lastrowid or 0)


def _count(db: sqlite3.Connection, name: str, by: int = 1) -> None:
    updated = db.execute(
        "UPDATE job_group_totals SET value = value + ? WHERE name = ?", (by, name)
    ).rowcount
    if not updated:
        db.execute("INSERT INTO job_group_totals (name, value) VALUES (?, ?)", (name, by))


# Hooks of the job lifecycle (node.jobs.jobqueue), in its transactions.


def mark_member_done(db: sqlite3.Connection, job_id: int, now: float) -> None:
    """A job is done: so is its membership (in the transaction that completes the job)."""
    db.execute(
        "UPDATE job_group_members SET done_at = ? WHERE job_id = ? AND done_at IS NULL",
        (now, job_id),
    )


def requeue_group_members(db: sqlite3.Connection, now: float) -> int:
    """Before running jobs become pending at start: those of dispatched groups become
    WAITING again, so that their group is claimed and sent as one again."""
    return int(
        db.execute(
            "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ? AND id IN ("
            " SELECT m.job_id FROM job_group_members m"
            " JOIN job_groups g ON g.id = m.group_id"
            " WHERE g.state = ? AND g.kind = ? AND m.done_at IS NULL)",
            (JobState.WAITING, now, JobState.RUNNING, GroupState.DISPATCHED, JobKind.FORWARD),
        ).rowcount
    )


def _dispatch(db: sqlite3.Connection, group_id: int, reason: str, now: float) -> None:
    """The group's jobs are due together: store jobs pending now, forward jobs claimed as one."""
    db.execute(
        "UPDATE jobs SET state = ?, next_attempt_at = ?, updated_at = ?"
        " WHERE state = ? AND kind = ? AND id IN ("
        " SELECT job_id FROM job_group_members WHERE group_id = ? AND done_at IS NULL)",
        (JobState.PENDING, now, now, JobState.WAITING, JobKind.STORE, group_id),
    )
    _count(db, "dispatched")


def _selection(
    study: str | None, series: str | None, target: str | None
) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    if study is not None:
        clauses.append("study_instance_uid = ?")
        params.append(study)
    if series is not None:
        # A study group holds that series too: it is released (or held) with it.
        clauses.append(
            "(series_instance_uid = ? OR id IN (SELECT group_id FROM job_group_members"
            " WHERE series_instance_uid = ? AND done_at IS NULL))"
        )
        params += [series, series]
    if target is not None:
        clauses.append("target = ?")
        params.append(target)
    return " AND ".join(clauses) or "1 = 1", params


class SqliteGroups:
    """node.jobs.interface.GroupQueue, GroupOperations and the group reports, on SQLite.

    A base of SqliteJobQueue and SqliteQueueOperations (both have `database`)."""

    database: Database

    # The timer and the reports.

    def waiting_groups(self) -> list[GroupReport]:
        return self._groups_in((GroupState.WAITING, GroupState.HELD))

    def dispatched_groups(self) -> list[GroupReport]:
        groups = self._groups_in((GroupState.DISPATCHED,))
        with self.database.read() as db:
            errors = dict(
                db.execute(
                    "SELECT m.group_id, MAX(jobs.last_error) FROM job_group_members m"
                    " JOIN jobs ON jobs.id = m.job_id"
                    " JOIN job_groups g ON g.id = m.group_id"
                    " WHERE g.state = ? AND m.done_at IS NULL AND jobs.last_error IS NOT NULL"
                    " AND jobs.state IN (?, ?) GROUP BY m.group_id",
                    (GroupState.DISPATCHED, JobState.FAILED, JobState.PENDING),
                ).fetchall()
            )
        return [_with_reason(group, errors.get(group.id)) for group in groups]

    def _groups_in(self, states: Sequence[str]) -> list[GroupReport]:
        marks = ", ".join("?" for _ in states)
        with self.database.read() as db:
            rows = db.execute(
                f"SELECT {_GROUP_COLUMNS} FROM job_groups g WHERE g.state IN ({marks})"
                " ORDER BY g.first_arrival_at, g.id",
                list(states),
            ).fetchall()
            descriptions: dict[int, list[str]] = {}
            if any(row[15] for row in rows):  # only required_series needs them
                for group_id, description in db.execute(
                    "SELECT DISTINCT m.group_id, m.series_description FROM job_group_members m"
                    f" JOIN job_groups g ON g.id = m.group_id WHERE g.state IN ({marks})"
                    " AND g.required_series != ''",
                    list(states),
                ).fetchall():
                    descriptions.setdefault(int(group_id), []).append(str(description))
        return [_group_from_row(row, tuple(descriptions.get(row[0], ()))) for row in rows]

    def group_totals(self) -> GroupTotals:
        with self.database.read() as db:
            values = dict(db.execute("SELECT name, value FROM job_group_totals").fetchall())
        return GroupTotals(
            late_arrivals=int(values.get("late_arrivals", 0)),
            dispatched=int(values.get("dispatched", 0)),
        )

    def dispatch_group(self, group_id: int, reason: str, *, if_members: int | None = None) -> bool:
        now = time.time()
        only_if = "" if if_members is None else " AND members = ?"
        extra: list[object] = [] if if_members is None else [if_members]

        def work(db: sqlite3.Connection) -> bool:
            changed = db.execute(
                "UPDATE job_groups SET state = ?, dispatched_at = ?, reason = ?"
                " WHERE id = ? AND state = ?" + only_if,
                [GroupState.DISPATCHED, now, reason, group_id, GroupState.WAITING, *extra],
            ).rowcount
            if changed:
                _dispatch(db, group_id, reason, now)
            return bool(changed)

        return bool(self.database.write_durably(work))

    # Forward workers.

    def claim_group(self, kind: JobKind, target: str) -> GroupClaim | None:
        query = (
            f"SELECT {_GROUP_COLUMNS} FROM job_groups g WHERE g.state = ? AND g.kind = ?"
            f" AND g.target = ? AND EXISTS (SELECT 1 {_OPEN_MEMBER} AND jobs.state = ?)"
            " ORDER BY g.dispatched_at, g.id LIMIT 1"
        )
        params = (GroupState.DISPATCHED, kind, target, JobState.WAITING)
        # A look on the reader first: a forward worker asks before every claim.
        with self.database.read() as db:
            if db.execute(query, params).fetchone() is None:
                return None
        now = time.time()
        with self.database.transaction(durable=False) as db:
            row = db.execute(query, params).fetchone()
            if row is None:
                return None
            group = _group_from_row(row)
            jobs = db.execute(
                f"SELECT {JOB_COLUMNS} FROM job_group_members m"
                " JOIN jobs ON jobs.id = m.job_id JOIN instances ON instances.id = jobs.instance_id"
                " WHERE m.group_id = ? AND m.done_at IS NULL AND jobs.state = ?"
                " AND jobs.kind = ? AND jobs.target = ? AND instances.sop_instance_uid ="
                " m.sop_instance_uid ORDER BY COALESCE(m.series_number, ?), m.series_instance_uid,"
                " COALESCE(m.instance_number, ?), m.arrived_at, m.job_id",
                (group.id, JobState.WAITING, kind, target, _LAST, _LAST),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE id = ?",
                [(JobState.RUNNING, now, job[0]) for job in jobs],
            )
        claimed = [job_from_row(job) for job in jobs]
        return GroupClaim(group, [_claimed(job) for job in claimed])

    def return_to_group(self, jobs: Sequence[Job], error: str | None = None) -> None:
        if not jobs:
            return
        now = time.time()
        with self.database.transaction(durable=False) as db:
            rest = jobs
            if error is not None:
                first, *rest = jobs
                db.execute(
                    "UPDATE jobs SET state = ?, last_error = ?, updated_at = ?"
                    " WHERE id = ? AND state = ?",
                    (JobState.WAITING, error, now, first.id, JobState.RUNNING),
                )
            db.executemany(
                "UPDATE jobs SET state = ?, attempts = attempts - 1, updated_at = ?"
                " WHERE id = ? AND state = ?",
                [(JobState.WAITING, now, job.id, JobState.RUNNING) for job in rest],
            )

    def settle_groups(self) -> list[GroupReport]:
        settle = (
            f"SELECT {_GROUP_COLUMNS} FROM job_groups g WHERE g.state = ?"
            f" AND NOT EXISTS (SELECT 1 {_OPEN_MEMBER})"
        )
        # Looked for on the reader first: the timer asks twice a second, and a group held
        # by a failed member for days must not cost a durable commit each time.
        with self.database.read() as db:
            if db.execute(settle + " LIMIT 1", (GroupState.DISPATCHED,)).fetchone() is None:
                return []
        now = time.time()

        def work(db: sqlite3.Connection) -> list[GroupReport]:
            settled = []
            for row in db.execute(settle, (GroupState.DISPATCHED,)).fetchall():
                settled.append(_settle(db, row, now))
            db.execute(
                "DELETE FROM job_groups WHERE state = ? AND delivered_at < ?",
                (GroupState.DELIVERED, now - REMEMBER_DELIVERED),
            )
            return settled

        return list(self.database.write_durably(work))

    # Operations.

    def release_groups(
        self, *, study: str | None = None, series: str | None = None, target: str | None = None
    ) -> int:
        where, params = _selection(study, series, target)
        now = time.time()

        def work(db: sqlite3.Connection) -> int:
            ids = [
                row[0]
                for row in db.execute(
                    f"SELECT id FROM job_groups WHERE state IN (?, ?) AND {where}",
                    [GroupState.WAITING, GroupState.HELD, *params],
                ).fetchall()
            ]
            for group_id in ids:
                db.execute(
                    "UPDATE job_groups SET state = ?, dispatched_at = ?, reason = ? WHERE id = ?",
                    (GroupState.DISPATCHED, now, "released by an operator", group_id),
                )
                _dispatch(db, group_id, "released by an operator", now)
            return len(ids)

        return int(self.database.write_durably(work))

    def hold_groups(
        self, *, study: str | None = None, series: str | None = None, target: str | None = None
    ) -> int:
        where, params = _selection(study, series, target)
        with self.database.transaction() as db:
            return int(
                db.execute(
                    f"UPDATE job_groups SET state = ? WHERE state = ? AND {where}",
                    [GroupState.HELD, GroupState.WAITING, *params],
                ).rowcount
            )


def _settle(db: sqlite3.Connection, row: Any, now: float) -> GroupReport:
    """Mark a group whose members are all done (or purged) delivered; forget its members."""
    group = _group_from_row(row)
    (purged,) = db.execute(
        "SELECT COUNT(*) FROM job_group_members WHERE group_id = ? AND done_at IS NULL",
        (group.id,),
    ).fetchone()
    db.execute(
        "UPDATE job_groups SET state = ?, delivered_at = ? WHERE id = ?",
        (GroupState.DELIVERED, now, group.id),
    )
    db.execute("DELETE FROM job_group_members WHERE group_id = ?", (group.id,))
    note = f"; {purged} members were purged, not delivered" if purged else ""
    return _with_state(group, GroupState.DELIVERED, group.reason + note)


def _claimed(job: Job) -> Job:
    # The rows were read before the UPDATE: the claim itself is one more attempt.
    return replace(job, attempts=job.attempts + 1)


def _with_state(group: GroupReport, state: str, reason: str) -> GroupReport:
    return replace(group, state=state, reason=reason)


def _with_reason(group: GroupReport, error: str | None) -> GroupReport:
    if error is None:
        return group
    return _with_state(group, group.state, f"a member failed: {error}")
