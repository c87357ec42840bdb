"""Association admission: who may associate, and how many at once.

Only associations that are negotiating or established count (a socket that
has not sent its A-ASSOCIATE-RQ does not), in total and per calling AE, and
refusals use the A-ASSOCIATE-RJ reasons of PS3.8 9.3.4:
  rejected-permanent / service-user / calling-AE-title-not-recognized (1, 1, 3)
  rejected-permanent / service-user / called-AE-title-not-recognized (1, 1, 7)
  rejected-transient / service-provider (presentation) / local-limit-exceeded (2, 3, 2)
and, for a user identity that is required and missing, or wrong (PS3.7 D.3.3.7, whose
note says "Rejection Permanent with a Source of DICOM UL service provider (ACSE
related function)"; pynetdicom's own acceptor sends 2, 2, 1 instead):
  rejected-permanent / service-provider (ACSE) / no-reason-given (1, 2, 1)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from node.config.model import Config
from node.ingest.identity import IdentityOutcome, IdentityPolicy, parse_passcode_hash
from node.net.association import Refusal
from node.net.pdu import UserIdentity

CALLING_AET_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
CALLED_AET_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
USER_IDENTITY_NOT_ACCEPTED = (0x01, 0x02, 0x01)


@dataclass(frozen=True)
class AdmissionRules:
    max_associations: int = 32
    max_per_calling_aet: int = 0  # 0: no per-AE limit
    allowed_calling_aets: tuple[str, ...] = ()  # empty: anyone
    ae_title: str = ""
    require_called_aet: bool = True
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)


class Admission:
    """Counts admitted associations and decides on each new A-ASSOCIATE-RQ."""

    def __init__(self, rules: AdmissionRules | None = None) -> None:
        self.rules = rules or AdmissionRules()
        self._lock = threading.Lock()
        self._admitted: dict[object, str] = {}

    def decide(self, key: object, calling_aet: str, called_aet: str) -> Refusal | None:
        """Admit (and count) the association `key`, or say why not; release() it when it ends."""
        calling_aet = calling_aet.strip()
        with self._lock:
            refusal = self._refusal(calling_aet, called_aet.strip())
            if refusal is None:
                self._admitted[key] = calling_aet
            return refusal

    def check_identity(
        self, identity: UserIdentity | None
    ) -> tuple[IdentityOutcome, Refusal | None]:
        """The User Identity decision; outside the lock, since a passcode check takes ~0.1 s."""
        if identity is None:
            outcome = self.rules.identity.check(None)
        else:
            outcome = self.rules.identity.check(
                identity.identity_type, identity.primary, identity.secondary
            )
        if outcome.accepted:
            return outcome, None
        return outcome, Refusal("user_identity_refused", USER_IDENTITY_NOT_ACCEPTED, outcome.reason)

    def release(self, key: object) -> None:
        with self._lock:
            self._admitted.pop(key, None)

    def active(self) -> int:
        """Associations negotiating or established right now."""
        with self._lock:
            return len(self._admitted)

    def _refusal(self, calling_aet: str, called_aet: str) -> Refusal | None:
        rules = self.rules
        if rules.allowed_calling_aets and calling_aet not in rules.allowed_calling_aets:
            return Refusal(
                "calling_ae_not_allowed",
                CALLING_AET_NOT_RECOGNIZED,
                f"calling AE {calling_aet!r} is not in security.allowed_calling_aets",
            )
        if rules.require_called_aet and called_aet != rules.ae_title:
            return Refusal(
                "called_ae_unknown",
                CALLED_AET_NOT_RECOGNIZED,
                f"called AE {called_aet!r} is not node.ae_title ({rules.ae_title!r})",
            )
        if len(self._admitted) >= rules.max_associations:
            return Refusal(
                "too_many_associations",
                LOCAL_LIMIT_EXCEEDED,
                f"{len(self._admitted)} associations already open"
                f" (node.max_associations={rules.max_associations})",
            )
        same_aet = sum(1 for aet in self._admitted.values() if aet == calling_aet)
        if rules.max_per_calling_aet and same_aet >= rules.max_per_calling_aet:
            return Refusal(
                "too_many_for_calling_ae",
                LOCAL_LIMIT_EXCEEDED,
                f"{same_aet} associations already open from {calling_aet!r}"
                f" (security.max_associations_per_calling_aet={rules.max_per_calling_aet})",
            )
        return None


def rules_from(config: Config) -> AdmissionRules:
    return AdmissionRules(
        max_associations=config.node.max_associations,
        max_per_calling_aet=config.security.max_associations_per_calling_aet,
        allowed_calling_aets=tuple(aet.strip() for aet in config.security.allowed_calling_aets),
        ae_title=config.node.ae_title.strip(),
        require_called_aet=config.security.require_called_aet,
        identity=identity_policy(config),
    )


def identity_policy(config: Config) -> IdentityPolicy:
    users = {
        user.username: parse_passcode_hash(user.passcode_hash) if user.passcode_hash else None
        for user in config.security.users
    }
    return IdentityPolicy(required=config.security.require_user_identity, users=users)
