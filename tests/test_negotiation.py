"""Presentation context negotiation: only storage SOP classes (and Verification) are accepted,
and SCP/SCU Role Selection is answered as pynetdicom answers it.

The node runs as a subprocess; the peers are DCMTK findscu and getscu and pynetdicom.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, build_context, build_role
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from node.ingest.scp import StorageNegotiation
from node.net import pdu
from tests.foundation_helpers import associate
from tests.support import (
    NodeProcess,
    configured_node,
    require_tool,
)

# Refused with "abstract syntax not supported" (3): SOP classes the node has no service for.
NOT_STORAGE = {
    "1.2.840.10008.5.1.4.31": "Modality Worklist Information Model - FIND",
    "1.2.840.10008.5.1.4.1.2.1.1": "Patient Root Query/Retrieve Information Model - FIND",
    "1.2.840.10008.5.1.4.39.2": "Color Palette Query/Retrieve Information Model - FIND",
    "1.2.840.10008.1.20.1": "Storage Commitment Push Model",
    "1.2.840.10008.1.20.2": "Storage Commitment Pull Model (retired)",
    "1.2.840.10008.1.9": "Basic Study Content Notification (retired)",
    "1.2.276.0.7230010.3.4.1915765545.18030.917282194.0": "DCMTK private Shutdown SOP class",
    "1.2.840.10008.5.1.1.9": "Basic Grayscale Print Management Meta SOP Class",
}
# Accepted: storage SOP classes, also those pynetdicom files elsewhere, private and unknown ones.
STORAGE = {
    CTImageStorage: "CT Image Storage",
    "1.2.840.10008.5.1.4.38.1": "Hanging Protocol Storage",
    "1.2.840.10008.5.1.4.39.1": "Color Palette Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (retired)",
    "1.2.826.0.1.3680043.9.7433.99.1": "a private SOP class",
    "1.2.840.10008.5.1.4.1.1.987654": "a standard-looking UID unknown to pydicom",
    Verification: "Verification",
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with configured_node(tmp_path_factory.mktemp("negotiation")) as running:
        yield running


def run_dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(tool), "-d", *args], capture_output=True, text=True, timeout=60
    )


def accepted_context_results(output: str) -> list[str]:
    """The per-context results DCMTK prints (-d) from the A-ASSOCIATE-AC."""
    accept = output.split("BEGIN A-ASSOCIATE-AC", 1)[1].split("END A-ASSOCIATE-AC", 1)[0]
    return re.findall(r"Context ID:\s+\d+ \(([^)]+)\)", accept)


@pytest.mark.parametrize("model", ["-W", "-P"])
def test_findscu_worklist_and_patient_root_contexts_are_refused_with_result_3(
    node: NodeProcess, model: str
) -> None:
    result = run_dcmtk(
        "findscu", "-aec", "DICOMNODE", model, "127.0.0.1", str(node.port), "-k", "PatientName"
    )
    output = result.stdout + result.stderr
    assert accepted_context_results(output) == ["Abstract Syntax Not Supported"], output
    assert result.returncode != 0
    assert "No Acceptable Presentation Contexts" in output


def test_sop_classes_without_a_storage_service_are_refused_and_storage_ones_accepted(
    node: NodeProcess,
) -> None:
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    contexts = [(uid, syntaxes) for uid in [*NOT_STORAGE, *STORAGE]]
    assoc = associate(node.port, contexts, calling="NEGOTIATOR")
    try:
        assert assoc.is_established
        refused = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert refused == dict.fromkeys(NOT_STORAGE, 3)
    assert accepted == set(STORAGE)


def test_role_selection_is_answered_scu_yes_scp_no_and_a_would_be_scp_is_user_rejected(
    node: NodeProcess,
) -> None:
    contexts = [
        (uid, DEFAULT_TRANSFER_SYNTAXES) for uid in (CTImageStorage, MRImageStorage, Verification)
    ]
    roles: list[Any] = [
        build_role(CTImageStorage, scu_role=True, scp_role=True),
        build_role(MRImageStorage, scu_role=False, scp_role=True),  # "you send to me": no
    ]
    assoc = associate(node.port, contexts, calling="ROLES", ext_neg=roles)
    try:
        assert assoc.is_established
        accepted = {
            str(cx.abstract_syntax): (cx.as_scu, cx.as_scp) for cx in assoc.accepted_contexts
        }
        refused = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        replies = {
            uid: (item.scu_role, item.scp_role)
            for uid, item in assoc.acceptor.role_selection.items()
        }
    finally:
        assoc.release()
    assert accepted == {CTImageStorage: (True, False), Verification: (True, False)}
    assert refused == {MRImageStorage: 1}
    # A reply only for the SOP class whose role was proposed and whose context was accepted.
    assert replies == {CTImageStorage: (True, False)}


def test_getscu_storage_contexts_that_want_us_as_scu_are_user_rejected(
    node: NodeProcess,
) -> None:
    result = run_dcmtk(
        "getscu",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.port),
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        "PatientID=1",
    )
    output = result.stdout + result.stderr
    results = accepted_context_results(output)
    # The C-GET context has no service here; each storage context getscu proposes with
    # itself as SCP only would make the node a Storage SCU on this association.
    assert results[0] == "Abstract Syntax Not Supported", output
    assert len(results) > 50 and set(results[1:]) == {"User Rejection"}, output
    assert result.returncode != 0


@pytest.mark.parametrize(
    "proposed", [(True, True), (True, False), (False, True), (False, False), None]
)
def test_role_answers_match_pynetdicom_negotiate_as_acceptor(
    proposed: tuple[bool, bool] | None,
) -> None:
    """pynetdicom's acceptor, told the node accepts a requestor as SCU and never as SCP."""
    requested = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    requested.context_id = 1
    roles: dict[Any, Any] = {CTImageStorage: proposed} if proposed is not None else {}
    reference_context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    reference_context.scu_role, reference_context.scp_role = True, False
    expected, expected_roles = negotiate_as_acceptor([requested], [reference_context], roles)
    request = pdu.AssociateRequest(
        "SCU", "DICOMNODE", [requested], 0, b" " * 16, b" " * 16, roles=dict(roles)
    )
    (ours,) = StorageNegotiation([ExplicitVRLittleEndian])(request)
    assert ours.result == expected[0].result
    reference_reply = [(r.scu_role, r.scp_role) for r in expected_roles]
    assert ([ours.role] if ours.role is not None else []) == reference_reply


def test_the_accept_carries_one_role_item_per_sop_class_readable_by_pynetdicom() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_AC
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    request = pdu.AssociateRequest("SCU", "DICOMNODE", [], 0, b" " * 16, b" " * 16)
    results = [
        pdu.ContextResult(1, 0, ExplicitVRLittleEndian, CTImageStorage, (True, False)),
        pdu.ContextResult(3, 0, ImplicitVRLittleEndian, CTImageStorage, (True, False)),
        pdu.ContextResult(5, 1, ImplicitVRLittleEndian, MRImageStorage, None),
    ]
    encoded = pdu.encode_associate_ac(request, results, 16384, "1.2.3", "TEST")
    accept = A_ASSOCIATE_AC()
    accept.decode(encoded)
    items = [
        (str(i.sop_class_uid), i.scu_role, i.scp_role)
        for i in accept.to_primitive().user_information
        if isinstance(i, SCP_SCU_RoleSelectionNegotiation)
    ]
    assert items == [(CTImageStorage, True, False)]
