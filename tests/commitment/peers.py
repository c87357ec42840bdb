"""pynetdicom peers for the Storage Commitment tests: a modality (SCU), a report receiver, a
destination that never reports. In-process AEs on loopback, stopped by the tests."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
)
from pynetdicom.transport import ThreadedAssociationServer

from tests.support import free_port

INSTANCE = "1.2.840.10008.1.20.1.1"
T = TypeVar("T")


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


# Every pynetdicom wait of a peer is bounded: connecting, association set-up and release,
# each response, an idle association.
PEER_TIMEOUT = 30.0
# The longest a whole exchange of the modality may take beyond its wait for a report.
EXCHANGE_LIMIT = 120.0


def bounded_ae(ae_title: str) -> AE:
    ae = AE(ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = PEER_TIMEOUT
    ae.connection_timeout = PEER_TIMEOUT
    return ae


def run_bounded(
    work: Callable[[], T], limit: float, what: str, on_timeout: Callable[[], None]
) -> T:
    """work() in a thread joined within `limit` s: past it, on_timeout() and an AssertionError
    naming where the thread is stuck (a test fails with that, it never hangs)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        frame = sys._current_frames().get(thread.ident or 0)
        stack = "".join(traceback.format_stack(frame)) if frame else "(no frame)"
        # In a thread of its own too: pynetdicom's abort can wait on what is stuck.
        threading.Thread(target=on_timeout, daemon=True).start()
        raise AssertionError(f"{what} did not finish within {limit:g} s; it is stuck at:\n{stack}")
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["value"])


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
        """The N-ACTION-RSP status; with wait_for_report, stays associated (that long at most)
        until a report came and was answered. take_reports=False: a report on this
        association is answered 0x0110, as by a modality that takes them on its listener
        only. Bounded as a whole: a stuck exchange fails the test saying where it is stuck."""
        held: list[Association] = []
        return run_bounded(
            lambda: self._exchange(
                files, transaction_uid, refs, wait_for_report, dataset, take_reports, held
            ),
            EXCHANGE_LIMIT + wait_for_report,
            f"modality {self.ae_title}'s exchange for Transaction UID {transaction_uid}",
            lambda: held[0].abort(block=False) if held else None,
        )

    def _exchange(
        self,
        files: Sequence[Path],
        transaction_uid: str,
        refs: Sequence[tuple[str, str]],
        wait_for_report: float,
        dataset: Dataset | None,
        take_reports: bool,
        held: list[Association],
    ) -> int:
        ae = bounded_ae(self.ae_title)
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(StorageCommitmentPushModel)
        reported = threading.Event()
        serving: list[threading.Thread] = []

        def on_report(event: evt.Event) -> tuple[int, None]:
            serving.append(threading.current_thread())
            if take_reports:
                self.reports.append(report_from(event))
            reported.set()
            return (0x0000 if take_reports else 0x0110), None

        handlers = [(evt.EVT_N_EVENT_REPORT, on_report)]
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DICOMNODE", evt_handlers=handlers)
        held.append(assoc)
        assert assoc.is_established, f"{self.ae_title}: no association with the node"
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
            assert "Status" in status, f"{self.ae_title}: no N-ACTION-RSP (aborted or timed out)"
            if wait_for_report:
                reported.wait(wait_for_report)
                # pynetdicom serves an N-EVENT-REPORT-RQ in a thread of its own, which queues
                # the N-EVENT-REPORT-RSP and then marks the reactor unpaused. Release only after
                # it ended: before, the A-RELEASE-RQ can pass the RSP (the node never gets its
                # answer) and that late mark makes release() wait for ever for a paused reactor.
                for thread in list(serving):
                    thread.join(PEER_TIMEOUT)
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
        ae = bounded_ae(self.ae_title)
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
        ae = bounded_ae(self.ae_title)
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
        ae = bounded_ae(self.ae_title)
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
