"""Hostile headers over the wire: every C-STORE gets a status, and the association goes on.

Corpus datasets are mutated with a fixed seed (bit flips, in VR codes too;
unknown VRs; truncations; corrupted element and item lengths; undefined
lengths whose delimiters are missing; nesting past the limit) and sent by
pynetdicom exactly as bytes, a batch per association, to a real node. The
oracle:
- every request is answered with a status: success, or a failure in the set a
  header the node cannot understand may earn (0xC210, 0xA900), with a reason;
- a known-good instance after each batch, on the same association, is stored;
- every acknowledged instance is stored byte-identical to what was sent;
- the node logs no internal error.
Also here: the field case (a flipped bit made the SOP Instance UID's VR 'WI'),
the boundary for values first converted by routing, and what intake refuses
before parsing. tests/ingest/test_fuzz.py fuzzes the same code in-process with
hypothesis.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom.association import Association

from node.dicom.header import DatasetError, read_header
from node.ingest.intake import Status, StoreRequest
from tests.conftest import StartNode
from tests.corpus import find
from tests.foundation_helpers import associate, part10_file, raw_sending, store_raw_bytes
from tests.ingest.test_fuzz import IntakeRig
from tests.support import NodeProcess, wait_until

SEED_NAMES = (
    "CT_small.dcm",  # Explicit VR Little Endian, private elements
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "rtplan.dcm",  # nested sequences, no pixels
    "MR_small_RLE.dcm",  # encapsulated pixel data
    "image_dfl.dcm",  # deflated: mutated before deflating
    "examples_palette.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
)
MUTATIONS_PER_SEED = 48
BATCH = 60
SEED = 20261201
NO_STATUS = -1
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
# What a header the node cannot understand may get: cannot understand, or the
# dataset is not the instance the request names (a flipped bit in a UID).
HOSTILE_FAILURES = {0xC210, 0xA900}
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
SOP_INSTANCE_UID = 0x00080018
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
SHORT_VRS = [
    *(b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT"),
    *(b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"),
]
HOSTILE_LENGTHS = (0, 1, 3, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, UNDEFINED)


# --- seeds and where their elements are --------------------------------------------------------


@dataclass
class Landmarks:
    """Offsets in a well-formed dataset that mutations aim at."""

    vrs: list[int] = field(default_factory=list)  # explicit VR codes (2 bytes each)
    lengths: list[tuple[int, int]] = field(default_factory=list)  # (offset, width)
    item_lengths: list[int] = field(default_factory=list)  # 4-byte item lengths
    delimiters: list[int] = field(default_factory=list)  # 8-byte delimitation items
    sequence_lengths: list[int] = field(default_factory=list)  # 4-byte lengths of defined SQs
    sop_instance_uid_vr: int | None = None


class _Locator:
    """A minimal walk of a well-formed dataset, independent of node.header."""

    def __init__(self, data: bytes, implicit: bool, little: bool) -> None:
        self.data, self.order = data, "<" if little else ">"
        self.implicit = implicit
        self.marks = Landmarks()

    def unpack(self, fmt: str, offset: int) -> int:
        return int(struct.unpack_from(self.order + fmt, self.data, offset)[0])

    def dataset(self, offset: int, end: int, implicit: bool) -> int:
        while offset + 8 <= end:
            tag = self.unpack("H", offset) << 16 | self.unpack("H", offset + 2)
            if tag == ITEM_DELIMITER:
                self.marks.delimiters.append(offset)
                return offset + 8
            vr = None if implicit else self.data[offset + 4 : offset + 6]
            if vr is None:
                length_at, width = offset + 4, 4
            elif vr in LONG_VRS:
                length_at, width = offset + 8, 4
            else:
                length_at, width = offset + 6, 2
            if vr is not None:
                self.marks.vrs.append(offset + 4)
                if tag == SOP_INSTANCE_UID:
                    self.marks.sop_instance_uid_vr = offset + 4
            self.marks.lengths.append((length_at, width))
            length = self.unpack("L" if width == 4 else "H", length_at)
            value = length_at + width
            inner_implicit = implicit or vr == b"UN"
            if length == UNDEFINED:
                offset = self.items(value, end, inner_implicit, fragments=tag == PIXEL_DATA)
                continue
            if vr == b"SQ" or (vr is None and _dictionary_vr(tag) == "SQ"):
                self.marks.sequence_lengths.append(length_at)
                self.items(value, value + length, inner_implicit, fragments=False)
            offset = value + length
        return offset

    def items(self, offset: int, end: int, implicit: bool, fragments: bool) -> int:
        while offset + 8 <= end:
            tag = self.unpack("H", offset) << 16 | self.unpack("H", offset + 2)
            length = self.unpack("L", offset + 4)
            if tag == SEQUENCE_DELIMITER:
                self.marks.delimiters.append(offset)
                return offset + 8
            self.marks.item_lengths.append(offset + 4)
            if length == UNDEFINED:
                offset = self.dataset(offset + 8, end, implicit)
                continue
            if not fragments:
                self.dataset(offset + 8, offset + 8 + length, implicit)
            offset += 8 + length
        return offset


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


@dataclass(frozen=True)
class Seed:
    name: str
    sop_class_uid: str
    sop_instance_uid: str
    syntax: UID
    dataset: bytes  # inflated for the deflated syntax
    marks: Landmarks

    @property
    def deflated(self) -> bool:
        return self.syntax == DeflatedExplicitVRLittleEndian


@cache
def load_seed(name: str) -> Seed:
    path = find(name)
    raw = path.read_bytes()
    with path.open("rb") as handle:
        read_preamble(handle, False)
        meta = _read_file_meta_info(handle)
        start = handle.tell()
    syntax = UID(meta.TransferSyntaxUID)
    dataset = raw[start:]
    if syntax == DeflatedExplicitVRLittleEndian:
        dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
    locator = _Locator(dataset, syntax.is_implicit_VR, syntax.is_little_endian)
    locator.dataset(0, len(dataset), syntax.is_implicit_VR)
    return Seed(
        name=name,
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        syntax=syntax,
        dataset=dataset,
        marks=locator.marks,
    )


# --- mutations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One dataset to send: what it came from, how it was damaged, its bytes on the wire."""

    seed: Seed
    kind: str
    sop_instance_uid: str
    dataset: bytes  # as sent (deflated again for the deflated syntax)


def same_length_uid(uid: str, rng: random.Random) -> str:
    """A new UID as long as `uid`, so it can replace it in place without moving anything."""
    root = "1.2.826.0.1.3680043.8.498."  # pydicom's root, like generate_uid()
    digits = len(uid) - len(root)
    assert digits >= 6, uid
    return root + str(rng.randrange(10 ** (digits - 1), 10**digits))


def flip_vr_bit(data: bytearray, at: int, rng: random.Random) -> None:
    data[at + rng.randrange(2)] ^= 1 << rng.randrange(8)


def unknown_vr(rng: random.Random) -> bytes:
    while True:
        code = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))
        if code not in LONG_VRS and code not in SHORT_VRS:
            return code


def set_length(data: bytearray, at: int, width: int, value: int, big_endian: bool) -> None:
    field_bytes = (value & ((1 << (8 * width)) - 1)).to_bytes(
        width, "big" if big_endian else "little"
    )
    data[at : at + width] = field_bytes


Mutation = Callable[[bytearray, Seed, random.Random], bool]  # False: not applicable to the seed


def vr_bit_flip(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    if not seed.marks.vrs:
        return False
    flip_vr_bit(data, rng.choice(seed.marks.vrs), rng)
    return True


def sop_instance_uid_vr_flip(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    at = seed.marks.sop_instance_uid_vr
    if at is None:
        return False
    data[at] ^= 0x02  # 'UI' becomes 'WI', the case in the field
    return True


def vr_unknown(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    if not seed.marks.vrs:
        return False
    at = rng.choice(seed.marks.vrs)
    data[at : at + 2] = unknown_vr(rng)
    return True


def vr_swapped_for_a_known_one(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    """Another known VR with a same-sized length field: the layout still parses."""
    if not seed.marks.vrs:
        return False
    at = rng.choice(seed.marks.vrs)
    pool = sorted(LONG_VRS) if bytes(data[at : at + 2]) in LONG_VRS else SHORT_VRS
    data[at : at + 2] = rng.choice(pool)
    return True


def bit_flips(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    span = len(data) if rng.random() < 0.3 else min(len(data), 2048)  # mostly in the header
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return True


def truncation(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    del data[rng.randrange(1, len(data)) :]
    return True


def element_length(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    at, width = rng.choice(seed.marks.lengths)
    value = rng.choice((*HOSTILE_LENGTHS, len(data), rng.randrange(1 << (8 * width))))
    set_length(data, at, width, value, not seed.syntax.is_little_endian)
    return True


def item_length(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    if not seed.marks.item_lengths:
        return False
    value = rng.choice((*HOSTILE_LENGTHS, rng.randrange(1 << 16)))
    set_length(
        data, rng.choice(seed.marks.item_lengths), 4, value, not seed.syntax.is_little_endian
    )
    return True


def missing_delimiter(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    if not seed.marks.delimiters:
        return False
    at = rng.choice(seed.marks.delimiters)
    del data[at : at + 8]
    return True


def undefined_length_without_delimiters(data: bytearray, seed: Seed, rng: random.Random) -> bool:
    """A defined-length sequence or item turned undefined: nothing closes it."""
    fields = seed.marks.sequence_lengths + seed.marks.item_lengths
    if not fields:
        return False
    set_length(data, rng.choice(fields), 4, UNDEFINED, not seed.syntax.is_little_endian)
    return True


MUTATIONS: dict[str, Mutation] = {
    "vr-bit-flip": vr_bit_flip,
    "sop-instance-uid-vr-flip": sop_instance_uid_vr_flip,
    "unknown-vr": vr_unknown,
    "known-vr-swap": vr_swapped_for_a_known_one,
    "bit-flips": bit_flips,
    "truncation": truncation,
    "element-length": element_length,
    "item-length": item_length,
    "missing-delimiter": missing_delimiter,
    "undefined-length": undefined_length_without_delimiters,
}


def mutated_cases(rng: random.Random) -> list[Case]:
    cases = []
    kinds = list(MUTATIONS)
    for name in SEED_NAMES:
        seed = load_seed(name)
        made = 0
        while made < MUTATIONS_PER_SEED:
            kind = kinds[made % len(kinds)] if made < len(kinds) else rng.choice(kinds)
            uid = same_length_uid(seed.sop_instance_uid, rng)
            data = bytearray(seed.dataset.replace(seed.sop_instance_uid.encode(), uid.encode()))
            if not MUTATIONS[kind](data, seed, rng):
                kind = "bit-flips"
                bit_flips(data, seed, rng)
            cases.append(Case(seed, kind, uid, wire_bytes(seed, bytes(data))))
            made += 1
    return cases


def wire_bytes(seed: Seed, dataset: bytes) -> bytes:
    if not seed.deflated:
        return dataset
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(dataset) + compressor.flush()


def nested_sequences(depth: int, undefined: bool) -> bytes:
    """`depth` sequences, each the only element of the last one's only item."""
    inner = b""
    for _ in range(depth):
        if undefined:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + inner
            item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
            inner = struct.pack("<HH2s2xL", 0x0040, 0xA730, b"SQ", UNDEFINED) + item
            inner += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        else:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
            inner = struct.pack("<HH2s2xL", 0x0040, 0xA730, b"SQ", len(item)) + item
    return inner


def deep_cases(rng: random.Random) -> list[Case]:
    """Content Sequences nested far past any real report, after a valid CT_small header."""
    seed = load_seed("CT_small.dcm")
    cases = []
    for undefined in (True, False):
        uid = same_length_uid(seed.sop_instance_uid, rng)
        data = seed.dataset.replace(seed.sop_instance_uid.encode(), uid.encode())
        pixel = data.find(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
        data = data[:pixel] + nested_sequences(200, undefined) + data[pixel:]
        cases.append(Case(seed, f"nested-200-{'undefined' if undefined else 'defined'}", uid, data))
    return cases


# --- sending and checking -----------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    comment: str


def send(assoc: Association, folder: Path, case: Case) -> Answer:
    path = part10_file(
        folder, case.seed.sop_class_uid, case.sop_instance_uid, case.dataset, case.seed.syntax
    )
    try:
        with raw_sending():
            response = assoc.send_c_store(path)
    finally:
        path.unlink()
    if "Status" not in response:
        return Answer(NO_STATUS, "no response: the association was aborted or timed out")
    return Answer(int(response.Status), str(response.get("ErrorComment", "")))


def known_good(rng: random.Random) -> Case:
    seed = load_seed("CT_small.dcm")
    uid = same_length_uid(seed.sop_instance_uid, rng)
    return Case(
        seed, "known-good", uid, seed.dataset.replace(seed.sop_instance_uid.encode(), uid.encode())
    )


def batches(cases: list[Case], size: int) -> Iterator[list[Case]]:
    for start in range(0, len(cases), size):
        yield cases[start : start + size]


def contexts_for(cases: list[Case]) -> list[tuple[str, list[str]]]:
    """One presentation context per SOP class and transfer syntax, so each is accepted."""
    pairs = {(case.seed.sop_class_uid, str(case.seed.syntax)) for case in cases}
    return [(sop_class, [syntax]) for sop_class, syntax in sorted(pairs)]


def stored_datasets(archive: Path) -> dict[str, Path]:
    """Stored files by the SHA-256 of their dataset bytes (everything after the file meta)."""
    found = {}
    for path in archive.rglob("*.dcm"):
        if ".incoming" in path.parts:
            continue
        raw = path.read_bytes()
        (meta_length,) = struct.unpack_from("<L", raw, 128 + 4 + 8)
        found[hashlib.sha256(raw[128 + 4 + 12 + meta_length :]).hexdigest()] = path
    return found


def digest(case: Case) -> str:
    return hashlib.sha256(case.dataset).hexdigest()


def no_internal_error(node: NodeProcess) -> bool:
    log = node.log()
    return "internal error" not in log and "Traceback" not in log


# --- the tests ----------------------------------------------------------------------------------


def test_an_unknown_vr_in_the_sop_instance_uid_gets_0xc210_and_the_association_goes_on(
    start_node: StartNode, tmp_path: Path
) -> None:
    """The case from the field: one flipped bit made 'UI' 'WI', and the sender got no status."""
    node = start_node()
    rng = random.Random(SEED)
    seed = load_seed("CT_small.dcm")
    uid = same_length_uid(seed.sop_instance_uid, rng)
    data = bytearray(seed.dataset.replace(seed.sop_instance_uid.encode(), uid.encode()))
    assert sop_instance_uid_vr_flip(data, seed, rng)
    at = seed.marks.sop_instance_uid_vr
    assert at is not None and bytes(data[at : at + 2]) == b"WI"
    hostile = Case(seed, "sop-instance-uid-vr-flip", uid, bytes(data))
    good = known_good(rng)
    assoc = associate(node.port, contexts_for([hostile]), calling="MODALITY")
    assert assoc.is_established
    try:
        answer = send(assoc, tmp_path, hostile)
        assert answer.status == 0xC210, (answer, node.log()[-3000:])
        assert "'WI'" in answer.comment and "(0008,0018)" in answer.comment, answer.comment
        assert assoc.is_established
        assert send(assoc, tmp_path, good).status == 0x0000  # the same association goes on
    finally:
        if assoc.is_established:
            assoc.release()
    assert wait_until(lambda: digest(good) in stored_datasets(tmp_path / "archive"), timeout=30)
    assert digest(hostile) not in stored_datasets(tmp_path / "archive")
    # The log names the calling AE, the SOP Instance UID, the transfer syntax and why.
    refusals = [line for line in node.log().splitlines() if "0xC210" in line]
    assert len(refusals) == 1, node.log()[-3000:]
    for expected in ("'MODALITY'", uid, "ExplicitVRLittleEndian", "unknown VR 'WI' in (0008,0018)"):
        assert expected in refusals[0], refusals[0]
    assert no_internal_error(node), node.log()[-3000:]


def test_mutated_corpus_over_the_wire_always_gets_a_status_and_what_is_acknowledged_is_stored_exactly(
    start_node: StartNode, tmp_path: Path
) -> None:
    node = start_node()
    rng = random.Random(SEED)
    cases = mutated_cases(rng) + deep_cases(rng)
    rng.shuffle(cases)
    answers: list[tuple[Case, Answer]] = []
    goods: list[Case] = []
    for batch in batches(cases, BATCH):
        good = known_good(rng)
        assoc = associate(node.port, contexts_for([*batch, good]), calling="FUZZER")
        assert assoc.is_established, node.log()[-3000:]
        try:
            for case in batch:
                answers.append((case, send(assoc, tmp_path, case)))
                if not assoc.is_established:
                    break  # reported below, with the case that ended it
            if assoc.is_established:
                good_answer = send(assoc, tmp_path, good)
                assert good_answer.status == 0x0000, (good_answer, node.log()[-3000:])
                goods.append(good)
        finally:
            if assoc.is_established:
                assoc.release()
        no_status = [(c.seed.name, c.kind, a.comment) for c, a in answers if a.status == NO_STATUS]
        assert not no_status, (no_status, node.log()[-4000:])

    statuses = Counter(answer.status for _, answer in answers)
    unexpected = [
        (case.seed.name, case.kind, hex(answer.status), answer.comment)
        for case, answer in answers
        if answer.status not in SUCCESS_OR_WARNING | HOSTILE_FAILURES
    ]
    assert not unexpected, unexpected
    without_reason = [
        (case.seed.name, case.kind, hex(answer.status))
        for case, answer in answers
        if answer.status in HOSTILE_FAILURES and not answer.comment
    ]
    assert not without_reason, without_reason
    # The mutations reach the parser: a good share is refused, a good share still stored.
    assert statuses[0xC210] >= len(cases) // 4, statuses
    assert statuses[0x0000] >= len(cases) // 10, statuses
    for kind in (
        "sop-instance-uid-vr-flip",
        "unknown-vr",
        "nested-200-undefined",
        "nested-200-defined",
    ):
        assert all(a.status == 0xC210 for c, a in answers if c.kind == kind), kind

    acknowledged = [case for case, answer in answers if answer.status in SUCCESS_OR_WARNING]
    wanted = {digest(case) for case in [*acknowledged, *goods]}
    archive = tmp_path / "archive"
    stored_all = wait_until(lambda: wanted <= set(stored_datasets(archive)), timeout=60)
    missing = [
        (c.seed.name, c.kind) for c in acknowledged if digest(c) not in stored_datasets(archive)
    ]
    assert stored_all and not missing, (missing, node.log()[-4000:])
    refused = {digest(case) for case, answer in answers if answer.status in HOSTILE_FAILURES}
    assert not refused & set(stored_datasets(archive))
    assert node.alive()
    assert no_internal_error(node), node.log()[-4000:]
    print(f"\n{len(cases)} mutated datasets over the wire: {dict(sorted(statuses.items()))}")


# --- the parser's boundary ----------------------------------------------------------------------


def test_a_value_pydicom_cannot_convert_is_a_dataset_error_when_first_read() -> None:
    """Routing reads header values after the walk: what fails there must be DatasetError too."""
    seed = load_seed("CT_small.dcm")
    data = bytearray(seed.dataset)
    assert sop_instance_uid_vr_flip(data, seed, random.Random(SEED))
    header = read_header(bytes(data), seed.syntax)  # the walk is skipped on purpose
    with pytest.raises(DatasetError, match="Unknown Value Representation 'WI'"):
        header.get("SOPInstanceUID")
    assert header.get("NoSuchKeyword") is None  # an absent element is still just absent
    assert header.get(0x00990010) is None
    assert str(header.PatientName) == str(pydicom.dcmread(find("CT_small.dcm")).PatientName)


def test_a_route_on_a_long_header_value_sees_the_value(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A value over 4 KiB is read lazily; routing must see it, not an empty string."""

    def two_storages_and_a_route(sections: dict[str, object]) -> None:
        sections["storage"] = [
            {"name": "archive", "path": str(tmp_path / "archive")},
            {"name": "special", "path": str(tmp_path / "special")},
        ]
        sections["routing"] = {"unrouted_storage": "archive"}
        sections["route"] = [{"match": {"ImageComments": "*NEEDLE*"}, "storage": ["special"]}]

    node = start_node(two_storages_and_a_route)
    sop_class, uid, encoded = encoded_dataset_with(ImageComments="hay " * 1500 + "NEEDLE")
    assert store_raw_bytes(node.port, tmp_path, sop_class, uid, encoded) == 0x0000
    assert wait_until(lambda: list((tmp_path / "special").rglob(f"{uid}.dcm")), timeout=30), (
        node.log()[-3000:]
    )
    assert not list((tmp_path / "archive").rglob(f"{uid}.dcm"))
    assert no_internal_error(node), node.log()[-3000:]


def encoded_dataset_with(**values: str) -> tuple[str, str, bytes]:
    """CT_small with a new SOP Instance UID and `values` set, as Explicit VR Little Endian bytes."""
    ds = pydicom.dcmread(find("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), buffer.getvalue()


# --- what intake refuses before or after parsing ------------------------------------------------


def intake_request(seed: Seed, dataset: bytes, sop_instance_uid: str) -> StoreRequest:
    return StoreRequest(
        seed.sop_class_uid, sop_instance_uid, seed.syntax, "HOSTILE", "DICOMNODE", dataset
    )


def ct_small_without_sop_instance_uid() -> bytes:
    ds = pydicom.dcmread(find("CT_small.dcm"))
    del ds.SOPInstanceUID
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("uid", ["", "1.2.3.4\ufffd", "1.2.3\n4"])
def test_a_request_uid_the_spool_cannot_carry_is_refused_before_anything_is_written(
    tmp_path: Path, uid: str
) -> None:
    """The dataset has no UID to compare with, so only the request's says which instance it is.

    Before: '' and '1.2.3\\n4' were stored under that UID, and U+FFFD (how a non-ASCII
    byte in the command set is decoded) raised UnicodeEncodeError in the spool.
    """
    rig = IntakeRig(tmp_path)
    seed = load_seed("CT_small.dcm")
    result = rig.intake.receive(intake_request(seed, ct_small_without_sop_instance_uid(), uid))
    assert result.status == Status.CANNOT_UNDERSTAND, result
    assert "Affected SOP Instance UID" in result.reason
    assert rig.spooled() == set()


def test_a_dataset_without_its_sop_instance_uid_does_not_match_its_sop_class(
    tmp_path: Path,
) -> None:
    """Type 1: without it the layout would file it as UNKNOWN, where the next one lands too."""
    rig = IntakeRig(tmp_path)
    seed = load_seed("CT_small.dcm")
    dataset = ct_small_without_sop_instance_uid()
    result = rig.intake.receive(intake_request(seed, dataset, generate_uid()))
    assert result.status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, result
    assert "no SOPInstanceUID" in result.reason
    assert rig.spooled() == set()
