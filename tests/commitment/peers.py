"""pynetdicom peers for the Storage Commitment tests: a modality (SCU), a report receiver, a
destination that never reports. In-process AEs on loopback, stopped by the tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
)
from pynetdicom.transport import ThreadedAssociationServer

from tests.support import free_port

INSTANCE = "1.2.840.10008.1.20.1.1"


@dataclass(frozen=True)
class Report:
    """An N-EVENT-REPORT-RQ as a requestor received it."""

    event_type_id: int
    transaction_uid: str
    committed: tuple[str, ...]
    failed: dict[str, int]
    calling_ae_title: str = ""


def report_from(event: evt.Event) -> Report:
    info = event.event_information
    committed = tuple(
        str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])
    )
    failed = {
        str(item.ReferencedSOPInstanceUID): int(item.FailureReason)
        for item in info.get("FailedSOPSequence", [])
    }
    return Report(
        int(event.request.EventTypeID),
        str(info.TransactionUID),
        committed,
        failed,
        str(event.assoc.requestor.ae_title).strip(),
    )


def references(
    files: Sequence[Path], extra: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    refs = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        refs.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return [*refs, *extra]


def action_dataset(transaction_uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


@dataclass
class Modality:
    """A modality: C-STOREs, then asks for commitment; may wait for the report on its association."""

    port: int
    ae_title: str = "MODALITY"
    reports: list[Report] = field(default_factory=list)

    def send_and_request(
        self,
        files: Sequence[Path],
        transaction_uid: str,
        refs: Sequence[tuple[str, str]],
        wait_for_report: float = 0.0,
        dataset: Dataset | None = None,
        take_reports: bool = True,
    ) -> int:
        """The N-ACTION-RSP status; with wait_for_report, stays associated until a report came.
        take_reports=False: an N-EVENT-REPORT on this association gets 0x0110 (pynetdicom's
        answer without a handler), as from a modality that takes them on its listener only."""
        ae = AE(self.ae_title)
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(StorageCommitmentPushModel)
        arrived = threading.Event()

        def on_report(event: evt.Event) -> tuple[int, None]:
            self.reports.append(report_from(event))
            arrived.set()
            return 0x0000, None

        assoc = ae.associate(
            "127.0.0.1",
            self.port,
            ae_title="DICOMNODE",
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)] if take_reports else [],
        )
        assert assoc.is_established
        try:
            for path in files:
                status = assoc.send_c_store(dcmread(path))
                assert status.Status == 0x0000, status
            status, _reply = assoc.send_n_action(
                dataset if dataset is not None else action_dataset(transaction_uid, refs),
                1,
                StorageCommitmentPushModel,
                INSTANCE,
            )
            if wait_for_report:
                arrived.wait(wait_for_report)
            return int(status.Status)
        finally:
            assoc.release()


class ReportReceiver:
    """The requestor's own listener: accepts our node as Storage Commitment SCP (role
    selection) and keeps every N-EVENT-REPORT it gets."""

    def __init__(self, ae_title: str = "LEAVER") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.reports: list[Report] = []
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> ReportReceiver:
        ae = AE(self.ae_title)
        # The node proposes (SCU role 0, SCP role 1): it reports as the SCP.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)

        def on_report(event: evt.Event) -> tuple[int, None]:
            self.reports.append(report_from(event))
            return 0x0000, None

        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )
        return self

    def wait(self, count: int = 1, timeout: float = 30.0) -> list[Report]:
        deadline = time.monotonic() + timeout
        while len(self.reports) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.reports)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


class SilentDestination:
    """A destination that stores and accepts N-ACTION-RQ, but never sends a report."""

    def __init__(self, ae_title: str = "SILENT") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.stored: list[str] = []
        self.actions: list[str] = []
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> SilentDestination:
        ae = AE(self.ae_title)
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.add_supported_context(StorageCommitmentPushModel)

        def on_store(event: evt.Event) -> int:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        def on_action(event: evt.Event) -> tuple[int, None]:
            self.actions.append(str(event.action_information.TransactionUID))
            return 0x0000, None

        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


class ReportingDestination:
    """A destination that reports on the association the N-ACTION-RQ came on, a moment after
    answering it (while the node's worker idles on that association)."""

    def __init__(self, ae_title: str = "REPORTER", delay: float = 0.3) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.delay = delay
        self.statuses: list[int] = []
        self._sending = threading.Lock()  # one report at a time on an association
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> ReportingDestination:
        ae = AE(self.ae_title)
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.add_supported_context(StorageCommitmentPushModel)

        def on_action(event: evt.Event) -> tuple[int, None]:
            info = event.action_information
            report = Dataset()
            report.TransactionUID = info.TransactionUID
            report.ReferencedSOPSequence = list(info.ReferencedSOPSequence)
            assoc = event.assoc

            def send() -> None:
                time.sleep(self.delay)
                answer = assoc.send_n_event_report(report, 1, StorageCommitmentPushModel, INSTANCE)
                self.statuses.append(int(answer[0].Status) if answer[0] else -1)

            threading.Thread(target=send, daemon=True).start()
            return 0x0000, None

        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_N_ACTION, on_action)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
