"""Forwarding's derived copies: each destination's view is its own file, and one view's
refusal is not another's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from node.forward.derived import DerivedFiles, Unshapable
from node.shape import Shaping
from node.shape.coerce import parse_coercion
from node.shape.deidentify import Deidentification
from node.transcode import transcode_file
from tests.corpus import find

DEIDENTIFY = Shaping(deidentification=Deidentification((), (), b"derived views key, 16+"))
COERCE = Shaping(coercion=parse_coercion({"PatientID": "A-{PatientID}"}, []))


def _spooled(tmp_path: Path, name: str) -> tuple[DerivedFiles, Path, str]:
    spool = tmp_path / "spool"
    spool.mkdir()
    source = spool / "0123abcd.dcm"
    shutil.copyfile(find(name), source)
    derived = DerivedFiles(spool, transcode_file)
    derived.prepare()
    return derived, source, str(dcmread(source).file_meta.TransferSyntaxUID)


def test_a_refusal_for_one_view_does_not_refuse_another(tmp_path: Path) -> None:
    derived, source, syntax = _spooled(tmp_path, "US1_UNCR.dcm")  # US, no Burned In Annotation
    with pytest.raises(Unshapable, match="Burned In Annotation is missing"):
        derived.get(source, syntax, syntax, shaping=DEIDENTIFY)
    with pytest.raises(Unshapable):  # remembered for that view, in every syntax
        derived.get(source, syntax, "JPEGLSLossless", shaping=DEIDENTIFY)
    coerced = derived.get(source, syntax, syntax, shaping=COERCE)
    assert coerced != source and dcmread(coerced).PatientID.startswith("A-")
    assert derived.get(source, syntax, syntax) == source  # no shaping: the spool file


def test_each_view_is_its_own_file_and_the_spool_file_is_untouched(tmp_path: Path) -> None:
    derived, source, syntax = _spooled(tmp_path, "CT_small.dcm")
    before = source.read_bytes()
    coerced = derived.get(source, syntax, syntax, shaping=COERCE)
    deidentified = derived.get(source, syntax, "JPEGLSLossless", shaping=DEIDENTIFY)
    assert len({coerced, deidentified, source}) == 3
    assert source.read_bytes() == before
    assert dcmread(deidentified).PatientIdentityRemoved == "YES"
    assert derived.get(source, syntax, syntax, shaping=COERCE) == coerced  # made once
