"""Server lifecycle: build the stages from a Config, start them in order, stop them in reverse."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from node.commitment.wiring import commitment_service
from node.config.model import Config
from node.daemon.group_timer import GroupTimer
from node.daemon.lifecycle import ASSOCIATION_DRAIN_TIMEOUT, Lifecycle
from node.daemon.logs import set_level
from node.daemon.metrics import MetricsEndpoint, start_metrics
from node.daemon.queues import metrics_node_label, queue_settings
from node.daemon.receivers import ReceiverProcesses
from node.daemon.webview import NodeWebView
from node.forward.derived import DerivedFiles
from node.forward.forwarder import Forwarder
from node.ingest.intake import Intake, free_space_probe
from node.ingest.pynetdicom_acceptor import PynetdicomSCP
from node.ingest.route import Router
from node.ingest.scp import StorageSCP
from node.ingest.spool import Spool
from node.jobs.backends import open_queue
from node.store.kinds import storage_targets, store_threads
from node.store.targets import duplicate_checker, header_recorder
from node.store.workers import StoreWorkers, transcoding_stager
from node.transcode import TranscodePool
from node.web.server import WebServer, start_web

log = logging.getLogger("node.server")

# How long SIGTERM waits for open associations before aborting them; stays well under
# the unit's TimeoutStopSec so that the jobs and the database are closed cleanly too.


class Node:
    """The running node: queue, spool, storage workers and the SCP."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # [queue] backend: SQLite in data_dir, or PostgreSQL shared by a cluster.
        self.backend = open_queue(queue_settings(config))
        self.queue = self.backend.queue
        self.reports = self.backend.reports
        self.commitments = self.backend.commitments
        self.spool = Spool(config.spool_dir)
        self.targets = storage_targets(config.storage, config.node.data_dir)
        self.router = Router(config)
        # Codec worker processes start on first use: a node that never transcodes has none.
        self.transcode_pool = TranscodePool(config.node.workers or None)
        self.store_workers = StoreWorkers(
            self.queue,
            self.spool,
            self.targets,
            transcoding_stager(self.transcode_pool.transcode),
            threads=store_threads(config.storage),
        )
        self.forwarder = Forwarder(
            config.destinations,
            config.node,
            self.queue,
            self.spool,
            DerivedFiles(config.spool_dir, self.transcode_pool.transcode),
            self.commitments,
            config.commitment.report_timeout,
        )
        self.intake = Intake(
            spool=self.spool,
            queue=self.queue,
            plan_jobs=self.router.plan,
            find_duplicate=duplicate_checker(self.queue, self.targets),
            header_values=header_recorder(self.targets),
            has_headroom=free_space_probe(self._watched_folders(), config.limits.min_free_space),
            max_instance_size=config.limits.max_instance_size,
            on_recorded=self._wake_workers,
        )
        self.scp: StorageSCP | PynetdicomSCP = (
            PynetdicomSCP(config, self.intake)
            if config.node.acceptor == "pynetdicom"
            else StorageSCP(config, self.intake)
        )
        # Storage Commitment: as SCP ([commitment]) and as SCU (destinations' commitment).
        self.commitment = commitment_service(
            config, self.commitments, lambda: self.forwarder.committer
        )
        if isinstance(self.scp, StorageSCP):
            self.scp.commitment = self.commitment
        # node.receivers > 1: more processes accept associations on the same port (opt-in).
        self.receivers = (
            ReceiverProcesses(config, self._wake_workers) if config.node.receivers > 1 else None
        )
        # Series and study groups: dispatched when stable, from the times the queue recorded.
        self.group_timer = GroupTimer(self.queue, self._wake_workers)
        self._stopped = threading.Event()
        self.metrics: MetricsEndpoint | None = None
        # The status page (node.web); `phase` is what it shows as the node's state.
        self.phase = "starting"
        self.web_view = NodeWebView(self)
        self.web: WebServer | None = None

    def _wake_workers(self) -> None:
        self.store_workers.wake.set()
        self.forwarder.wake()
        if self.commitment.reporter is not None:
            self.commitment.reporter.wake.set()

    def _watched_folders(self) -> list[Path]:
        return [self.config.spool_dir, *(t.root for t in self.targets.values())]

    def start(self) -> None:
        self.spool.prepare(recorded=self.queue.spool_paths())
        for target in self.targets.values():
            target.prepare()
        requeued = self.queue.requeue_running()
        if requeued:
            log.info("requeued %d jobs that were in flight when the node last stopped", requeued)
        self.store_workers.start()
        self.forwarder.start()
        if self.commitment.reporter is not None:
            self.commitment.reporter.start()
        self.group_timer.start()
        self.metrics = start_metrics(
            self.config.metrics.address, self.reports, node=metrics_node_label(self.config)
        )
        self.web = start_web(self.config.web, self.web_view)
        if self.receivers is not None:
            # Before our own listener: once the port opens, every receiver shares the load.
            self.receivers.start()
        self.scp.start()

    def reload(self, config: Config) -> None:
        """Apply a reloaded config; associations in progress keep the settings they began with.

        Everything new is built first, then swapped in, so a failure changes nothing.
        """
        targets = storage_targets(config.storage, config.node.data_dir)
        for target in targets.values():
            target.prepare(clean=False)
        router = Router(config)
        folders = [config.spool_dir, *(t.root for t in targets.values())]
        has_headroom = free_space_probe(folders, config.limits.min_free_space)
        forwarder = None
        if config.destinations != self.config.destinations:
            forwarder = Forwarder(
                config.destinations,
                config.node,
                self.queue,
                self.spool,
                self.forwarder.derived,
                self.commitments,
                config.commitment.report_timeout,
            )
        # self.targets is shared with the duplicate checker: update it in place.
        self.targets.clear()
        self.targets.update(targets)
        self.store_workers.targets = dict(targets)
        self.router = router
        self.intake.plan_jobs = router.plan
        self.intake.has_headroom = has_headroom
        self.intake.max_instance_size = config.limits.max_instance_size
        if forwarder is not None:
            self._switch_forwarder(forwarder)
        self.scp.reconfigure(config)
        if self.receivers is not None:
            self.receivers.reload(config)
        set_level(config.node.log_level)
        self.config = config

    def _switch_forwarder(self, forwarder: Forwarder) -> None:
        """New workers for the new destinations; C-STOREs in progress on the old ones finish."""
        self.forwarder.stop()
        self.forwarder = forwarder
        forwarder.start()

    def stop(self) -> None:
        log.info("stopping: no new associations; finishing work in progress")
        if self.receivers is not None:
            self.receivers.stop_accepting()  # they drain while this process drains its own
        self.scp.stop(ASSOCIATION_DRAIN_TIMEOUT)
        if self.receivers is not None:
            self.receivers.join(ASSOCIATION_DRAIN_TIMEOUT)
        self.group_timer.stop()
        self.store_workers.stop()
        self.forwarder.stop()
        if self.commitment.reporter is not None:
            self.commitment.reporter.stop()
        self.transcode_pool.close()
        # Whatever a worker left unfinished is pending again, ready for the next start.
        self.queue.requeue_running()
        if self.metrics is not None:
            self.metrics.close()
        if self.web is not None:
            self.web.close()
        self.backend.close()
        self._stopped.set()

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the config (see node.lifecycle)."""
        Lifecycle(self).run()
