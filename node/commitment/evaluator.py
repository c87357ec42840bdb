"""When a referenced instance counts as committed: the `when` of [commitment], as pure functions.

- received: spooled and recorded in the queue (the C-STORE was answered 0x0000);
- stored: also in every storage target its route chose (no store job left open);
- delivered: also delivered to every destination of the instance (no forward job
  left open; towards a destination with `commitment = true` that means its own
  report said committed).

An instance the node does not know fails at once with 0x0112, one whose SOP
Class differs from the request's with 0x0119, one whose job became a dead
letter with 0x0110; one that is still on its way waits until the request's
report_timeout, then fails with 0x0110.
"""

from __future__ import annotations

from typing import Literal

from node.commitment.messages import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
)
from node.jobs.commitments import COMMITTED, CommitmentItem, InstanceProgress

When = Literal["received", "stored", "delivered"]


def immediate_outcome(item: CommitmentItem, progress: InstanceProgress | None) -> int | None:
    """What is known the moment the request arrives: unknown or conflicting instances."""
    if progress is None:
        return NO_SUCH_OBJECT_INSTANCE
    if progress.sop_class_uid and progress.sop_class_uid != item.sop_class_uid:
        return CLASS_INSTANCE_CONFLICT
    return None


def outcome(
    item: CommitmentItem, progress: InstanceProgress | None, when: When, expired: bool
) -> int | None:
    """COMMITTED, a Failure Reason, or None (not yet: ask again later)."""
    found = immediate_outcome(item, progress)
    if found is not None:
        return found
    assert progress is not None
    if when == "delivered" and progress.failed:
        return PROCESSING_FAILURE  # a dead letter: an operator must act; the modality keeps it
    if _meets(progress, when):
        return COMMITTED
    return PROCESSING_FAILURE if expired else None


def _meets(progress: InstanceProgress, when: When) -> bool:
    if when == "received":
        return True
    if when == "stored":
        return not progress.store_open
    return not progress.store_open and not progress.forward_open
