"""The spool's hand-encoded File Meta Information matches pydicom's writer byte for byte."""

from __future__ import annotations

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless

from node.ingest.spool import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PREAMBLE,
    part10_header,
)


def pydicom_header(sop_class: str, sop_instance: str, syntax: str, calling: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if calling:
        meta.SourceApplicationEntityTitle = calling
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return PREAMBLE + buffer.getvalue()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax", "calling"),
    [
        (CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "STORESCU"),  # even lengths
        (CTImageStorage, "1.2.3.45", JPEGLSLossless, "MOD"),  # odd lengths: padded
        (
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.826.0.1.3680043.8.498.1" + "1" * 36,
            "1.2.840.10008.1.2",
            "",
        ),
    ],
)
def test_hand_encoded_meta_equals_pydicoms(
    sop_class: str, sop_instance: str, syntax: str, calling: str
) -> None:
    expected = pydicom_header(sop_class, sop_instance, syntax, calling)
    assert part10_header(sop_class, sop_instance, syntax, calling) == expected
