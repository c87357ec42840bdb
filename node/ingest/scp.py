"""The Storage SCP: which associations and syntaxes are accepted, and small handlers that feed intake.

node.listener owns the sockets, node.association speaks the protocol and
node.admission decides who may associate. This module builds what an
association needs from the config (its settings and the presentation context
negotiation), and keeps the handlers small: the C-STORE handler only passes
the received bytes to intake, it never decodes pixels.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    _STORAGE_CLASSES,
    Verification,
)

from node.commitment.messages import COMMITMENT_SYNTAXES, STORAGE_COMMITMENT_PUSH_MODEL
from node.commitment.service import CommitmentService
from node.config.model import Config
from node.daemon import metrics
from node.dicom.syntaxes import syntax_name
from node.ingest.admission import Admission, rules_from
from node.ingest.intake import Intake, Status, StoreRequest, describe_request
from node.ingest.listener import Address, Listeners
from node.ingest.receiving import ArrivingDataset, ReceiveFailed, prepare_receiving_folder
from node.ingest.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.net import pdu
from node.net.association import AcceptorSettings, Association, Refusal
from node.net.dimse import Answer, Command
from node.net.pduguard import ReceiveLimits

log = logging.getLogger("node.scp")

# Inside the spool folder: where datasets too large to hold in memory spill while they arrive.
RECEIVING_DIR = ".receiving"

VERIFICATION_CONTEXT = build_context(Verification)
# Presentation context results (PS3.8 9.3.3.2)
ACCEPTANCE = 0x00
USER_REJECTION = 0x01
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04


class StorageNegotiation:
    """Accept every storage SOP class, private and unknown ones included, in our syntax order.

    For each proposed context the first of our syntaxes that the requestor also
    proposed wins (pynetdicom's unrestricted mode would take the requestor's
    first). Verification is accepted too; any other SOP class we know of (query,
    worklist, commitment, print...) is refused with "abstract syntax not
    supported". Built with pynetdicom's PresentationContext objects this took
    17 ms for storescu's 128 contexts, so the decision for each abstract syntax
    is made once and remembered.

    SCP/SCU Role Selection is answered as pynetdicom's negotiate_as_acceptor
    does for a context that accepts the requestor as SCU and not as SCP: the
    reply is (SCU role 1, SCP role 0), and a context whose requestor proposes
    not to be SCU (it wants us to send it C-STOREs, as getscu does) is refused
    with "user rejection", since the node never acts as a Storage SCU there.

    Storage Commitment Push Model is accepted in the roles the config gives the
    node: a requestor may be its SCU (asking us: `[commitment] enabled`) and its
    SCP (reporting to us: a destination with `commitment = true`). The Role
    Selection reply grants what was proposed and is supported; no role proposed
    means the requestor is SCU, and is accepted if either role is (a peer that
    reports without proposing roles is common).
    """

    def __init__(
        self, transfer_syntaxes: Sequence[UID], commitment_roles: tuple[bool, bool] = (False, False)
    ) -> None:
        self.transfer_syntaxes = tuple(str(syntax) for syntax in transfer_syntaxes)
        # (the requestor may be SCU: we are SCP; the requestor may be SCP: we are SCU)
        self.commitment_roles = commitment_roles
        self._candidates: dict[str, tuple[str, ...]] = {}

    def __call__(self, request: pdu.AssociateRequest) -> list[pdu.ContextResult]:
        return [self._answer(context, request.roles) for context in request.contexts]

    def _answer(
        self, context: PresentationContext, roles: dict[str, tuple[bool, bool]]
    ) -> pdu.ContextResult:
        context_id = int(context.context_id or 0)
        abstract_syntax = str(context.abstract_syntax)
        if abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL and any(self.commitment_roles):
            return self._answer_commitment(context, roles)
        candidates = self.candidates_for(abstract_syntax)
        if not candidates:
            return pdu.ContextResult(
                context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, ImplicitVRLittleEndian, abstract_syntax
            )
        proposed = {str(syntax) for syntax in context.transfer_syntax}
        for syntax in candidates:
            if syntax in proposed:
                return _with_role(
                    pdu.ContextResult(context_id, ACCEPTANCE, syntax, abstract_syntax), roles
                )
        return pdu.ContextResult(
            context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED, ImplicitVRLittleEndian, abstract_syntax
        )

    def _answer_commitment(
        self, context: PresentationContext, roles: dict[str, tuple[bool, bool]]
    ) -> pdu.ContextResult:
        context_id = int(context.context_id or 0)
        abstract_syntax = STORAGE_COMMITMENT_PUSH_MODEL
        proposed = {str(syntax) for syntax in context.transfer_syntax}
        syntax = next((s for s in COMMITMENT_SYNTAXES if s in proposed), None)
        if syntax is None:
            return pdu.ContextResult(
                context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED, ImplicitVRLittleEndian, abstract_syntax
            )
        result = pdu.ContextResult(context_id, ACCEPTANCE, syntax, abstract_syntax)
        role = roles.get(abstract_syntax)
        if role is None:
            return result
        requestor_scu = role[0] and self.commitment_roles[0]
        requestor_scp = role[1] and self.commitment_roles[1]
        if not (requestor_scu or requestor_scp):
            return dataclasses.replace(result, result=USER_REJECTION, role=None)
        return dataclasses.replace(result, role=(requestor_scu, requestor_scp))

    def candidates_for(self, abstract_syntax: str) -> tuple[str, ...]:
        """Our syntaxes for this abstract syntax, in preference order; () if we refuse it."""
        known = self._candidates.get(abstract_syntax)
        if known is None:
            known = self._decide(abstract_syntax)
            if len(self._candidates) < 10_000:  # a peer inventing UIDs cannot grow it forever
                self._candidates[abstract_syntax] = known
        return known

    def _decide(self, abstract_syntax: str) -> tuple[str, ...]:
        if abstract_syntax == Verification:
            return tuple(str(syntax) for syntax in VERIFICATION_CONTEXT.transfer_syntax)
        return self.transfer_syntaxes if is_storage_like(abstract_syntax) else ()


def _with_role(result: pdu.ContextResult, roles: dict[str, tuple[bool, bool]]) -> pdu.ContextResult:
    proposed = roles.get(result.abstract_syntax)
    if proposed is None:
        return result  # default roles: the requestor is SCU, we are SCP
    scu_role, _scp_role = proposed
    if not scu_role:
        return dataclasses.replace(result, result=USER_REJECTION, role=None)
    return dataclasses.replace(result, role=(True, False))


def is_storage_like(abstract_syntax: str) -> bool:
    """A storage SOP class, or a private or unknown one that is not a known non-storage class."""
    if abstract_syntax in STORAGE_SOP_CLASSES:
        return True
    return abstract_syntax not in KNOWN_NON_STORAGE


def _storage_sop_classes() -> frozenset[str]:
    # pynetdicom's list, plus the classes pydicom names "... Storage" that pynetdicom files
    # under their own service classes (Hanging Protocol, Color Palette, Implant Template,
    # Protocol, Inventory Storage; retired and trial ones): all of them arrive by C-STORE.
    storage = {str(uid) for uid in _STORAGE_CLASSES.values()}
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind == "SOP Class" and _named_as_storage(name):
            storage.add(uid)
    return frozenset(storage)


def _named_as_storage(name: str) -> bool:
    words = name.replace(" - ", " ").split()
    return (
        "Storage" in words
        and "Commitment" not in words  # Storage Commitment Push/Pull: N-ACTION, N-EVENT
        and not name.startswith("Media Storage Directory")  # DICOMDIR: media only
    )


def _known_non_storage() -> frozenset[str]:
    # Every other UID the dictionary knows (query/retrieve, worklist, print, commitment,
    # notification, Meta SOP Classes, transfer syntaxes...) is not something to store.
    known = {uid for uid in UID_dictionary if uid not in STORAGE_SOP_CLASSES}
    known.discard(str(Verification))
    return frozenset(known | DCMTK_PRIVATE_NON_STORAGE)


# DCMTK's private Shutdown SOP class (storescp/dcmqrscp shut down on a request for it).
DCMTK_PRIVATE_NON_STORAGE = frozenset({"1.2.276.0.7230010.3.4.1915765545.18030.917282194.0"})
STORAGE_SOP_CLASSES = _storage_sop_classes()
KNOWN_NON_STORAGE = _known_non_storage()


class AssociationView(Protocol):
    """What the handlers below read of an association: ours, or pynetdicom_acceptor's."""

    @property
    def peer(self) -> tuple[str, int]: ...
    @property
    def address(self) -> str: ...
    @property
    def calling_ae_title(self) -> str: ...
    @property
    def called_ae_title(self) -> str: ...
    @property
    def accepted(self) -> Mapping[int, str]: ...  # context ID -> transfer syntax
    @property
    def results(self) -> Sequence[object]: ...  # one per proposed presentation context
    @property
    def user_identity(self) -> pdu.UserIdentity | None: ...  # as the A-ASSOCIATE-RQ had it

    # The Server-response of a positive User Identity reply, set by admit().
    user_identity_response: bytes | None


@dataclass
class AssociationStats:
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    failed: int = 0
    received_bytes: int = 0
    contexts: str = "no contexts negotiated"
    user: str = ""  # the User Identity's username, when one was offered and accepted


def contexts_summary(assoc: AssociationView) -> str:
    """'3/5 contexts accepted (ExplicitVRLittleEndian, JPEGLSLossless)': what was negotiated."""
    syntaxes = sorted({syntax_name(syntax) for syntax in assoc.accepted.values()})
    return (
        f"{len(assoc.accepted)}/{len(assoc.results)} contexts accepted"
        f" ({', '.join(syntaxes) or 'none'})"
    )


def ended_record(
    assoc: AssociationView, outcome: str, stats: AssociationStats | None = None, reason: str = ""
) -> metrics.AssociationRecord:
    """What the status page keeps of an association that ended or was refused."""
    stats = stats or AssociationStats(contexts="")
    return metrics.AssociationRecord(
        ended_at=time.time(),
        outcome=outcome,
        address=assoc.address,
        calling_ae_title=assoc.calling_ae_title,
        called_ae_title=assoc.called_ae_title,
        contexts=stats.contexts,
        instances=stats.received,
        bytes=stats.received_bytes,
        refused=stats.failed,
        duration=time.monotonic() - stats.started,
        reason=reason,
    )


def acceptor_settings(config: Config, receiving_folder: str) -> AcceptorSettings:
    node = config.node
    return AcceptorSettings(
        max_pdu=node.max_pdu,
        acse_timeout=node.acse_timeout or None,
        dimse_timeout=node.dimse_timeout or None,
        network_timeout=node.network_timeout or None,
        limits=ReceiveLimits(node.max_pdu, config.limits.max_instance_size),
        receiving_folder=config.spool_dir / receiving_folder,
        negotiate=StorageNegotiation(config.accept.transfer_syntaxes, commitment_roles(config)),
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
    )


def commitment_roles(config: Config) -> tuple[bool, bool]:
    """Storage Commitment roles a requestor may take with us: (SCU, SCP)."""
    return config.commitment.enabled, any(d.commitment for d in config.destinations)


class Abortable(Protocol):
    def abort(self) -> None: ...


def drain(active: Callable[[], Sequence[Abortable]], drain_timeout: float) -> None:
    """Wait up to `drain_timeout` s for the associations to end, then abort what is left.

    An abort loses nothing: an instance is acknowledged only once it is durable,
    and the sender keeps and retries the unacknowledged ones.
    """
    deadline = time.monotonic() + drain_timeout
    while active() and time.monotonic() < deadline:
        time.sleep(0.05)
    remaining = active()
    if remaining:
        log.warning(
            "%d associations still open after %.0f s: aborting them (their senders will"
            " retry what was not acknowledged)",
            len(remaining),
            drain_timeout,
        )
        for assoc in remaining:
            assoc.abort()
        deadline = time.monotonic() + 5.0
        while active() and time.monotonic() < deadline:
            time.sleep(0.05)


class StorageSCP:
    """The listening side of the node: associations whose handlers feed intake."""

    def __init__(self, config: Config, intake: Intake, receiving_dir: str = RECEIVING_DIR) -> None:
        self.config = config
        self.intake = intake
        self.receiving_dir = receiving_dir
        self.admission = Admission(rules_from(config))
        self._settings = acceptor_settings(config, receiving_dir)
        prepare_receiving_folder(self._settings.receiving_folder)
        self._stats: dict[int, AssociationStats] = {}
        self._users: dict[int, str] = {}  # admitted, not yet established: its username
        self._active: set[Association] = set()
        self._lock = threading.Lock()
        self._listeners: Listeners | None = None
        # Storage Commitment in either role (set by node.daemon.server when configured).
        self.commitment = CommitmentService()

    def start(self) -> None:
        self._listeners = Listeners(self.start_association, lambda: self._settings.acse_timeout)
        self._listeners.start(self.config)

    def start_association(
        self, sock: socket.socket, peer: Address, tls_context: ssl.SSLContext | None
    ) -> None:
        settings = self._settings
        if tls_context is not None:
            # replace(), not a rebuild: the negotiation's memory is shared by both listeners.
            settings = dataclasses.replace(settings, tls_context=tls_context)
        assoc = Association(sock, peer, settings, self)
        with self._lock:
            self._active.add(assoc)
        thread = threading.Thread(
            target=self._run, args=(assoc,), name=f"association {peer[0]}:{peer[1]}", daemon=True
        )
        thread.start()

    def _run(self, assoc: Association) -> None:
        try:
            assoc.run()
        except Exception:
            log.exception("association from %s failed unexpectedly", assoc.address)
        finally:
            self.admission.release(assoc)
            with self._lock:
                self._active.discard(assoc)
                self._users.pop(id(assoc), None)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Close the listening socket, then give open associations `drain_timeout` s to finish.

        The ones still open after the bound are aborted. An abort loses nothing:
        an instance is acknowledged only once it is durable, and the sender keeps
        and retries the unacknowledged ones.
        """
        if self._listeners is not None:
            self._listeners.close()
            self._listeners = None
        drain(self.active_associations, drain_timeout)

    def active_associations(self) -> list[Association]:
        with self._lock:
            return list(self._active)

    def reconfigure(self, config: Config) -> None:
        """New associations get the new settings; open ones keep theirs."""
        self.config = config
        self.admission.rules = rules_from(config)
        self._settings = acceptor_settings(config, self.receiving_dir)

    # Handlers, called from the association's thread (node.association.Handlers).

    def admit(self, assoc: AssociationView) -> Refusal | None:
        refusal = self.admission.decide(assoc, assoc.calling_ae_title, assoc.called_ae_title)
        if refusal is None:
            refusal = self._admit_user(assoc)
        if refusal is not None:
            log.warning(
                "refused association from %s calling AE %r: %s (A-ASSOCIATE-RJ %d/%d/%d); %s",
                assoc.peer[0],
                assoc.calling_ae_title,
                refusal.message,
                *refusal.result_source_diagnostic,
                _REJECTION_ADVICE[refusal.reason],
            )
        return refusal

    def _admit_user(self, assoc: AssociationView) -> Refusal | None:
        """The User Identity check, once the association is counted (which bounds the cost)."""
        identity = assoc.user_identity
        outcome, refusal = self.admission.check_identity(identity)
        if refusal is not None:
            self.admission.release(assoc)
            return refusal
        if identity is not None:
            log.debug(
                "association from %s calling AE %r: user %r (%s)",
                assoc.peer[0],
                assoc.calling_ae_title,
                outcome.username,
                outcome.reason,
            )
            with self._lock:
                self._users[id(assoc)] = outcome.username
            # PS3.7 D.3.3.7.2: for a username (and passcode) the Server-response is empty.
            if outcome.verified and identity.positive_response_requested:
                assoc.user_identity_response = b""
        return None

    def rejected(self, assoc: AssociationView, refusal: Refusal) -> None:
        metrics.record_association_rejected(refusal.reason)
        metrics.record_association_ended(ended_record(assoc, "rejected", reason=refusal.message))

    def established(self, assoc: AssociationView) -> None:
        with self._lock:
            user = self._users.pop(id(assoc), "")
            stats = AssociationStats(contexts=contexts_summary(assoc), user=user)
            self._stats[id(assoc)] = stats
        metrics.record_association_accepted()
        log.debug(
            "association from %s %r -> %r, %s",
            assoc.address,
            assoc.calling_ae_title,
            assoc.called_ae_title,
            stats.contexts,
        )

    def closed(self, assoc: AssociationView, aborted: bool) -> None:
        self.commitment.closed(assoc)
        with self._lock:
            stats = self._stats.pop(id(assoc), AssociationStats())
        metrics.record_association_closed(aborted)
        metrics.record_association_ended(
            ended_record(assoc, "aborted" if aborted else "released", stats)
        )
        log.info(
            "association %s: %s %r%s -> %r, %s, %d instances received (%.2f MB), %d refused, %.1f s",
            "aborted" if aborted else "released",
            assoc.address,
            assoc.calling_ae_title,
            f" (user {stats.user!r})" if stats.user else "",
            assoc.called_ae_title,
            stats.contexts,
            stats.received,
            stats.received_bytes / 1e6,
            stats.failed,
            time.monotonic() - stats.started,
        )

    def echo(self, assoc: Association, command: Command) -> int:
        return 0x0000

    def action(
        self, assoc: AssociationView, command: Command, transfer_syntax: str, dataset: bytes
    ) -> Answer:
        return self.commitment.action(assoc, command, transfer_syntax, dataset)

    def event_report(
        self, assoc: AssociationView, command: Command, transfer_syntax: str, dataset: bytes
    ) -> Answer:
        return self.commitment.event_report(assoc, command, transfer_syntax, dataset)

    def store(
        self,
        assoc: AssociationView,
        command: Command,
        transfer_syntax: str,
        dataset: ArrivingDataset,
    ) -> tuple[int, str]:
        try:
            with dataset.contents() as (data, on_disk):
                request = StoreRequest(
                    sop_class_uid=command.affected_sop_class_uid,
                    sop_instance_uid=command.affected_sop_instance_uid,
                    transfer_syntax=UID(transfer_syntax),
                    calling_ae_title=assoc.calling_ae_title,
                    called_ae_title=assoc.called_ae_title,
                    dataset=data,
                    dataset_file=on_disk,
                )
                return self.answer_store(assoc, request)
        except ReceiveFailed as exc:
            log.warning("refused a C-STORE: cannot write the arriving dataset: %s", exc.strerror)
            return int(Status.OUT_OF_RESOURCES), str(exc.strerror)

    def answer_store(self, assoc: AssociationView, request: StoreRequest) -> tuple[int, str]:
        """Run intake for one C-STORE, count and log it; the status and Error Comment to send."""
        result = self.intake.receive(request)
        metrics.record_received(result.status.name.lower(), len(request.dataset))
        with self._lock:
            stats = self._stats.setdefault(id(assoc), AssociationStats())
        if result.status == Status.SUCCESS:
            stats.received += 1
            stats.received_bytes += len(request.dataset)
            if log.isEnabledFor(logging.DEBUG):  # describe_request costs more than the check
                log.debug("received %s", describe_request(request))
        else:
            stats.failed += 1
            log.warning(
                "refused %s with status 0x%04X: %s",
                describe_request(request),
                result.status,
                result.reason,
            )
        return int(result.status), result.reason


_REJECTION_ADVICE = {
    "calling_ae_not_allowed": "add the calling AE to security.allowed_calling_aets if it is trusted",
    "called_ae_unknown": "the sender must call us as node.ae_title, or set"
    " security.require_called_aet = false",
    "too_many_associations": "the sender should retry later; raise node.max_associations"
    " if this is routine",
    "too_many_for_calling_ae": "the sender should retry later; raise"
    " security.max_associations_per_calling_aet if this is routine",
    "user_identity_refused": "the sender must offer a username and passcode listed in"
    " [[security.users]] (e.g. storescu --user NAME --password PASSCODE)",
}
