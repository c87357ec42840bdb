"""The queue settings a Config asks for, and the node's name in a cluster.

node.jobs knows nothing of the config file; this turns [queue] and [node] into its
QueueSettings, for the daemon, its receiver processes and the `queue` and `status`
commands alike.
"""

from __future__ import annotations

import socket

from node.config.model import Config
from node.jobs.backends import QueueSettings


def node_name(config: Config) -> str:
    """[node] name, or the host name: what the shared queue and the metrics call this node."""
    return config.node.name or socket.gethostname()


def queue_settings(config: Config) -> QueueSettings:
    queue = config.queue
    return QueueSettings(
        backend=queue.backend,
        sqlite_path=config.queue_path,
        node=node_name(config),
        dsn_file=queue.dsn_file,
        lease=queue.lease,
        shared_spool=queue.shared_spool,
        pool_size=queue.pool_size,
        keep_finished=config.commitment.enabled,
    )


def metrics_node_label(config: Config) -> str:
    """The `node` label on every metric: set when the node is named or is one of a cluster
    (a single node's metrics keep the names they always had)."""
    if config.node.name or config.queue.backend == "postgresql":
        return node_name(config)
    return ""
