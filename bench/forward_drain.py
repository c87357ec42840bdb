"""The forwarding leg alone: drain a pre-filled queue to DCMTK storescp, against storescu -> storescp.

    python bench/forward_drain.py [--data CT,MR,CR] [--count N]

The end-to-end forward case in bench/run.py is bounded by the node's ingest
(storescu -> node). This one records the inputs straight into a fresh queue
and spool, starts only the forwarder, and times until storescp holds every
file; in the same run, storescu sends the same files to another storescp.
Compare the ratio, not the absolute numbers (shared 2-core machine).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pydicom

from bench.inputs import build_workloads
from bench.measure import send
from bench.receivers import Storescp
from bench.run import OUT
from node.config.model import DestinationConfig, NodeConfig
from node.forward.derived import DerivedFiles
from node.forward.forwarder import Forwarder
from node.ingest.spool import Spool
from node.jobs.jobqueue import SqliteJobQueue
from node.jobs.model import JobKind, JobSpec, ReceivedInstance

TIMEOUT = 300.0


def fill_queue(data_dir: Path, files: list[Path]) -> tuple[SqliteJobQueue, Spool]:
    """Record every file as a received instance with one forward job to 'pacs'."""
    queue = SqliteJobQueue.open(data_dir / "queue.sqlite3")
    spool = Spool(data_dir / "spool")
    spool.prepare()
    for index, source in enumerate(files):
        meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
        target = spool.root / f"{index:06d}.dcm"
        shutil.copyfile(source, target)
        instance = ReceivedInstance(
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            transfer_syntax=str(meta.TransferSyntaxUID),
            calling_ae_title="BENCH",
            called_ae_title="DICOMNODE",
            spool_path=target,
            size=target.stat().st_size,
        )
        queue.record_instance(instance, [JobSpec(JobKind.FORWARD, "pacs")])
    return queue, spool


def open_jobs(queue: SqliteJobQueue) -> int:
    with queue.database.read() as db:
        (count,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
    return int(count)


def no_transcode(*_args: object, **_kwargs: object) -> object:
    raise AssertionError("the benchmark inputs need no transcoding")


def drain(files: list[Path], workdir: Path, max_pdu: int) -> float:
    """Seconds from the forwarder's start until storescp has stored every file."""
    pacs = Storescp(workdir / "pacs")
    pacs.start()
    try:
        queue, spool = fill_queue(workdir / "data", files)
        destination = DestinationConfig("pacs", "ANY-SCP", "127.0.0.1", pacs.port)
        node = NodeConfig(max_pdu=max_pdu)
        derived = DerivedFiles(spool.root, no_transcode)  # type: ignore[arg-type]
        forwarder = Forwarder([destination], node, queue, spool, derived)
        start = time.perf_counter()
        forwarder.start()
        # Polled in the forwarder's own process: a folder walk every few ms would take the
        # CPU and the GIL from it. A job row is gone once storescp has answered (it answers
        # after writing the file) and the completion is committed.
        while open_jobs(queue) and time.perf_counter() - start < TIMEOUT:
            time.sleep(0.002)
        seconds = time.perf_counter() - start
        forwarder.stop()
        queue.close()
        if pacs.stored() != len(files):
            raise RuntimeError(f"storescp holds {pacs.stored()} of {len(files)} files")
        return seconds
    finally:
        pacs.stop()


def direct(files: list[Path], workdir: Path) -> float:
    pacs = Storescp(workdir / "direct")
    pacs.start()
    try:
        start = time.perf_counter()
        for process in send(pacs.port, pacs.ae_title, files, 1):
            process.wait()
        while pacs.stored() < len(files) and time.perf_counter() - start < TIMEOUT:
            time.sleep(0.005)
        return time.perf_counter() - start
    finally:
        pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="CT,MR,CR")
    parser.add_argument("--count", type=int, default=0, help="files per workload (0 = all)")
    parser.add_argument("--runs", type=int, default=3, help="paired runs; medians are shown")
    parser.add_argument("--max-pdu", type=int, default=NodeConfig().max_pdu)
    args = parser.parse_args()
    wanted = args.data.split(",")
    for workload in build_workloads(OUT):
        if workload.name not in wanted:
            continue
        files = list(workload.files[: args.count or None])
        pairs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="forward-drain-") as tmp:
                pairs.append((direct(files, Path(tmp)), drain(files, Path(tmp), args.max_pdu)))
        reference = statistics.median(p[0] for p in pairs)
        node = statistics.median(p[1] for p in pairs)
        ratios = sorted(p[0] / p[1] for p in pairs)
        print(
            f"{workload.name} ({len(files)}): storescu->storescp {len(files) / reference:.1f} inst/s,"
            f" node drain->storescp {len(files) / node:.1f} inst/s,"
            f" ratio {statistics.median(ratios):.2f}x (runs: {', '.join(f'{r:.2f}' for r in ratios)})"
        )


if __name__ == "__main__":
    main()
