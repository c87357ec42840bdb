"""A target's Shaping from its `coerce` and `deidentify` settings (read by node.config)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from node.shape.coerce import parse_coercion
from node.shape.deidentify import Deidentification
from node.shape.options import parse_options
from node.shape.selectors import parse_selector
from node.shape.shaping import Shaping

MIN_SECRET_BYTES = 16


class CoerceSettings(Protocol):
    @property
    def set(self) -> Sequence[tuple[str, str]]: ...
    @property
    def delete(self) -> Sequence[str]: ...


class DeidentifySettings(Protocol):
    @property
    def profile(self) -> str: ...
    @property
    def options(self) -> tuple[str, ...]: ...
    @property
    def uid_secret_file(self) -> Path | None: ...
    @property
    def keep(self) -> Sequence[str]: ...


class SecretError(ValueError):
    pass


def build_shaping(coerce: CoerceSettings, deidentify: DeidentifySettings) -> Shaping | None:
    """None when the target takes instances as received (its header unchanged)."""
    coercion = None
    if coerce.set or coerce.delete:
        coercion = parse_coercion(dict(coerce.set), tuple(coerce.delete))
    deidentification = None
    if deidentify.profile == "basic":
        deidentification = Deidentification(
            options=parse_options(deidentify.options),
            keep=tuple(parse_selector(text) for text in deidentify.keep),
            secret=read_uid_secret(deidentify.uid_secret_file),
        )
    if coercion is None and deidentification is None:
        return None
    return Shaping(coercion, deidentification)


def read_uid_secret(path: Path | None) -> bytes:
    """The UID key's bytes; b"" without a file (then retain-uids keeps every UID)."""
    if path is None:
        return b""
    try:
        secret = path.read_bytes().strip()
    except OSError as error:
        raise SecretError(f"cannot be read: {error.strerror} ({path})") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(
            f"{path} holds {len(secret)} bytes; a UID key needs at least {MIN_SECRET_BYTES}"
            " (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
        )
    return secret
