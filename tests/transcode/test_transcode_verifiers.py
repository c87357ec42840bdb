"""Verification decodes with a library other than the encoder's, and with that one only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import uid as _uid
from pydicom.pixels import get_decoder

from node.transcode import parse_target, transcode_file
from node.transcode.codecs import codec_for
from tests.corpus import find
from tests.transcode_support import our_decode, source_pixels


def _replace_plugin(
    monkeypatch: pytest.MonkeyPatch, syntax: _uid.UID, plugin: str, function: Callable[..., Any]
) -> None:
    monkeypatch.setitem(get_decoder(syntax)._available, plugin, function)


def _refuse(*_: object, **__: object) -> bytes:
    raise RuntimeError("this plugin must not verify")


def test_jpegls_is_not_verified_by_charls_when_libjpeg_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # pydicom's next JPEG-LS plugin is pyjpegls, i.e. CharLS: the encoder's own library.
    _replace_plugin(monkeypatch, _uid.JPEGLSLossless, "pylibjpeg", _refuse)
    outcome = transcode_file(
        find("CT_small.dcm"), tmp_path / "out.dcm", [parse_target("JPEGLSLossless")]
    )
    assert outcome.fallback
    assert "verification failed" in outcome.reasons[0]


def _counting(calls: list[str], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def count(*args: object, **kwargs: object) -> Any:
        calls.append(name)
        return function(*args, **kwargs)

    return count


def test_rle_is_verified_by_pydicom_not_by_pylibjpeg_rle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plugins = get_decoder(_uid.RLELossless)._available
    calls: list[str] = []
    for name in ("pylibjpeg", "pydicom"):  # pylibjpeg-rle is the encoder's library
        _replace_plugin(monkeypatch, _uid.RLELossless, name, _counting(calls, name, plugins[name]))
    src, dst = find("CT_small.dcm"), tmp_path / "out.dcm"
    outcome = transcode_file(src, dst, [parse_target("RLELossless")])
    assert not outcome.fallback, outcome.reasons
    assert set(calls) == {"pydicom"}
    monkeypatch.undo()
    expected = source_pixels(src)
    assert expected is not None
    assert (our_decode(dst).array == expected.array).all()


@pytest.mark.parametrize(
    ("syntax", "verifier"),
    [
        (_uid.JPEGLSLossless, "pylibjpeg"),  # libjpeg; the encoders are CharLS
        (_uid.RLELossless, "pydicom"),  # the encoder is pylibjpeg-rle
        (_uid.HTJ2KLossless, "pylibjpeg"),  # OpenJPEG; the encoder is OpenJPH
        (_uid.JPEGLosslessSV1, "pylibjpeg"),  # libjpeg; the encoder is libjpeg-turbo
    ],
)
def test_lossless_codecs_name_an_independent_verifier(syntax: _uid.UID, verifier: str) -> None:
    codec = codec_for(syntax)
    assert codec is not None
    assert codec.verifier == verifier
    assert verifier in get_decoder(syntax)._available
