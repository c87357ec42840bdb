"""User Identity negotiation (PS3.7 D.3.3.7): DCMTK storescu and pynetdicom against a node that
requires it, `dicom-node hash-passcode`, the config checks, and forwarding with an identity.

Refusals are A-ASSOCIATE-RJ rejected-permanent (1), DICOM UL service-provider (ACSE
related function) (2), no-reason-given (1), as PS3.7 D.3.3.7's note prescribes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node.config.model import ConfigError, parse_config
from node.net.storelink import associate_rq
from tests.corpus import CT_SMALL, copies_with_new_uids
from tests.forward_support import destination, forwarding_config
from tests.foundation_helpers import associate
from tests.support import (
    ACCEPTORS,
    NodeProcess,
    base_config,
    configured_node,
    dicom_node,
    free_port,
    storescu,
    wait_until,
    write_config,
)

PASSCODE = "secret"  # the acceptance test: storescu --user alice --password secret -rsp
REJECTED_BY_ACSE = (1, 2, 1)  # rejected-permanent, service-provider (ACSE), no-reason-given


def hash_with_cli(passcode: str) -> str:
    import subprocess
    import sys

    from tests.support import REPO

    result = subprocess.run(
        [sys.executable, "-m", "node", "hash-passcode"],
        input=passcode + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_with_cli(PASSCODE)


@pytest.fixture(scope="module", params=ACCEPTORS)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, alice_hash: str
) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("identity")
    security = {
        "require_user_identity": True,
        # bob is known by name alone: username-only identity (type 1) is enough for him.
        "users": [{"username": "alice", "passcode_hash": alice_hash}, {"username": "bob"}],
    }
    with configured_node(
        tmp, lambda config: config.update(security=security), acceptor=request.param
    ) as running:
        running.archive = tmp / "archive"  # type: ignore[attr-defined]
        yield running


def fresh_ct(folder: Path) -> Path:
    return copies_with_new_uids(CT_SMALL, folder, 1)[0]


def stored(archive: Path, sop_instance_uid: str) -> bool:
    return any(path.name == f"{sop_instance_uid}.dcm" for path in archive.rglob("*.dcm"))


def raw_answer(port: int, identity: tuple[str, bytes | None] | None) -> bytes:
    """Send our own A-ASSOCIATE-RQ and return the first 10 bytes of the answer."""
    request = associate_rq(
        "DICOMNODE", "RAWSCU", [(Verification, "1.2.840.10008.1.2")], 16384, identity
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while len(answer) < 10:
            chunk = sock.recv(10 - len(answer))
            if not chunk:
                break
            answer += chunk
    return answer


# storescu, the acceptance test of the issue


def test_storescu_with_user_and_password_and_positive_response_stores(
    node: NodeProcess, tmp_path: Path
) -> None:
    path = fresh_ct(tmp_path)
    result = storescu(node.port, [path], "--user", "alice", "--password", PASSCODE, "-rsp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Positive response requested but none received" not in result.stderr
    archive: Path = node.archive  # type: ignore[attr-defined]
    assert wait_until(lambda: stored(archive, path.stem), timeout=30)
    log = node.log()
    assert "'STORESCU' (user 'alice') -> 'DICOMNODE'" in log
    assert PASSCODE not in log


def test_storescu_with_a_wrong_passcode_is_rejected_permanently_by_the_acse(
    node: NodeProcess, tmp_path: Path
) -> None:
    result = storescu(
        node.port, [fresh_ct(tmp_path)], "--user", "alice", "--password", "hunter2", "-rsp"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Result: Rejected Permanent, Source: Service Provider (ACSE Related)" in output
    assert "Reason: No Reason" in output
    log = node.log()
    assert "calling AE 'STORESCU': wrong passcode for user 'alice' (A-ASSOCIATE-RJ 1/2/1)" in log
    assert "hunter2" not in log


def test_storescu_without_a_user_identity_is_rejected(node: NodeProcess, tmp_path: Path) -> None:
    result = storescu(node.port, [fresh_ct(tmp_path)])
    assert result.returncode != 0
    assert "Rejected Permanent, Source: Service Provider (ACSE Related)" in result.stderr
    assert "no user identity offered, and one is required" in node.log()


@pytest.mark.parametrize(
    ("identity", "accepted"),
    [
        (None, False),
        (("alice", PASSCODE.encode()), True),
        (("alice", b"wrong"), False),
        (("alice", None), False),  # type 1: alice has a passcode, she must give it
        (("bob", None), True),
        (("mallory", b"anything"), False),
    ],
)
def test_the_reject_is_1_2_1_on_the_wire(
    node: NodeProcess, identity: tuple[str, bytes | None] | None, accepted: bool
) -> None:
    answer = raw_answer(node.port, identity)
    if accepted:
        assert answer[0] == 0x02  # A-ASSOCIATE-AC
    else:
        assert answer[0] == 0x03 and tuple(answer[7:10]) == REJECTED_BY_ACSE, answer.hex()


# pynetdicom as the requestor: the positive response item


def pynetdicom_associate(
    port: int, identity_type: int, primary: bytes, secondary: bytes = b"", positive: bool = True
):  # type: ignore[no-untyped-def]
    item = UserIdentityNegotiation()
    item.user_identity_type = identity_type
    item.positive_response_requested = positive
    item.primary_field = primary
    if identity_type == 2:
        item.secondary_field = secondary
    echo = [(Verification, DEFAULT_TRANSFER_SYNTAXES)]
    return associate(port, echo, calling="PYNETSCU", ext_neg=[item])


def test_a_requested_positive_response_comes_back_empty_for_username_and_passcode(
    node: NodeProcess,
) -> None:
    assoc = pynetdicom_associate(node.port, 2, b"alice", PASSCODE.encode())
    try:
        assert assoc.is_established
        response = assoc.acceptor.user_identity
        assert response is not None
        assert response.server_response == b""  # PS3.7 D.3.3.7.2: zero length for types 1, 2
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_no_user_identity_reply_unless_a_positive_response_is_requested(
    node: NodeProcess,
) -> None:
    assoc = pynetdicom_associate(node.port, 1, b"bob", positive=False)
    try:
        assert assoc.is_established
        assert assoc.acceptor.user_identity is None
    finally:
        assoc.release()


@pytest.mark.parametrize("identity_type", [3, 4, 5])  # Kerberos, SAML, JWT
def test_identity_types_we_cannot_check_are_refused_when_identity_is_required(
    node: NodeProcess, identity_type: int
) -> None:
    assoc = pynetdicom_associate(node.port, identity_type, b"a-ticket-or-token")
    if assoc.is_established:
        assoc.release()
    assert assoc.is_rejected, (assoc.is_established, assoc.is_aborted, node.log()[-2000:])
    assert "is not supported (only username/passcode)" in node.log()


# The policy itself, as the pynetdicom acceptor will call it


def test_a_wrong_passcode_is_refused_even_when_identity_is_optional(alice_hash: str) -> None:
    from node.ingest.identity import IdentityPolicy, parse_passcode_hash

    policy = IdentityPolicy(required=False, users={"alice": parse_passcode_hash(alice_hash)})
    assert policy.check(None).accepted  # no identity: let in, as before
    assert policy.check(3, b"ticket").accepted  # cannot check it: ignored, no response
    assert not policy.check(3, b"ticket").verified
    wrong = policy.check(2, b"alice", b"nope")
    assert not wrong.accepted and wrong.reason == "wrong passcode for user 'alice'"
    assert not policy.check(2, b"eve", b"x").accepted
    right = policy.check(2, b"alice", PASSCODE.encode())
    assert right.accepted and right.verified and right.username == "alice"
    anyone = IdentityPolicy(required=False).check(1, b"carol")
    assert anyone.accepted and not anyone.verified  # no users: nothing checked, no response


# hash-passcode and the config


def test_hash_passcode_prints_a_salted_scrypt_hash_that_verifies(alice_hash: str) -> None:
    from node.ingest.identity import parse_passcode_hash, verify_passcode

    scheme, n, r, p, _salt, _key = alice_hash.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    parsed = parse_passcode_hash(alice_hash)
    assert verify_passcode(PASSCODE.encode(), parsed)
    assert not verify_passcode(b"secre", parsed)
    assert hash_with_cli(PASSCODE) != alice_hash  # a fresh salt each time
    empty = dicom_node("hash-passcode")  # stdin is empty: nothing to hash
    assert empty.returncode == 1 and "empty passcode" in empty.stderr


def config_error(tmp_path: Path, sections: dict[str, object]) -> ConfigError:
    import tomllib

    file = write_config(tmp_path / "config.toml", sections)
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(file.read_text()), file)
    assert caught.value.file == str(file)
    return caught.value


def test_config_errors_name_the_file_and_the_key(tmp_path: Path, alice_hash: str) -> None:
    config = base_config(tmp_path, 11112)
    config["security"] = {"require_user_identity": True}
    assert config_error(tmp_path, config).key == "security.require_user_identity"
    config["security"] = {"users": [{"username": "alice", "passcode_hash": "plain-text"}]}
    assert config_error(tmp_path, config).key == "security.users[0].passcode_hash"
    config["security"] = {
        "users": [{"username": "a", "passcode_hash": alice_hash}, {"username": "a"}]
    }
    assert config_error(tmp_path, config).key == "security.users[1].username"
    config["security"] = {"users": [{"username": "a", "password": "x"}]}
    assert config_error(tmp_path, config).key == "security.users[0].password"


def test_a_destination_passcode_file_must_exist_and_not_be_world_readable(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "pacs.passcode"
    secret.write_text("secret\n")
    secret.chmod(0o644)
    config = forwarding_config(
        tmp_path, 11112, [destination("pacs", "PACS", 104, username="n", passcode_file=str(secret))]
    )
    error = config_error(tmp_path, config)
    assert error.key == "destination[0].passcode_file" and "chmod o-r" in error.message
    secret.chmod(0o600)
    config["destination"] = [destination("pacs", "PACS", 104, passcode_file=str(secret))]
    assert "needs a username" in config_error(tmp_path, config).message
    secret.write_text("\n")
    config["destination"] = [
        destination("pacs", "PACS", 104, username="n", passcode_file=str(secret))
    ]
    assert "1 to 65535 bytes" in config_error(tmp_path, config).message
    missing = str(tmp_path / "absent")
    config["destination"] = [destination("pacs", "PACS", 104, username="n", passcode_file=missing)]
    assert config_error(tmp_path, config).key == "destination[0].passcode_file"


def test_check_config_round_trips_users_and_destination_identity(
    tmp_path: Path, alice_hash: str
) -> None:
    import tomllib

    secret = tmp_path / "pacs.passcode"
    secret.write_text("pass-from-file\n")
    secret.chmod(0o600)
    config = forwarding_config(
        tmp_path,
        11112,
        [destination("pacs", "PACS", 104, username="node", passcode_file=str(secret))],
        security={
            "require_user_identity": True,
            "users": [{"username": "alice", "passcode_hash": alice_hash}, {"username": "bob"}],
        },
    )
    source = write_config(tmp_path / "config.toml", config)
    result = dicom_node("check-config", "-c", str(source))
    assert result.returncode == 0, result.stderr
    assert "pass-from-file" not in result.stdout  # the passcode file's content is never read here
    reparsed = parse_config(tomllib.loads(result.stdout), source)
    assert (
        reparsed.security.users
        == parse_config(tomllib.loads(source.read_text()), source).security.users
    )
    assert [u.username for u in reparsed.security.users] == ["alice", "bob"]
    assert reparsed.destinations[0].username == "node"


# Forwarding: our SCU identifies itself to a destination that checks it


def test_forwarding_sends_the_destination_user_identity(tmp_path: Path) -> None:
    """A pynetdicom SCP checking EVT_USER_ID: the right passcode delivers, a wrong one is retried."""
    seen: list[tuple[int, bytes, bytes]] = []
    received: list[str] = []

    def on_user_id(event):  # type: ignore[no-untyped-def]
        seen.append((event.user_id_type, event.primary_field, event.secondary_field))
        ok = (event.primary_field, event.secondary_field) == (b"router", b"pacs-passcode")
        return ok, None

    def on_store(event):  # type: ignore[no-untyped-def]
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    scp = AE("IDPACS")
    scp.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    pacs_port = free_port()
    server = scp.start_server(
        ("127.0.0.1", pacs_port),
        block=False,
        evt_handlers=[(evt.EVT_USER_ID, on_user_id), (evt.EVT_C_STORE, on_store)],
    )
    try:
        right, wrong = tmp_path / "right.passcode", tmp_path / "wrong.passcode"
        right.write_text("pacs-passcode\n")
        wrong.write_text("not-the-passcode\n")
        for secret in (right, wrong):
            secret.chmod(0o600)
        port = free_port()
        config = forwarding_config(
            tmp_path,
            port,
            [
                destination(
                    "pacs", "IDPACS", pacs_port, username="router", passcode_file=str(right)
                ),
                destination(
                    "bad", "IDPACS", pacs_port, username="router", passcode_file=str(wrong)
                ),
            ],
            routes=[{"match": {"Modality": "*"}, "destinations": ["pacs", "bad"]}],
        )
        with configured_node(tmp_path, config=config) as node:
            path = fresh_ct(tmp_path / "in")
            assert storescu(port, [path]).returncode == 0
            assert wait_until(lambda: path.stem in received, timeout=60), node.log()
            assert wait_until(lambda: "and our destination username/passcode" in node.log(), 60)
            log = node.log()
        assert (2, b"router", b"pacs-passcode") in seen
        assert (2, b"router", b"not-the-passcode") in seen
        assert received == [path.stem]  # the wrong passcode delivered nothing
        assert f"for 'bad': association rejected by IDPACS@127.0.0.1:{pacs_port}" in log
        assert "pacs-passcode" not in log and "not-the-passcode" not in log
    finally:
        server.shutdown()
