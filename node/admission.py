"""Association admission: who may associate, and how many at once.

pynetdicom counts every accepted TCP connection as an active association,
including sockets that have not sent an A-ASSOCIATE-RQ yet, so a few hundred
idle sockets would make it refuse legitimate peers. Here only associations
that are negotiating or established count, in total and per calling AE, and
refusals use the A-ASSOCIATE-RJ reasons of PS3.8 9.3.4:
  rejected-permanent / service-user / calling-AE-title-not-recognized (1, 1, 3)
  rejected-transient / service-provider (presentation) / local-limit-exceeded (2, 3, 2)
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association

from node.config import Config

log = logging.getLogger("node.admission")

# pynetdicom's own limit is set out of reach: Admission enforces the real one.
PYNETDICOM_UNLIMITED = 1_000_000

CALLING_AET_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


@dataclass(frozen=True)
class AdmissionRules:
    max_associations: int = 32
    max_per_calling_aet: int = 0  # 0: no per-AE limit
    allowed_calling_aets: tuple[str, ...] = ()  # empty: anyone


@dataclass(frozen=True)
class Refusal:
    reason: str  # a short counter key
    result_source_diagnostic: tuple[int, int, int]
    message: str


class Admission:
    """Counts admitted associations and decides on each new A-ASSOCIATE-RQ."""

    def __init__(self, rules: AdmissionRules | None = None) -> None:
        self.rules = rules or AdmissionRules()
        self._lock = threading.Lock()
        self._admitted: dict[int, tuple[Association, str]] = {}

    def decide(self, assoc: Association, calling_aet: str) -> Refusal | None:
        """Admit (and count) the association, or say why not."""
        calling_aet = calling_aet.strip()
        with self._lock:
            self._forget_finished()
            refusal = self._refusal(calling_aet)
            if refusal is None:
                self._admitted[id(assoc)] = (assoc, calling_aet)
                return None
            return refusal

    def release(self, assoc: Association) -> None:
        with self._lock:
            self._admitted.pop(id(assoc), None)

    def active(self) -> int:
        """Associations negotiating or established right now."""
        with self._lock:
            self._forget_finished()
            return len(self._admitted)

    def _refusal(self, calling_aet: str) -> Refusal | None:
        rules = self.rules
        if rules.allowed_calling_aets and calling_aet not in rules.allowed_calling_aets:
            return Refusal(
                "calling_ae_not_allowed",
                CALLING_AET_NOT_RECOGNIZED,
                f"calling AE {calling_aet!r} is not in security.allowed_calling_aets",
            )
        if len(self._admitted) >= rules.max_associations:
            return Refusal(
                "too_many_associations",
                LOCAL_LIMIT_EXCEEDED,
                f"{len(self._admitted)} associations already open"
                f" (node.max_associations={rules.max_associations})",
            )
        same_aet = sum(1 for _, aet in self._admitted.values() if aet == calling_aet)
        if rules.max_per_calling_aet and same_aet >= rules.max_per_calling_aet:
            return Refusal(
                "too_many_for_calling_ae",
                LOCAL_LIMIT_EXCEEDED,
                f"{same_aet} associations already open from {calling_aet!r}"
                f" (security.max_associations_per_calling_aet={rules.max_per_calling_aet})",
            )
        return None

    def _forget_finished(self) -> None:
        finished = [
            key
            for key, (assoc, _) in self._admitted.items()
            if not assoc.is_alive() or assoc.is_released or assoc.is_aborted or assoc.is_rejected
        ]
        for key in finished:
            del self._admitted[key]


_by_ae: weakref.WeakKeyDictionary[ApplicationEntity, Admission] = weakref.WeakKeyDictionary()
_pynetdicom_negotiate = ACSE._negotiate_as_acceptor


def attach(ae: ApplicationEntity, admission: Admission) -> None:
    """Make `admission` decide on every association `ae` accepts."""
    ae.maximum_associations = PYNETDICOM_UNLIMITED
    _by_ae[ae] = admission
    ACSE._negotiate_as_acceptor = _negotiate_with_admission  # type: ignore[method-assign]


def _negotiate_with_admission(acse: ACSE) -> None:
    admission = _by_ae.get(acse.assoc.ae)
    if admission is None:
        _pynetdicom_negotiate(acse)
        return
    request: Any = acse.requestor.primitive
    calling_aet = str(request.calling_ae_title)
    acse.requestor.ae_title = calling_aet
    refusal = admission.decide(acse.assoc, calling_aet)
    if refusal is not None:
        _reject(acse, refusal)
        return
    try:
        _pynetdicom_negotiate(acse)
    finally:
        if not acse.assoc.is_established:
            admission.release(acse.assoc)


def _reject(acse: ACSE, refusal: Refusal) -> None:
    address = acse.assoc.requestor.address
    log.warning(
        "refused association from %s calling AE %r: %s (A-ASSOCIATE-RJ %d/%d/%d)",
        address,
        acse.requestor.ae_title,
        refusal.message,
        *refusal.result_source_diagnostic,
    )
    # The EVT_REJECTED handler reads this to log and count the reason.
    acse.assoc.node_refusal = refusal.reason  # type: ignore[attr-defined]
    acse.send_reject(*refusal.result_source_diagnostic)
    evt.trigger(acse.assoc, evt.EVT_REJECTED, {})
    acse.assoc.kill()


def configure(ae: ApplicationEntity, config: Config) -> Admission:
    """Attach (or update) the admission rules of `ae` from the config; reloadable."""
    rules = AdmissionRules(
        max_associations=config.node.max_associations,
        max_per_calling_aet=config.security.max_associations_per_calling_aet,
        allowed_calling_aets=tuple(aet.strip() for aet in config.security.allowed_calling_aets),
    )
    admission = _by_ae.get(ae) or Admission()
    admission.rules = rules
    attach(ae, admission)
    return admission
