"""Transfer syntax names: resolve what users write in the config into UIDs."""

from __future__ import annotations

import re

from pydicom import uid as _uid
from pydicom.uid import UID

# Syntaxes a sender may use that are compressed without loss. Accepting them
# as-is spares the sender a decompression and keeps the bytes it sent.
LOSSLESS_COMPRESSED: tuple[UID, ...] = (
    _uid.JPEGLSLossless,
    _uid.JPEG2000Lossless,
    _uid.HTJ2KLossless,
    _uid.HTJ2KLosslessRPCL,
    _uid.RLELossless,
    _uid.JPEGLosslessSV1,
    _uid.JPEGLossless,
)

NATIVE: tuple[UID, ...] = (
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian,
)

# Lossy syntaxes are still accepted by "all": refusing them would not make the
# image lossless, it would only stop it from arriving.
LOSSY_OR_MIXED: tuple[UID, ...] = (
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000,
    _uid.HTJ2K,
    _uid.JPEGBaseline8Bit,
    _uid.JPEGExtended12Bit,
)

# "all" = every syntax pydicom 3 with the pylibjpeg plugins and pyjpegls can
# decode, lossless compressed first, then native, then lossy.
ALL_DECODABLE: tuple[UID, ...] = LOSSLESS_COMPRESSED + NATIVE + LOSSY_OR_MIXED

_BY_KEYWORD: dict[str, UID] = {
    name: getattr(_uid, name)
    for name in dir(_uid)
    if isinstance(getattr(_uid, name), UID) and getattr(_uid, name).is_transfer_syntax
}


_DOTTED_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def resolve_syntax(name_or_uid: str) -> UID:
    """Return the transfer syntax UID for a pydicom keyword or a dotted UID.

    Raises ValueError for anything that is not a known transfer syntax.
    """
    text = name_or_uid.strip()
    if text in _BY_KEYWORD:
        return _BY_KEYWORD[text]
    if _DOTTED_UID.fullmatch(text) and UID(text).is_transfer_syntax:
        return UID(text)
    raise ValueError(
        f"unknown transfer syntax {name_or_uid!r}: use a pydicom keyword such as "
        "'ExplicitVRLittleEndian' or 'JPEGLSLossless', or a transfer syntax UID"
    )


def syntax_name(syntax: str) -> str:
    """A short human name for a transfer syntax UID (its pydicom keyword when known)."""
    found = UID(syntax).keyword
    return found or str(syntax)
