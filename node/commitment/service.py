"""What the acceptor's handlers call for Storage Commitment, in both roles.

- N-ACTION-RQ (a modality asks us): node.commitment.requests records it, the
  reporter remembers the association for the report;
- N-EVENT-REPORT-RQ (a destination reports to us on a new association): the
  forwarder's requester (node.forward.commitment) applies it to its jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

from node.commitment.reporter import ReportChannel, Reporter
from node.commitment.requests import CommitmentRequests, Requestor
from node.net import dimse
from node.net.dimse import Answer, Command

log = logging.getLogger("node.commitment")

# (calling AE title, command, transfer syntax, data set) -> the N-EVENT-REPORT-RSP's answer
ReportSink = Callable[[str, Command, str, bytes], Answer]


class CommitmentService:
    def __init__(
        self,
        requests: CommitmentRequests | None = None,
        reporter: Reporter | None = None,
        report_sink: ReportSink | None = None,
    ) -> None:
        self.requests = requests
        self.reporter = reporter
        self.report_sink = report_sink

    def action(
        self, assoc: Requestor, command: Command, transfer_syntax: str, data: bytes
    ) -> Answer:
        if self.requests is None:
            log.warning(
                "N-ACTION-RQ from %s %r: [commitment] is not enabled; answered 0x%04X",
                assoc.address,
                assoc.calling_ae_title,
                dimse.UNRECOGNIZED_OPERATION,
            )
            return Answer(dimse.UNRECOGNIZED_OPERATION)
        return self.requests.action(assoc, command, transfer_syntax, data)

    def event_report(
        self, assoc: Requestor, command: Command, transfer_syntax: str, data: bytes
    ) -> Answer:
        if self.report_sink is None:
            log.warning(
                "N-EVENT-REPORT-RQ from %s %r: no destination has commitment = true;"
                " answered 0x%04X",
                assoc.address,
                assoc.calling_ae_title,
                dimse.UNRECOGNIZED_OPERATION,
            )
            return Answer(dimse.UNRECOGNIZED_OPERATION)
        return self.report_sink(assoc.calling_ae_title, command, transfer_syntax, data)

    def remember(self, commitment_id: int, assoc: Requestor) -> None:
        """The association a request came on: its report goes back on it while it is open."""
        if self.reporter is not None and hasattr(assoc, "send_request"):
            self.reporter.remember(commitment_id, cast(ReportChannel, assoc))

    def closed(self, assoc: object) -> None:
        if self.reporter is not None:
            self.reporter.forget(assoc)
