"""Build the Storage Commitment service from the config (node.daemon.server calls this)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from node.commitment.reporter import Reporter
from node.commitment.requests import CommitmentRequests
from node.commitment.service import CommitmentService
from node.config.model import Config
from node.jobs.interface import CommitmentRecords
from node.net.dimse import Answer, Command


class ReportApplier(Protocol):
    """The forwarder's Storage Commitment SCU (node.forward.commitment.CommitmentRequester)."""

    def on_report(
        self, calling_ae_title: str, command: Command, syntax: str, data: bytes
    ) -> Answer: ...


def commitment_service(
    config: Config,
    records: CommitmentRecords,
    requester: Callable[[], ReportApplier | None],
) -> CommitmentService:
    """The SCP side if [commitment] is enabled; reports from destinations go to `requester()`
    (looked up per report: a reload may replace the forwarder)."""
    service = CommitmentService()
    commitment = config.commitment
    if commitment.enabled:
        service.reporter = Reporter(commitment, config.node, records)
        service.requests = CommitmentRequests(
            records, commitment.when, commitment.report_timeout, service.remember
        )
    if any(d.commitment for d in config.destinations):

        def sink(calling: str, command: Command, syntax: str, data: bytes) -> Answer:
            applier = requester()
            if applier is None:
                return Answer(0x0110, "no destination has commitment = true")
            return applier.on_report(calling, command, syntax, data)

        service.report_sink = sink
    return service
