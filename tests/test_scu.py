"""`dicom-node send` and `echo` on the node's own requestor, against DCMTK storescp.

send streams a file's dataset as it is on disk when the peer accepts the file's
syntax, re-encodes only between uncompressed syntaxes when it does not, and
never converts a compressed file.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import ImplicitVRLittleEndian

from node.cli.scu import echo, format_summary, send
from node.net.storelink import Peer
from tests.corpus import find
from tests.forward_support import StoreSCP


def test_send_re_encodes_uncompressed_only_when_the_peer_refuses_the_files_syntax(
    tmp_path: Path,
) -> None:
    # storescp +xi accepts Implicit VR Little Endian only.
    scp = StoreSCP(tmp_path / "scp", "STORESCP", "+xi").start()
    try:
        peer = Peer("STORESCP", "127.0.0.1", scp.port)
        ct, j2k = find("CT_small.dcm"), find("JPEG2000.dcm")  # Explicit VR LE, JPEG 2000
        summary = send(peer, [ct, j2k], "SCUTEST", timeout=10, progress=False)
        assert (summary.sent, summary.failed_count) == (1, 1), format_summary(summary)
        [(reason, paths)] = summary.failed.items()
        assert paths == [j2k] and "accepted no context" in reason
        [stored] = scp.files()
        received = pydicom.dcmread(stored)
        assert received.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        original = pydicom.dcmread(ct)
        assert received.SOPInstanceUID == original.SOPInstanceUID
        assert received.PixelData == original.PixelData
        assert echo(peer, "SCUTEST", timeout=10) == 0x0000
    finally:
        scp.stop()


def test_echo_to_nobody_is_minus_one(tmp_path: Path) -> None:
    from tests.support import free_port

    assert echo(Peer("NOBODY", "127.0.0.1", free_port()), "SCUTEST", timeout=5) == -1
