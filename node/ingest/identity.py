"""User Identity negotiation (PS3.7 D.3.3.7): who the calling user is, and whether we believe it.

The check is a plain function of what the A-ASSOCIATE-RQ carried (identity
type, primary field, secondary field), so that every acceptor (our own and the
pynetdicom one) decides the same way. Passcodes are never stored: the config
holds scrypt hashes made by `dicom-node hash-passcode`, in the form
    scrypt$N$r$p$salt_b64$hash_b64
and a passcode is compared with hmac.compare_digest on the derived key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

# PS3.7 D.3.3.7.1 User-Identity-Type
USERNAME = 1
USERNAME_AND_PASSCODE = 2
IDENTITY_TYPE_NAMES = {
    USERNAME: "username",
    USERNAME_AND_PASSCODE: "username and passcode",
    3: "Kerberos service ticket",
    4: "SAML assertion",
    5: "JSON Web Token",
}

SCHEME = "scrypt"
# Interactive-login strength (about 0.1 s and 16 MiB per check on these machines);
# the number of checks running at once is bounded by node.max_associations.
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
_MAX_N = 2**20  # beyond this a hash string could make each association cost a GiB
# Checks running at once: each takes 128*N*r bytes (16 MiB at the defaults) and a core,
# so 32 hostile associations cannot take 512 MiB; the rest wait their turn.
_VERIFYING = threading.BoundedSemaphore(2)


class PasscodeHashError(ValueError):
    """A passcode_hash string that `dicom-node hash-passcode` did not make."""


@dataclass(frozen=True)
class PasscodeHash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        key = base64.b64encode(self.key).decode("ascii")
        return f"{SCHEME}${self.n}${self.r}${self.p}${salt}${key}"


def _derive(passcode: bytes, n: int, r: int, p: int, salt: bytes, length: int) -> bytes:
    return hashlib.scrypt(
        passcode, salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 1024 * 1024, dklen=length
    )


def hash_passcode(
    passcode: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """The passcode_hash string for a passcode, with a fresh random salt."""
    salt = os.urandom(SALT_BYTES)
    key = _derive(passcode.encode("utf-8"), n, r, p, salt, KEY_BYTES)
    return PasscodeHash(n, r, p, salt, key).encode()


def parse_passcode_hash(text: str) -> PasscodeHash:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise PasscodeHashError(
            "must be scrypt$N$r$p$salt$hash as printed by `dicom-node hash-passcode`"
        )
    try:
        n, r, p = (int(value) for value in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise PasscodeHashError("has a non-numeric cost or invalid base64 salt/hash") from None
    if n < 2 or n > _MAX_N or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise PasscodeHashError(f"has scrypt costs out of range (N={n}, r={r}, p={p})")
    if len(salt) < 8 or len(key) < 16:
        raise PasscodeHashError("has a salt or hash too short to be one of ours")
    return PasscodeHash(n, r, p, salt, key)


def verify_passcode(passcode: bytes, stored: PasscodeHash) -> bool:
    with _VERIFYING:
        derived = _derive(passcode, stored.n, stored.r, stored.p, stored.salt, len(stored.key))
    return hmac.compare_digest(derived, stored.key)


# Checked for an unknown username, so that a refusal takes as long whether the user exists.
_NOBODY = PasscodeHash(DEFAULT_N, DEFAULT_R, DEFAULT_P, bytes(SALT_BYTES), bytes(KEY_BYTES))


@dataclass(frozen=True)
class IdentityOutcome:
    """What to do with an association request's user identity."""

    accepted: bool
    username: str = ""  # as offered (type 1 or 2); for logs and audit, never the passcode
    verified: bool = False  # checked against security.users: a positive response may be sent
    reason: str = ""  # why it was refused, or how it was accepted


@dataclass(frozen=True)
class IdentityPolicy:
    """[security] require_user_identity and [[security.users]], ready to check requests."""

    required: bool = False
    # username -> its passcode hash; None: known by name alone (type 1 or 2, passcode unchecked)
    users: Mapping[str, PasscodeHash | None] = field(default_factory=dict)

    def check(
        self, identity_type: int | None, primary: bytes = b"", secondary: bytes = b""
    ) -> IdentityOutcome:
        """Decide on a request's User Identity sub-item; identity_type None: there was none.

        Refused: no identity (or a type we cannot check) when one is required, and
        an unknown username or a wrong passcode whenever users are configured,
        required or not; a peer offering a wrong passcode is not let in as anonymous.
        """
        if identity_type is None:
            if self.required:
                return IdentityOutcome(
                    False, reason="no user identity offered, and one is required"
                )
            return IdentityOutcome(True, reason="no user identity offered")
        if identity_type not in (USERNAME, USERNAME_AND_PASSCODE):
            kind = IDENTITY_TYPE_NAMES.get(identity_type, f"type {identity_type}")
            if self.required:
                return IdentityOutcome(
                    False,
                    reason=f"user identity by {kind} is not supported (only username/passcode)",
                )
            return IdentityOutcome(True, reason=f"user identity by {kind} ignored")
        username = primary.decode("utf-8", errors="replace")
        if not self.users:
            if self.required:  # config validation prevents this; refuse rather than trust anyone
                return IdentityOutcome(False, username, reason="no security.users configured")
            return IdentityOutcome(True, username, reason="username not checked (no users)")
        return self._check_user(username, identity_type, secondary)

    def _check_user(self, username: str, identity_type: int, passcode: bytes) -> IdentityOutcome:
        if username not in self.users:
            if identity_type == USERNAME_AND_PASSCODE:
                verify_passcode(passcode, _NOBODY)
            return IdentityOutcome(False, username, reason=f"unknown user {username!r}")
        stored = self.users[username]
        if stored is None:
            return IdentityOutcome(True, username, verified=True, reason="known username")
        if identity_type != USERNAME_AND_PASSCODE:
            return IdentityOutcome(
                False, username, reason=f"user {username!r} must give a passcode (type 2)"
            )
        if not verify_passcode(passcode, stored):
            return IdentityOutcome(False, username, reason=f"wrong passcode for user {username!r}")
        return IdentityOutcome(True, username, verified=True, reason="passcode verified")


def read_passcode_interactively() -> str:
    """The passcode to hash: asked twice on a terminal, else the first line of stdin."""
    import getpass
    import sys

    if not sys.stdin.isatty():
        passcode = sys.stdin.readline().rstrip("\r\n")
    else:
        passcode = getpass.getpass("Passcode: ")
        if getpass.getpass("Again: ") != passcode:
            raise ValueError("the two passcodes differ")
    if not passcode:
        raise ValueError("an empty passcode")
    return passcode


def read_passcode_file(path: os.PathLike[str] | str) -> bytes:
    """A destination's passcode: the file's first line, without its line end."""
    with open(path, "rb") as handle:
        passcode = handle.readline(65537).rstrip(b"\r\n")
    if not passcode or len(passcode) > 65535:  # a User Identity field holds 1..65535 bytes
        raise ValueError("its first line must hold a passcode of 1 to 65535 bytes")
    return passcode


def destination_identity(
    username: str, passcode_file: os.PathLike[str] | str | None
) -> tuple[str, bytes | None] | None:
    """What we identify as to a destination; read at each association, so a rotated
    passcode file is used without a reload. Raises OSError if the file cannot be read,
    ValueError if it holds no usable passcode."""
    if not username:
        return None
    return username, read_passcode_file(passcode_file) if passcode_file is not None else None
