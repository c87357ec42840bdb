"""Rungs of a transcoding ladder: which transfer syntax to write, and with which options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom import uid as _uid
from pydicom.uid import UID

from node.dicom.syntaxes import NATIVE, resolve_syntax, syntax_name

# Syntaxes whose encoders never lose information (the written pixels decode to the source).
LOSSLESS_TARGETS: tuple[UID, ...] = (
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.RLELossless,
    _uid.JPEGLSLossless,
    _uid.JPEG2000Lossless,
    _uid.HTJ2KLossless,
    _uid.HTJ2KLosslessRPCL,
    _uid.JPEGLosslessSV1,
)

# Syntaxes we only write lossily, so they need the caller's explicit opt-in.
LOSSY_TARGETS: tuple[UID, ...] = (
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000,
    _uid.HTJ2K,
    _uid.JPEGBaseline8Bit,
)

NATIVE_SYNTAXES: tuple[UID, ...] = NATIVE

# Defaults chosen so that a bare lossy keyword still means something sensible.
DEFAULT_NEAR = 2
DEFAULT_J2K_RATIO = 10.0
DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True)
class Target:
    """One rung of a fallback ladder."""

    transfer_syntax: UID
    lossy: bool
    near_lossless: int | None = None
    j2k_ratio: float | None = None
    j2k_psnr: float | None = None
    jpeg_quality: int | None = None

    @property
    def name(self) -> str:
        return syntax_name(self.transfer_syntax)


def parse_target(spec: str | Mapping[str, Any] | Target) -> Target:
    """Build a Target from "JPEGLSLossless", a UID, or {"syntax": ..., "near": 2, ...}.

    Raises ValueError with a message that names the offending part.
    """
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, str):
        return _target_for(resolve_syntax(spec), {})
    if isinstance(spec, Mapping):
        options = dict(spec)
        syntax = options.pop("syntax", None) or options.pop("transfer_syntax", None)
        if not isinstance(syntax, str):
            raise ValueError(f"transcode target {spec!r} needs a 'syntax' string")
        return _target_for(resolve_syntax(syntax), options)
    raise ValueError(f"transcode target must be a string or a table, not {type(spec).__name__}")


_OPTION_NAMES = {"near", "ratio", "psnr", "quality"}


def _target_for(syntax: UID, options: dict[str, Any]) -> Target:
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for {syntax_name(syntax)}; "
            f"known: {sorted(_OPTION_NAMES)}"
        )
    if syntax in LOSSLESS_TARGETS:
        if options:
            raise ValueError(f"{syntax_name(syntax)} is lossless and takes no options")
        return Target(syntax, lossy=False)
    if syntax == _uid.JPEGLSNearLossless:
        near = _positive_int(options.get("near", DEFAULT_NEAR), "near", maximum=255)
        return Target(syntax, lossy=True, near_lossless=near)
    if syntax in (_uid.JPEG2000, _uid.HTJ2K):
        return _j2k_target(syntax, options)
    if syntax == _uid.JPEGBaseline8Bit:
        quality = _positive_int(options.get("quality", DEFAULT_JPEG_QUALITY), "quality", 100)
        return Target(syntax, lossy=True, jpeg_quality=quality)
    raise ValueError(
        f"cannot encode {syntax_name(syntax)}; encodable: "
        + ", ".join(syntax_name(s) for s in LOSSLESS_TARGETS + LOSSY_TARGETS)
    )


def _j2k_target(syntax: UID, options: dict[str, Any]) -> Target:
    if "near" in options or "quality" in options:
        raise ValueError(f"{syntax_name(syntax)} takes 'ratio' or 'psnr'")
    if "ratio" in options and "psnr" in options:
        raise ValueError(f"{syntax_name(syntax)}: give 'ratio' or 'psnr', not both")
    if "psnr" in options:
        if syntax == _uid.HTJ2K:
            raise ValueError("HTJ2K lossy is rate-controlled by 'ratio' only")
        return Target(syntax, lossy=True, j2k_psnr=_positive_float(options["psnr"], "psnr"))
    ratio = _positive_float(options.get("ratio", DEFAULT_J2K_RATIO), "ratio")
    if ratio <= 1:
        raise ValueError(f"{syntax_name(syntax)} ratio must be above 1, got {ratio}")
    return Target(syntax, lossy=True, j2k_ratio=ratio)


def _positive_int(value: Any, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"{what} must be an integer from 1 to {maximum}, got {value!r}")
    return value


def _positive_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)
