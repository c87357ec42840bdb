"""Acknowledged instances reach a destination promptly, even one that serves a single
association at a time (DCMTK storescp without --fork) while the node may open several."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import StartNode
from tests.corpus import CT_SMALL, copies_with_new_uids
from tests.forward_support import StoreSCP
from tests.support import storescu, wait_until

# The destination's idle_timeout: the old forwarder held instances behind it.
IDLE_TIMEOUT = 10.0


def test_two_workers_against_a_one_association_peer_deliver_without_waiting_for_idle(
    start_node: StartNode, tmp_path: Path
) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:

        def one_pacs(sections: dict[str, object]) -> None:
            sections["destination"] = [
                {
                    "name": "pacs",
                    "ae_title": pacs.ae_title,
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "max_associations": 2,
                    "idle_timeout": IDLE_TIMEOUT,
                }
            ]

        node = start_node(one_pacs)
        delays = []
        for burst in range(3):
            files = copies_with_new_uids(CT_SMALL, tmp_path / f"burst{burst}", 40)
            sent = storescu(node.port, files)
            assert sent.returncode == 0, sent.stderr
            acknowledged = time.monotonic()
            expected = 40 * (burst + 1)
            assert wait_until(lambda n=expected: pacs.count() >= n, timeout=60), node.log()
            delays.append(time.monotonic() - acknowledged)
        # Before the fix a second worker claimed a batch, then waited for its association
        # until the first worker had been idle for idle_timeout: 10-12 s on every burst.
        assert max(delays) < IDLE_TIMEOUT / 2, (delays, node.log()[-3000:])
        assert pacs.count() == 120
    finally:
        pacs.stop()
