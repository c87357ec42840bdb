"""`dicom-node haproxy-check`: the HAProxy health check that C-ECHOes this node.

HAProxy in TCP mode cannot speak DICOM, but its `tcp-check` can send bytes and match
what comes back. This prints the rules of one real verification: A-ASSOCIATE-RQ for the
Verification SOP Class (Implicit VR Little Endian) to the node's AE title, expect an
A-ASSOCIATE-AC; a C-ECHO-RQ, expect a C-ECHO-RSP whose Status is 0x0000; A-RELEASE-RQ,
expect A-RELEASE-RP. A node that is stopping (SIGTERM closes its listener), refuses the
calling AE or cannot answer fails the check, and HAProxy sends new associations elsewhere.
See docs/scale-out.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from node.config.model import load_config
from node.ingest.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.net import dimse, pdu

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# The C-ECHO-RSP's Status element (0000,0900), length 2, value 0x0000, as its bytes appear
# (Implicit VR Little Endian), in the hex form HAProxy's `rbinary` matches.
SUCCESS_STATUS_HEX = "00000009020000000000"


def check_rules(called_ae: str, calling_ae: str) -> list[str]:
    """The `tcp-check` lines of a C-ECHO health check (for a backend with `option tcp-check`)."""
    associate = pdu.encode_associate_rq(
        called_ae,
        calling_ae,
        [(dimse.VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)],
        16384,
        (str(IMPLEMENTATION_CLASS_UID), IMPLEMENTATION_VERSION_NAME),
    )
    echo = pdu.encode_command_pdu(1, dimse.encode_echo_request(1, dimse.VERIFICATION))
    return [
        "tcp-check connect",
        f"tcp-check send-binary {associate.hex()}",
        "tcp-check expect rbinary ^02",  # A-ASSOCIATE-AC
        f"tcp-check send-binary {echo.hex()}",
        f"tcp-check expect rbinary ^04.*{SUCCESS_STATUS_HEX}",  # P-DATA-TF: C-ECHO-RSP, Success
        f"tcp-check send-binary {pdu.encode_release_rq().hex()}",
        "tcp-check expect rbinary ^06",  # A-RELEASE-RP
    ]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "haproxy-check", help="print HAProxy tcp-check rules that C-ECHO this node"
    )
    parser.add_argument(
        "-c", "--config", type=Path, default=Path("config.toml"), help="the node's config file"
    )
    parser.add_argument(
        "--calling-aet", default="HAPROXY", help="the AE title HAProxy calls from (default HAPROXY)"
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print("    option tcp-check")
    for line in check_rules(config.node.ae_title, args.calling_aet):
        print(f"    {line}")
    return 0
