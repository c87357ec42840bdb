"""The N-ACTION-RQ of a modality asking for Storage Commitment: checked, recorded, answered.

The request is recorded durably in the queue database before the N-ACTION-RSP,
so a node killed right after answering still reports. Instances the node does
not know, or knows under another SOP Class, are settled as failed at once; the
rest are settled by the reporter (node.commitment.reporter) as they meet
`[commitment] when`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from node.commitment import counters
from node.commitment.evaluator import When, immediate_outcome
from node.commitment.messages import (
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_ACTION_TYPE,
    REQUEST_STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentMessageError,
    decode_request,
)
from node.jobs.commitments import COMMITTED, CommitmentItem, Direction, NewCommitment
from node.jobs.interface import CommitmentRecords
from node.net.dimse import PROCESSING_FAILURE, Answer, Command

log = logging.getLogger("node.commitment")


class Requestor(Protocol):
    """What is read of the association an N-ACTION-RQ came on."""

    @property
    def calling_ae_title(self) -> str: ...
    @property
    def called_ae_title(self) -> str: ...
    @property
    def address(self) -> str: ...


class CommitmentRequests:
    """Handles N-ACTION-RQ for the Storage Commitment Push Model SOP Class (we are its SCP)."""

    def __init__(
        self,
        records: CommitmentRecords,
        when: When,
        report_timeout: float,
        on_recorded: Callable[[int, Requestor], None],
    ) -> None:
        self.records = records
        self.when = when
        self.report_timeout = report_timeout
        self.on_recorded = on_recorded  # the reporter: remember the association, wake up

    def action(
        self, assoc: Requestor, command: Command, transfer_syntax: str, data: bytes
    ) -> Answer:
        if command.action_type_id != REQUEST_STORAGE_COMMITMENT:
            return self._refuse(
                assoc, NO_SUCH_ACTION_TYPE, f"Action Type ID {command.action_type_id}"
            )
        if command.requested_sop_instance_uid != STORAGE_COMMITMENT_INSTANCE:
            return self._refuse(
                assoc,
                INVALID_ARGUMENT_VALUE,
                f"Requested SOP Instance {command.requested_sop_instance_uid!r} is not"
                f" {STORAGE_COMMITMENT_INSTANCE}",
            )
        try:
            request = decode_request(data, transfer_syntax)
        except CommitmentMessageError as exc:
            return self._refuse(assoc, PROCESSING_FAILURE, str(exc))
        items = self._first_outcomes(
            [CommitmentItem(r.sop_class_uid, r.sop_instance_uid) for r in request.references]
        )
        new = NewCommitment(
            direction=Direction.REQUESTED,
            transaction_uid=request.transaction_uid,
            peer=assoc.calling_ae_title,
            our_ae_title=assoc.called_ae_title,
            deadline=time.time() + self.report_timeout,
            items=tuple(items),
        )
        try:
            commitment_id = self.records.record_commitment(new)
        except Exception as exc:  # the database busy past its timeout, a full disk
            log.exception("cannot record Transaction UID %s", request.transaction_uid)
            # Not recorded, so not promised: the modality keeps its images and may ask again.
            return self._refuse(assoc, PROCESSING_FAILURE, f"cannot record the request: {exc}")
        counters.record_request("received")
        failed = sum(item.reason not in (None, COMMITTED) for item in items)
        log.info(
            "storage commitment request from %s %r, Transaction UID %s: %d instances"
            " (%d unknown or conflicting), reported when %s",
            assoc.address,
            assoc.calling_ae_title,
            request.transaction_uid,
            len(items),
            failed,
            self.when,
        )
        self.on_recorded(commitment_id, assoc)
        return Answer(0x0000)

    def _first_outcomes(self, items: list[CommitmentItem]) -> list[CommitmentItem]:
        progress = self.records.instance_progress([item.sop_instance_uid for item in items])
        settled = []
        for item in items:
            found = progress.get(item.sop_instance_uid)
            reason = immediate_outcome(item, found)
            if reason is None and found is not None and self.when == "received":
                reason = COMMITTED
            settled.append(CommitmentItem(item.sop_class_uid, item.sop_instance_uid, reason))
        return settled

    def _refuse(self, assoc: Requestor, status: int, why: str) -> Answer:
        log.warning(
            "refused a storage commitment request from %s %r with status 0x%04X: %s",
            assoc.address,
            assoc.calling_ae_title,
            status,
            why,
        )
        return Answer(status, why)
