"""Series and study triggers end to end, proved from the destinations' own logs and files.

A modality is DCMTK storescu and dcmsend sending a series in chunks, one association
each, with pauses; the destinations are DCMTK storescp (its verbose log says which
instances came in which association, its files when) and Orthanc (what it holds). One
node for the module; each test has its own route, matched on SeriesDescription.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.forward_support import (
    RefusingSCP,
    StoreSCP,
    destination,
    forwarding_config,
    queue_cli,
)
from tests.orthanc import Orthanc
from tests.processes import NODELAY
from tests.support import (
    NodeProcess,
    configured_node,
    free_port,
    require_tool,
    storescu,
    wait_until,
)

QUIET = 5.0  # stable_after of the "quiet" route: the acceptance test's 5 s
KILL_STABLE = 8.0

ROUTES = [
    {
        "name": "quiet",
        "match": {"SeriesDescription": "QUIET*"},
        "storage": ["archive"],
        "destinations": ["scp", "pacs"],
        "trigger": "series",
        "stable_after": QUIET,
    },
    {
        "name": "late",
        "match": {"SeriesDescription": "LATE*"},
        "destinations": ["scp"],
        "trigger": "series",
        "stable_after": 2,
    },
    {
        "name": "busy",
        "match": {"SeriesDescription": "BUSY*"},
        "destinations": ["scp"],
        "trigger": "series",
        "stable_after": 3,
        "force_after": 5,
    },
    {
        "name": "held",
        "match": {"SeriesDescription": "HELD*"},
        "destinations": ["scp"],
        "trigger": "series",
        "stable_after": 6,
    },
    {
        "name": "mixed",
        "match": {"SeriesDescription": "MIXED*"},
        "destinations": ["refuser", "scp"],
        "trigger": "study",
        "stable_after": 2,
    },
    {
        "name": "full",
        "match": {"SeriesDescription": "FULL*"},
        "destinations": ["full"],
        "trigger": "series",
        "stable_after": 2,
    },
    {
        "name": "counted",
        "match": {"SeriesDescription": "COUNTED*"},
        "destinations": ["scp"],
        "trigger": "series",
        "stable_after": 60,
        "force_after": 120,
        "expected_instances_from": "NumberOfSeriesRelatedInstances",
    },
    {
        "name": "studies",
        "match": {"SeriesDescription": "KILL*"},
        "destinations": ["pacs"],
        "trigger": "study",
        "stable_after": KILL_STABLE,
    },
]


@dataclass
class Site:
    node: NodeProcess
    scp: StoreSCP
    orthanc: Orthanc
    refuser: RefusingSCP  # refuses MR (0x0122) until allowed
    full: RefusingSCP  # out of resources (0xA700) until allowed
    metrics_port: int
    folder: Path

    @property
    def config(self) -> Path:
        return self.node.config_path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("triggers")
    scp = StoreSCP(folder / "scp", "STORESCP", "-v").start()
    orthanc = Orthanc(folder / "orthanc").start()
    refuser = RefusingSCP(folder / "refuser").start()
    full = RefusingSCP(folder / "full", "full").start()
    metrics_port = free_port()
    config = forwarding_config(
        folder,
        free_port(),
        [
            destination("scp", "STORESCP", scp.port),
            destination("pacs", "ORTHANC", orthanc.dicom_port),
            destination("refuser", "REFUSER", refuser.port),
            destination("full", "REFUSER", full.port),
        ],
        ROUTES,
        metrics={"address": f"127.0.0.1:{metrics_port}"},
    )
    node = configured_node(folder, config=config).start()
    try:
        yield Site(node, scp, orthanc, refuser, full, metrics_port, folder)
    finally:
        node.stop()
        for peer in (orthanc, scp, refuser, full):
            peer.stop()


@dataclass(frozen=True)
class Series:
    study: str
    uid: str
    paths: list[Path]  # in Instance Number order
    sop_uids: list[str]


def make_series(
    folder: Path,
    description: str,
    count: int,
    *,
    study: str | None = None,
    series: str | None = None,
    number: int = 1,
    first: int = 1,
    example: str = "CT_small.dcm",
    announced: int | None = None,
) -> Series:
    """`count` instances of one series (copies of a pydicom example), Instance Numbers
    first.., new SOP Instance UIDs."""
    source = get_testdata_file(example)
    assert source is not None
    study = study or generate_uid()
    series = series or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths, uids = [], []
    for instance_number in range(first, first + count):
        ds = pydicom.dcmread(source)
        uid = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesNumber, ds.InstanceNumber = number, instance_number
        ds.SeriesDescription = description
        if announced is not None:
            ds.NumberOfSeriesRelatedInstances = announced
        path = folder / f"{description.replace(' ', '_')}-{number}-{instance_number}.dcm"
        ds.save_as(path)
        paths.append(path)
        uids.append(uid)
    return Series(study, series, paths, uids)


def send(site: Site, paths: Sequence[Path]) -> None:
    result = storescu(site.node.port, paths)
    assert result.returncode == 0, result.stderr


def dcmsend(site: Site, paths: Sequence[Path]) -> None:
    result = subprocess.run(
        [require_tool("dcmsend"), "-aec", "DICOMNODE", "-aet", "DCMSEND", "127.0.0.1",
         str(site.node.port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **NODELAY},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def associations(scp: StoreSCP) -> list[list[str]]:
    """SOP Instance UIDs storescp stored, per association, in the order received."""
    runs: list[list[str]] = []
    for line in scp.log().splitlines():
        if "Association Received" in line:
            runs.append([])
        stored = re.search(r"storing DICOM file: (\S+)$", line)
        if stored:
            runs[-1].append(Path(stored[1]).name.split(".", 1)[1])  # CT.<SOP Instance UID>
    return runs


def association_of(scp: StoreSCP, uids: Sequence[str]) -> list[str]:
    """The one association that holds the first of `uids`."""
    (run,) = [run for run in associations(scp) if uids[0] in run]
    return run


def received(scp: StoreSCP, uids: Sequence[str]) -> list[Path]:
    files = {path.name.split(".", 1)[1]: path for path in scp.files()}
    return [files[uid] for uid in uids if uid in files]


def orthanc_series(orthanc: Orthanc, series_uid: str) -> int:
    found = orthanc.post(
        "/tools/find",
        f'{{"Level": "Instance", "Query": {{"SeriesInstanceUID": "{series_uid}"}}}}'.encode(),
        "application/json",
    )
    return len(found)


def archived(site: Site, series_uid: str) -> int:
    return len(list((site.folder / "archive").glob(f"*/*/{series_uid}/*.dcm")))


def metric(site: Site, name: str, **labels: str) -> float:
    """One sample of the node's metrics endpoint (0 when absent)."""
    url = f"http://127.0.0.1:{site.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def late_arrivals(site: Site) -> float:
    return metric(site, "dicom_node_group_late_arrivals_total")


def dispatch_times(site: Site, studies: Sequence[str]) -> list[tuple[str, float, float]]:
    """(Study Instance UID, last arrival, dispatch) of each study group, as the queue has them."""
    path = site.folder / "data" / "queue.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT study_instance_uid, last_arrival_at, dispatched_at FROM job_groups"
            " WHERE level = 'study' AND study_instance_uid IN (?, ?, ?) ORDER BY id",
            list(studies),
        ).fetchall()
    assert len(rows) == len(studies), rows
    return [(str(a), float(b), float(c)) for a, b, c in rows]


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def test_a_series_in_three_associations_arrives_whole_in_one_after_the_quiet_period(
    site: Site,
) -> None:
    series = make_series(site.folder / "quiet", "QUIET T1", 6)
    # Out of order and in three associations, 2 s apart, as a modality sending in chunks.
    send(site, series.paths[4:6])
    time.sleep(2)
    dcmsend(site, series.paths[2:4])
    paused = time.time()
    # In the pause (it cannot be stable yet: the next chunk comes sooner than 5 s).
    status = queue_cli(site.config, "status")
    assert status.returncode == 0, status.stderr
    lines = [line for line in status.stdout.splitlines() if series.uid in line]
    assert len(lines) == 3, status.stdout  # one group per target: scp, pacs, archive
    for line in lines:
        assert line.split()[0] == "quiet" and " waiting  4 " in line, line
        assert re.search(r"  in \ds  ", line), line  # time until stable
    assert {line.split()[2] for line in lines} == {"scp", "pacs", "archive"}
    sleep_until(paused + 2)
    last_sent = time.time()  # the node records the last arrival after this
    send(site, series.paths[0:2])

    waiting = {"kind": "forward", "target": "scp", "state": "waiting"}
    assert metric(site, "dicom_node_groups_waiting", **waiting) == 1
    sleep_until(last_sent + QUIET - 1.0)
    assert received(site.scp, series.sop_uids) == []
    assert orthanc_series(site.orthanc, series.uid) == 0
    assert archived(site, series.uid) == 0

    assert wait_until(lambda: len(received(site.scp, series.sop_uids)) == 6, timeout=30)
    assert association_of(site.scp, series.sop_uids) == series.sop_uids  # one, in order
    first_file = min(path.stat().st_mtime for path in received(site.scp, series.sop_uids))
    assert first_file >= last_sent + QUIET - 0.05, first_file - last_sent
    assert wait_until(lambda: orthanc_series(site.orthanc, series.uid) == 6, timeout=30)
    assert wait_until(lambda: archived(site, series.uid) == 6, timeout=30)
    assert site.node.logged(f"series {series.uid} of Study Instance UID {series.study} delivered")
    scp = {"kind": "forward", "target": "scp"}
    assert metric(site, "dicom_node_group_dispatch_delay_seconds_count", **scp) == 1
    # First arrival to dispatch: the 4 s of sending, then the 5 s quiet period.
    assert 8.5 < metric(site, "dicom_node_group_dispatch_delay_seconds_sum", **scp) < 30
    assert metric(site, "dicom_node_groups_waiting", **waiting) == 0


def test_a_late_instance_goes_as_its_own_follow_up_group_and_is_counted(site: Site) -> None:
    before = late_arrivals(site)
    series = make_series(site.folder / "late", "LATE T2", 3)
    send(site, series.paths)
    assert wait_until(lambda: len(received(site.scp, series.sop_uids)) == 3, timeout=30)
    late = make_series(
        site.folder / "late", "LATE T2", 1, study=series.study, series=series.uid, first=4
    )
    send(site, late.paths)
    assert wait_until(lambda: received(site.scp, late.sop_uids) != [], timeout=30)
    assert association_of(site.scp, series.sop_uids) == series.sop_uids
    assert association_of(site.scp, late.sop_uids) == late.sop_uids  # a group of its own
    stored = Counter(uid for run in associations(site.scp) for uid in run)
    assert [stored[uid] for uid in series.sop_uids + late.sop_uids] == [1, 1, 1, 1]
    assert late_arrivals(site) == before + 1
    assert site.node.logged(f"late arrival: SOP Instance UID {late.sop_uids[0]}")
    assert site.node.logged("it starts version 2")


def test_force_after_sends_a_series_that_never_goes_quiet(site: Site) -> None:
    series = make_series(site.folder / "busy", "BUSY DWI", 10)
    started = time.time()
    for index, path in enumerate(series.paths):  # one instance a second: never 3 s quiet
        sleep_until(started + index)
        send(site, [path])
    still_sending = received(site.scp, series.sop_uids)
    # Forced 5 s after the first arrival, while instances kept coming.
    assert 1 <= len(still_sending) <= 9, len(still_sending)
    assert wait_until(lambda: len(received(site.scp, series.sop_uids)) == 10, timeout=30)
    forced = association_of(site.scp, series.sop_uids)
    assert forced == series.sop_uids[: len(forced)]
    rest = series.sop_uids[len(forced) :]
    assert association_of(site.scp, rest) == rest  # the rest: version 2, on its stable timer
    assert site.node.logged("forced after 5 s")


def test_a_series_whose_instances_are_all_there_goes_without_the_quiet_period(
    site: Site,
) -> None:
    series = make_series(site.folder / "counted", "COUNTED T1", 3, announced=3)
    send(site, series.paths[:2])
    send(site, series.paths[2:])
    # stable_after is 60 s: the modality's count (3 of 3) sends it at once.
    assert wait_until(lambda: len(received(site.scp, series.sop_uids)) == 3, timeout=20)
    assert association_of(site.scp, series.sop_uids) == series.sop_uids
    assert site.node.logged("complete: 3 of 3 instances")


def test_hold_pauses_a_group_and_release_sends_it_now(site: Site) -> None:
    series = make_series(site.folder / "held", "HELD T1", 2)
    send(site, series.paths)
    last_arrival = time.time()
    held = queue_cli(site.config, "hold", "--series", series.uid)
    assert held.returncode == 0 and held.stdout.startswith("1 groups"), held.stdout
    sleep_until(last_arrival + 6 + 1.5)  # past its stable_after
    assert received(site.scp, series.sop_uids) == []
    status = queue_cli(site.config, "status")
    (line,) = [line for line in status.stdout.splitlines() if series.uid in line]
    assert " held " in line and "queue release" in line, line
    released = queue_cli(site.config, "release", "--series", series.uid)
    assert released.returncode == 0 and released.stdout.startswith("1 groups"), released.stdout
    assert wait_until(lambda: len(received(site.scp, series.sop_uids)) == 2, timeout=20)
    assert association_of(site.scp, series.sop_uids) == series.sop_uids


def test_a_refused_member_holds_its_group_only_with_the_reason(site: Site) -> None:
    study = generate_uid()
    ct = make_series(site.folder / "mixed", "MIXED CT", 2, study=study, number=1)
    mr = make_series(
        site.folder / "mixed", "MIXED MR", 2, study=study, number=2, example="MR_small.dcm"
    )
    send(site, ct.paths + mr.paths)
    everything = ct.sop_uids + mr.sop_uids
    # The other destination of the same route gets the whole study, in one association.
    assert wait_until(lambda: len(received(site.scp, everything)) == 4, timeout=30)
    assert association_of(site.scp, everything) == everything
    assert site.node.logged(f"Study Instance UID {study} delivered to forward 'scp'")
    assert wait_until(lambda: site.refuser.count() == 2, timeout=30)  # the CT series
    assert site.node.logged("dead letter: SOP Instance UID", timeout=10)
    status = queue_cli(site.config, "status").stdout
    (line,) = [line for line in status.splitlines() if study in line and "refuser" in line]
    assert " dispatched " in line and "a member failed: status 0x0122" in line, line
    assert f"Study Instance UID {study} delivered to forward 'refuser'" not in site.node.log()

    site.refuser.allow_mr()  # the cause is fixed; the operator sends the dead letters again
    retried = queue_cli(site.config, "retry", "--failed", "--destination", "refuser")
    assert retried.returncode == 0, retried.stderr
    assert wait_until(lambda: site.refuser.count() == 4, timeout=30)
    assert site.node.logged(f"Study Instance UID {study} delivered to forward 'refuser'")


def test_a_peer_out_of_resources_mid_group_gets_the_group_again_whole(site: Site) -> None:
    series = make_series(site.folder / "to-full", "FULL T1", 3)
    send(site, series.paths)
    assert site.node.logged("unreachable or out of resources during a group", timeout=30)
    assert site.full.count() == 0
    site.full.allow_mr()  # its disk has room again
    assert wait_until(lambda: site.full.count() == 3, timeout=30)
    assert site.node.logged(f"series {series.uid} of Study Instance UID {series.study} delivered")
    forwarded = Counter(re.findall(r"forwarded SOP Instance UID (\S+) to 'full'", site.node.log()))
    assert [forwarded[uid] for uid in series.sop_uids] == [1, 1, 1]
    sent_whole = f"sending series {series.uid} (version 1, 3 instances)"
    assert site.node.log().count(sent_whole) >= 2  # the first try, and the whole group again


def test_kill_9_with_three_studies_waiting_then_a_restart_delivers_each_whole_once(
    site: Site,
) -> None:
    studies = []
    for index in range(3):
        study = generate_uid()
        parts = [
            make_series(site.folder / f"kill{index}", f"KILL {n}", 2, study=study, number=n)
            for n in (2, 1)
        ]
        studies.append(parts)
    last_sent = 0.0
    for parts in studies:
        last_sent = time.time()
        send(site, [path for part in parts for path in part.paths])
    site.node.kill()  # SIGKILL: three studies waiting for their stable timer
    assert all(orthanc_series(site.orthanc, p.uid) == 0 for parts in studies for p in parts)
    sleep_until(last_sent + KILL_STABLE - 1.5)
    restarted = time.time()
    site.node.start()
    uids = [uid for parts in studies for part in parts for uid in part.sop_uids]

    def all_there() -> bool:
        return all(orthanc_series(site.orthanc, p.uid) == 2 for parts in studies for p in parts)

    assert wait_until(all_there, timeout=30), site.node.log_tail(40)
    # Timed from the last arrival as recorded before the kill (due 1.5 s after the restart,
    # or as soon as the restarted node runs), not from the restart (KILL_STABLE after it).
    for study, last_arrival, dispatched in dispatch_times(site, [p[0].study for p in studies]):
        assert dispatched >= last_arrival + KILL_STABLE, (study, dispatched - last_arrival)
        assert dispatched - restarted < KILL_STABLE - 1.5, (study, dispatched - restarted)
    forwarded = Counter(re.findall(r"forwarded SOP Instance UID (\S+) to 'pacs'", site.node.log()))
    assert [forwarded[uid] for uid in uids] == [1] * len(uids), forwarded  # none twice
    for parts in studies:
        assert site.node.logged(f"study (whole study) of Study Instance UID {parts[0].study}")
