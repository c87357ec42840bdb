"""The keys of a DICOMweb destination (protocol = "dicomweb") and the mistakes refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config.model import HTTPAuthConfig, parse_config
from node.config.schema import ConfigError

DIMSE = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
WEB = {"name": "web", "protocol": "dicomweb", "url": "https://archive.example/dicom-web"}


def secret(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


def load(tmp_path: Path, destination: dict[str, object]):  # type: ignore[no-untyped-def]
    return parse_config({"destination": [destination]}, tmp_path / "c.toml").destinations[0]


def test_a_dicomweb_destination_reads_its_keys(tmp_path: Path) -> None:
    path = secret(tmp_path)
    web = load(
        tmp_path,
        {
            **WEB,
            "batch_size": 20,
            "request_timeout": 30,
            "transfer_syntaxes": ["JPEG2000Lossless"],
            "auth": {"username": "router", "password_file": str(path)},
            "tls": {"ca_bundle": str(path)},
        },
    )
    assert (web.protocol, web.url, web.batch_size, web.request_timeout) == (
        "dicomweb",
        "https://archive.example/dicom-web",
        20,
        30.0,
    )
    assert web.auth == HTTPAuthConfig(username="router", password_file=path)
    assert load(tmp_path, DIMSE).protocol == "dimse"


@pytest.mark.parametrize(
    ("destination", "key", "message"),
    [
        ({"name": "pacs", "host": "h", "port": 104}, "ae_title", "is required"),
        ({"name": "pacs", "ae_title": "A", "port": 104}, "host", "is required"),
        ({**DIMSE, "url": "http://x/dicom-web"}, "url", 'for protocol = "dicomweb"'),
        ({**WEB, "url": ""}, "url", "must be the DICOMweb service root"),
        ({**WEB, "url": "ftp://x/"}, "url", "must be the DICOMweb service root"),
        ({**WEB, "ae_title": "PACS"}, "ae_title", "is for DIMSE destinations"),
        ({**WEB, "url": "http://x/dw", "tls": {"enabled": True}}, "tls.enabled", "use https"),
        ({**WEB, "batch_size": 0}, "batch_size", "between 1 and 1000"),
        ({**WEB, "protocol": "stow"}, "protocol", "must be one of dimse, dicomweb"),
    ],
)
def test_mistakes_are_refused_naming_the_key(
    tmp_path: Path, destination: dict[str, object], key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load(tmp_path, destination)
    assert error.value.key == f"destination[0].{key}"


def test_auth_mistakes_are_refused(tmp_path: Path) -> None:
    path = secret(tmp_path)
    both = {"bearer_token_file": str(path), "username": "u", "password_file": str(path)}
    with pytest.raises(ConfigError, match="not both"):
        load(tmp_path, {**WEB, "auth": both})
    with pytest.raises(ConfigError, match="needs both username and password_file"):
        load(tmp_path, {**WEB, "auth": {"username": "u"}})
    with pytest.raises(ConfigError, match="is readable by every user") as error:
        load(tmp_path, {**WEB, "auth": {"bearer_token_file": str(secret(tmp_path, 0o644))}})
    assert error.value.key == "destination[0].auth.bearer_token_file"
    with pytest.raises(ConfigError, match="cannot be read"):
        load(tmp_path, {**WEB, "auth": {"bearer_token_file": str(tmp_path / "none")}})
    with pytest.raises(ConfigError, match='"dicomweb" destinations only'):
        load(tmp_path, {**DIMSE, "auth": {"bearer_token_file": str(path)}})
