"""Scale on paper, then on this machine: a cluster's throughput predicted from one node.

    python bench/scale.py [--count N] [--associations A] [--source FILE]

1. Per instance, on one node (PostgreSQL queue, S3 storage on SeaweedFS, forwarding to
   DCMTK storescp): the node's CPU, PostgreSQL's and SeaweedFS's CPU, and PostgreSQL
   round trips (top-level statements, from pg_stat_statements), commits and WAL fsyncs.
2. Capacities, each as if on a machine like this one of its own: cores / CPU per
   instance for the node, PostgreSQL and SeaweedFS; for PostgreSQL also its durable
   commits/s (16 connections committing one-row inserts) / commits per instance. (A PUT
   probe from Python would measure boto3's signing, not the server; the node's share of
   that is in its own CPU.)
3. The predicted throughput of 1, 2, 4 and 8 nodes, each on a machine like this one with
   PostgreSQL and the object store on their own: min(N x node, PostgreSQL, S3), and the
   first bottleneck as N grows.
4. Measured here: 1 and 2 nodes, sending straight to the nodes (the associations split
   between them), against the prediction for this machine, where every process shares
   the same cores: min(N x node, cores / CPU per instance of everything).

Compare ratios, not absolute numbers: the machine is shared and medians drift.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench.measure import cpu_seconds, send
from tests.corpus import copies_with_new_uids, find
from tests.forward_support import StoreSCP
from tests.postgres import PostgresServer
from tests.processes import free_port
from tests.seaweed import SeaweedS3
from tests.support import NodeProcess, write_config

CORES = os.cpu_count() or 1
DRAIN_TIMEOUT = 600.0
NODE_NAMES = "abcdefgh"


class StatsPostgres(PostgresServer):
    """PostgreSQL with pg_stat_statements, to count the statements the nodes send."""

    def command(self) -> list[str]:
        return [*super().command(), "-c", "shared_preload_libraries=pg_stat_statements"]


class ForkingStoreSCP(StoreSCP):
    own_session = True


@dataclass
class Counters:
    statements: int
    commits: int
    wal_syncs: int


def pg_counters(dsn: str) -> Counters:
    with psycopg.connect(dsn, autocommit=True) as connection:
        (statements,) = connection.execute(
            "SELECT COALESCE(SUM(calls), 0) FROM public.pg_stat_statements"
            " WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%COUNT(*) FROM jobs%'"
        ).fetchone() or (0,)
        (commits,) = connection.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone() or (0,)
        (syncs,) = connection.execute("SELECT wal_sync FROM pg_stat_wal").fetchone() or (0,)
    return Counters(int(statements), int(commits), int(syncs))


def open_jobs(dsn: str) -> dict[str, int]:
    """Jobs not yet deleted, per kind (an instance's rows go with its last job)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT kind, COUNT(*) FROM jobs WHERE state <> 'done' GROUP BY kind"
        ).fetchall()
    return {str(kind): int(count) for kind, count in rows}


@dataclass
class Cluster:
    """The shared parts: PostgreSQL, SeaweedFS with one bucket, storescp as destination."""

    folder: Path
    postgres: StatsPostgres
    s3: SeaweedS3
    bucket: str
    pacs: ForkingStoreSCP

    def single_node(self) -> tuple[NodeProcess, Path]:
        """The default node for reference: SQLite queue, local disk, the same destination."""
        port = free_port()
        root = self.folder / f"run-{time.monotonic_ns()}-sqlite"
        sections: dict[str, object] = {
            "node": {
                "ae_title": "DICOMNODE",
                "host": "127.0.0.1",
                "port": port,
                "data_dir": str(root / "data"),
                "max_pdu": 0,
                "log_level": "WARNING",
            },
            "limits": {"min_free_space": 0},
            "storage": [{"name": "archive", "path": str(root / "archive")}],
            "destination": [
                {
                    "name": "pacs",
                    "ae_title": "STORESCP",
                    "host": "127.0.0.1",
                    "port": self.pacs.port,
                    "max_associations": 2,
                }
            ],
        }
        root.mkdir(parents=True)
        node = NodeProcess(write_config(root / "node.toml", sections), port)
        return node, root / "data" / "queue.sqlite3"

    def nodes(self, count: int, dsn: str) -> list[NodeProcess]:
        dsn_file = self.folder / f"pg-{time.monotonic_ns()}.dsn"
        dsn_file.write_text(dsn)
        dsn_file.chmod(0o600)
        made = []
        for name in NODE_NAMES[:count]:
            port = free_port()
            root = self.folder / f"run-{time.monotonic_ns()}-{name}"
            sections: dict[str, object] = {
                "node": {
                    "ae_title": "DICOMNODE",
                    "host": "127.0.0.1",
                    "port": port,
                    "data_dir": str(root / "data"),
                    "name": name,
                    "max_pdu": 0,
                    "log_level": "WARNING",
                },
                "limits": {"min_free_space": 0},
                "queue": {"backend": "postgresql", "dsn_file": str(dsn_file)},
                "storage": [
                    {
                        "name": "objects",
                        "kind": "s3",
                        "bucket": self.bucket,
                        "endpoint_url": self.s3.endpoint_url,
                        "layout": "{SOPInstanceUID}.dcm",
                        "duplicates": "keep",
                        "credentials_file": str(self.s3.credentials_file),
                    }
                ],
                "destination": [
                    {
                        "name": "pacs",
                        "ae_title": "STORESCP",
                        "host": "127.0.0.1",
                        "port": self.pacs.port,
                        "max_associations": 2,
                    }
                ],
            }
            root.mkdir(parents=True)
            made.append(NodeProcess(write_config(root / "node.toml", sections), port))
        return made


@dataclass
class Run:
    nodes: int
    instances: int
    seconds: float  # from the first C-STORE until every job is done
    ack_seconds: float  # until the last storescu had its last response
    node_cpu: float
    postgres_cpu: float
    s3_cpu: float
    pacs_cpu: float  # storescp, the destination
    sender_cpu: float  # storescu, the modality
    counters: Counters
    drained: dict[str, float] | None = None  # seconds until each kind's jobs were all done

    @property
    def rate(self) -> float:
        return self.instances / self.seconds

    def per_instance(self, value: float) -> float:
        return value / self.instances


def run_cluster(cluster: Cluster, node_count: int, files: list[Path], associations: int) -> Run:
    dsn = cluster.postgres.new_schema()
    nodes = cluster.nodes(node_count, dsn)
    for node in nodes:
        node.start(wait=False)
    try:
        for node in nodes:
            node.wait_ready(120)
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("SELECT public.pg_stat_statements_reset()")
        before = pg_counters(dsn)
        node_cpu = sum(cpu_seconds(n.pid) for n in nodes)
        pg_cpu = cpu_seconds(cluster.postgres.pid)
        s3_cpu = cpu_seconds(cluster.s3.pid)
        pacs_cpu = cpu_seconds(cluster.pacs.pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        senders = []
        for index in range(associations):
            share = files[index::associations]
            node = nodes[index % len(nodes)]
            senders += send(node.port, "DICOMNODE", share, 1)
        for sender in senders:
            _, err = sender.communicate(timeout=DRAIN_TIMEOUT)
            if sender.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
        acked = time.monotonic() - started
        deadline = time.monotonic() + DRAIN_TIMEOUT
        drained: dict[str, float] = {}
        while time.monotonic() < deadline:
            waiting = open_jobs(dsn)
            for kind in ("store", "forward"):
                if kind not in waiting and kind not in drained:
                    drained[kind] = time.monotonic() - started
            if not waiting:
                break
            time.sleep(0.05)
        seconds = time.monotonic() - started
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # the storescu processes
        sender_cpu = (reaped.ru_utime + reaped.ru_stime) - (children.ru_utime + children.ru_stime)
        after = pg_counters(dsn)
        return Run(
            nodes=node_count,
            instances=len(files),
            seconds=seconds,
            ack_seconds=acked,
            node_cpu=sum(cpu_seconds(n.pid) for n in nodes) - node_cpu,
            postgres_cpu=cpu_seconds(cluster.postgres.pid) - pg_cpu,
            s3_cpu=cpu_seconds(cluster.s3.pid) - s3_cpu,
            pacs_cpu=cpu_seconds(cluster.pacs.pid) - pacs_cpu,
            sender_cpu=sender_cpu,
            counters=Counters(
                after.statements - before.statements,
                after.commits - before.commits,
                after.wal_syncs - before.wal_syncs,
            ),
            drained=drained,
        )
    finally:
        for node in nodes:
            node.stop()


def run_sqlite(cluster: Cluster, files: list[Path], associations: int) -> tuple[Run, float]:
    """The single node's default setup on the same files: (run, seconds until acknowledged)."""
    node, queue_file = cluster.single_node()
    node.start()
    try:
        node_cpu = cpu_seconds(node.pid)
        started = time.monotonic()
        senders = send(node.port, "DICOMNODE", files, associations)
        for sender in senders:
            sender.communicate(timeout=DRAIN_TIMEOUT)
        acked = time.monotonic() - started
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            with sqlite3.connect(f"file:{queue_file}?mode=ro", uri=True) as db:
                if db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0:
                    break
            time.sleep(0.05)
        seconds = time.monotonic() - started
        run = Run(
            1,
            len(files),
            seconds,
            acked,
            cpu_seconds(node.pid) - node_cpu,
            0,
            0,
            0,
            0,
            Counters(0, 0, 0),
        )
        return run, acked
    finally:
        node.stop()


def commit_ceiling(postgres: PostgresServer, seconds: float = 4.0, threads: int = 16) -> float:
    """Durable commits/s: `threads` connections each committing one-row inserts."""
    dsn = postgres.new_schema()
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE probe (id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION)")
    done = [0] * threads
    stop = time.monotonic() + seconds

    def commit(index: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as connection:
            while time.monotonic() < stop:
                connection.execute("INSERT INTO probe (at) VALUES (%s)", (time.time(),))
                done[index] += 1

    workers = [threading.Thread(target=commit, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.monotonic() - started)


def predict(node_rate: float, pg_rate: float, s3_rate: float, nodes: int) -> tuple[float, str]:
    limits = [
        (nodes * node_rate, "node CPU"),
        (pg_rate, "PostgreSQL"),
        (s3_rate, "S3 PUTs/s"),
    ]
    return min(limits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="instances per run")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--source", default="693_UNCR.dcm", help="corpus file to copy")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="dicom-node-scale-"))
    postgres = StatsPostgres()
    postgres.start()
    with psycopg.connect(postgres.dsn(), autocommit=True) as connection:
        connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")
    s3 = SeaweedS3(folder / "s3")
    s3.start()
    pacs = ForkingStoreSCP(folder / "pacs", "STORESCP", "--fork", "--ignore")
    pacs.start()
    try:
        bucket = "scale"
        s3.make_bucket(bucket)
        cluster = Cluster(folder, postgres, s3, bucket, pacs)
        source = find(args.source)
        files = copies_with_new_uids(source, folder / "in", args.count)
        size = source.stat().st_size
        print(
            f"{args.count} copies of {source.name} ({size / 1e6:.2f} MB), {args.associations}"
            f" associations, {CORES} cores, load {os.getloadavg()[0]:.1f}"
        )

        # A new bucket's first objects make SeaweedFS grow volumes: warm it up unmeasured.
        warm = copies_with_new_uids(source, folder / "warm", 60)
        run_cluster(cluster, 1, warm, args.associations)
        one = run_cluster(cluster, 1, files, args.associations)
        per = one.per_instance
        node_ms, pg_ms, s3_ms = (
            1000 * per(v) for v in (one.node_cpu, one.postgres_cpu, one.s3_cpu)
        )
        pacs_ms, sender_ms = 1000 * per(one.pacs_cpu), 1000 * per(one.sender_cpu)
        trips, commits, syncs = (
            one.counters.statements / one.instances,
            one.counters.commits / one.instances,
            one.counters.wal_syncs / one.instances,
        )
        print("\nper instance, one node (PostgreSQL queue, S3 storage, forward to storescp):")
        print(f"  node CPU                 {node_ms:7.2f} ms")
        print(f"  PostgreSQL CPU           {pg_ms:7.2f} ms")
        print(f"  SeaweedFS CPU            {s3_ms:7.2f} ms")
        print(f"  storescp CPU             {pacs_ms:7.2f} ms  (the destination)")
        print(f"  storescu CPU             {sender_ms:7.2f} ms  (the modality)")
        print(
            f"  PostgreSQL round trips   {trips:7.2f}  (commits {commits:.2f}, WAL fsyncs {syncs:.2f})"
        )
        print("  S3 requests              1 PUT (If-None-Match: *)")

        commits_per_s = commit_ceiling(postgres)
        node_rate = CORES / per(one.node_cpu)
        pg_cpu_rate = CORES / per(one.postgres_cpu)
        pg_commit_rate = commits_per_s / commits
        pg_rate = min(pg_cpu_rate, pg_commit_rate)
        s3_rate = CORES / per(one.s3_cpu)
        print(
            f"  one node here: {one.rate:.0f} inst/s end to end ({one.seconds:.1f} s;"
            f" all acknowledged after {one.ack_seconds:.1f} s, stored in S3 after"
            f" {(one.drained or {}).get('store', 0):.1f} s, forwarded after"
            f" {(one.drained or {}).get('forward', 0):.1f} s)"
        )
        print(
            f"\ncapacities (each on a {CORES}-core machine of its own: cores / CPU per instance):"
        )
        print(f"  node                     {node_rate:8.0f} inst/s")
        print(
            f"  PostgreSQL               {pg_rate:8.0f} inst/s  (CPU {pg_cpu_rate:.0f};"
            f" durable commits {commits_per_s:.0f}/s / {commits:.2f} per instance ="
            f" {pg_commit_rate:.0f})"
        )
        print(f"  S3 (SeaweedFS) PUTs      {s3_rate:8.0f} inst/s  (1 PUT per instance)")

        print(
            "\npredicted cluster (each node on a machine like this; PostgreSQL, S3 on their own):"
        )
        print("  nodes   inst/s   bound by")
        for count in (1, 2, 4, 8):
            rate, bound = predict(node_rate, pg_rate, s3_rate, count)
            print(f"  {count:5d} {rate:8.0f}   {bound}")
        first = next(
            (
                predict(node_rate, pg_rate, s3_rate, n)[1]
                for n in range(1, 1000)
                if predict(node_rate, pg_rate, s3_rate, n)[1] != "node CPU"
            ),
            "node CPU",
        )
        knee = next(
            (n for n in range(1, 1000) if predict(node_rate, pg_rate, s3_rate, n)[1] != "node CPU"),
            None,
        )
        print(f"  first bottleneck: {first}" + (f" (from {knee} nodes)" if knee else ""))

        sqlite_run, _ = run_sqlite(cluster, files, args.associations)
        print(
            f"\nthe default single node (SQLite, local disk) on the same files: {sqlite_run.rate:.0f}"
            f" inst/s end to end, acknowledged after {sqlite_run.ack_seconds:.1f} s,"
            f" node CPU {1000 * sqlite_run.per_instance(sqlite_run.node_cpu):.2f} ms per instance"
        )
        everything = per(
            one.node_cpu + one.postgres_cpu + one.s3_cpu + one.pacs_cpu + one.sender_cpu
        )
        two = run_cluster(cluster, 2, files[: args.count], args.associations)
        print(f"\nmeasured on this machine (every process shares the {CORES} cores):")
        print(
            "  nodes  measured inst/s  predicted here  node CPU/inst  PG round trips/inst  acked after"
        )
        for run in (one, two):
            here = min(run.nodes * node_rate, CORES / everything)
            print(
                f"  {run.nodes:5d} {run.rate:16.0f} {here:15.0f}"
                f" {1000 * run.per_instance(run.node_cpu):12.2f} ms"
                f" {run.counters.statements / run.instances:18.2f}"
                f" {run.ack_seconds:11.1f} s"
            )
        print(
            f"  (predicted here = min(N x node, {CORES} cores / {1000 * everything:.1f} ms of CPU"
            " per instance for node, PostgreSQL, SeaweedFS, storescp and storescu together))"
        )
    finally:
        pacs.kill()
        s3.kill()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
