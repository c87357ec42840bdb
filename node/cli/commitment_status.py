"""The Storage Commitment part of `dicom-node queue status`: open commitments per peer.

`requested`: asked of us by a modality (PEER is its calling AE title), waiting for
its instances or for the report to be delivered. `sent`: asked by us of a
destination (PEER is its name), waiting for its report.
"""

from __future__ import annotations

import time

from node.jobs.interface import CommitmentRecords


def print_commitments(records: CommitmentRecords) -> None:
    rows = records.commitment_summary()
    if not rows:
        return
    now = time.time()
    table = [("COMMITMENT", "PEER", "OPEN", "INSTANCES", "OLDEST", "NEXT TRY", "LAST ERROR")]
    for row in rows:
        oldest = (
            "-" if row.oldest_created_at is None else f"{max(0, int(now - row.oldest_created_at))}s"
        )
        due = "-"
        if row.direction == "requested" and row.next_attempt_at is not None:
            wait = row.next_attempt_at - now
            due = "when settled" if wait <= 0 else f"in {int(wait)}s"
        table.append(
            (
                row.direction,
                row.peer,
                str(row.count),
                str(row.instances),
                oldest,
                due,
                row.last_error or "",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    print()
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())
