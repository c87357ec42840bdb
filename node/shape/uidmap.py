"""Keyed, deterministic UID remapping: the same UID and key give the same new UID anywhere.

HMAC-SHA256 under the target's secret, so one study stays one study across
associations, restarts, re-sends and nodes sharing the key, with no table to keep;
without the key nobody can map a new UID back, nor test a guess of the old one.
"""

from __future__ import annotations

import hashlib
import hmac

UUID_ROOT = "2.25."  # PS3.5 B.2: a UID from a UUID (ITU-T X.667)


class UidMap:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def remap(self, uid: str) -> str:
        uid = uid.strip("\x00 ")
        if not uid:
            return uid
        digest = hmac.new(self._secret, uid.encode("ascii", "replace"), hashlib.sha256).digest()
        value = int.from_bytes(digest[:16], "big")
        # An RFC 9562 version 8 (vendor-defined) UUID: its version and variant bits set.
        value = value & ~(0xF << 76) | 8 << 76
        value = value & ~(0x3 << 62) | 0x2 << 62
        return f"{UUID_ROOT}{value}"
