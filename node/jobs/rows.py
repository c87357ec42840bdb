"""A job as the queue's SELECTs return it: the columns and the Job they become.

Shared by the job lifecycle (node.jobs.jobqueue) and group claims (node.jobs.groups).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from node.jobs.model import Job, JobKind, ReceivedInstance

JOB_COLUMNS = """
    jobs.id, jobs.kind, jobs.target, jobs.attempts, jobs.instance_id,
    instances.sop_instance_uid, instances.sop_class_uid, instances.transfer_syntax,
    instances.calling_ae_title, instances.called_ae_title, instances.spool_path, instances.size,
    instances.received_at, instances.header_values
"""


def job_from_row(row: sqlite3.Row) -> Job:
    instance = ReceivedInstance(
        sop_instance_uid=row[5],
        sop_class_uid=row[6],
        transfer_syntax=row[7],
        calling_ae_title=row[8],
        called_ae_title=row[9],
        spool_path=Path(row[10]),
        size=row[11],
        received_at=row[12],
        header_values=_header_values(row[13]),
    )
    return Job(
        id=row[0],
        kind=JobKind(row[1]),
        target=row[2],
        attempts=row[3],
        instance_id=row[4],
        instance=instance,
    )


def _header_values(text: str) -> tuple[tuple[str, str], ...]:
    """ReceivedInstance.header_values from its JSON column ('' when intake recorded none)."""
    return tuple(json.loads(text).items()) if text else ()
