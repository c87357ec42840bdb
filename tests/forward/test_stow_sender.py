"""The STOW-RS sender of one forward worker (node.forward.dicomweb) on its own, against
the small STOW-RS server: what it makes of answers that come in the middle of a study."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.config.model import DestinationConfig
from node.forward.derived import DerivedFiles
from node.forward.dicomweb import StowSender
from node.jobs.model import Job, JobKind, ReceivedInstance
from tests.corpus import copies_with_new_uids, find
from tests.forward.test_stow_outcomes import StowServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def stow() -> Iterator[StowServer]:
    server = StowServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def jobs_for(paths: list[Path]) -> list[Job]:
    jobs = []
    for index, path in enumerate(paths, start=1):
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        instance = ReceivedInstance(
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            transfer_syntax=str(meta.TransferSyntaxUID),
            calling_ae_title="TEST",
            called_ae_title="DICOMNODE",
            spool_path=path,
            size=path.stat().st_size,
        )
        jobs.append(Job(index, JobKind.FORWARD, "web", 1, index, instance))
    return jobs


def never_transcode(*_args: object, **_kwargs: object) -> object:
    raise AssertionError("these instances go as received")


def sender(stow: StowServer, tmp_path: Path, **keys: object) -> StowSender:
    destination = DestinationConfig("web", protocol="dicomweb", url=stow.url, **keys)  # type: ignore[arg-type]
    return StowSender(destination, DerivedFiles(tmp_path, never_transcode))


def test_a_hold_in_the_middle_of_a_study_keeps_what_was_delivered(
    stow: StowServer, tmp_path: Path
) -> None:
    jobs = jobs_for(copies_with_new_uids(find("CT_small.dcm"), tmp_path / "spool", 3))
    # 400 for the three together (each is then sent alone), the first alone is stored,
    # then the server fails: the third is never sent.
    stow.script = [400, 200, 503]
    web = sender(stow, tmp_path)
    result = web.deliver(jobs, threading.Event())
    verdicts = [(o.job.id, o.verdict) for o in result.outcomes]
    assert verdicts == [(1, "delivered"), (2, "retry"), (3, "retry")]
    assert result.hold == f"503 Service Unavailable from {stow.url}/studies"
    assert result.outcomes[1].detail == result.hold
    assert len(stow.received) == 3 + 1 + 1  # the third was not sent alone
    web.release()


def test_a_syntax_refused_for_earlier_instances_is_asked_again_when_nothing_is_left(
    stow: StowServer, tmp_path: Path
) -> None:
    (job,) = jobs_for(copies_with_new_uids(find("CT_small.dcm"), tmp_path / "spool", 1))
    web = sender(stow, tmp_path)
    # Earlier the server refused both syntaxes this instance could go in; now it takes them.
    web._refused = {(job.instance.sop_class_uid, "1.2.840.10008.1.2.1")}
    result = web.deliver([job], threading.Event())
    assert [o.verdict for o in result.outcomes] == ["delivered"]
    assert not web._refused
    web.release()


def test_a_server_that_does_not_answer_in_time_holds_the_destination(
    stow: StowServer, tmp_path: Path
) -> None:
    jobs = jobs_for(copies_with_new_uids(find("MR_small.dcm"), tmp_path / "spool", 2))
    stow.delay = 3.0
    web = sender(stow, tmp_path, request_timeout=1.0)
    result = web.deliver(jobs, threading.Event())
    assert [o.verdict for o in result.outcomes] == ["retry", "retry"]
    assert result.hold is not None and "timed out (ReadTimeout" in result.hold, result.hold
    web.release()
