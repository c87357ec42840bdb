"""node.receivers = 2: two processes accept associations on one port, and both store durably."""

from __future__ import annotations

import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import StartNode
from tests.corpus import CT_SMALL, copies_with_new_uids
from tests.support import NodeProcess, storescu, wait_until

# The kernel picks the process for each connection by a hash: enough rounds that two
# processes all but surely both serve some, without a test that waits for luck.
MAX_ROUNDS = 12
ASSOCIATION_LINE = re.compile(r"node\.scp\[(\d+)\]: association released")


def children_of(pid: int) -> set[int]:
    """Live child processes of pid, from /proc (receivers and multiprocessing's resource tracker)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def receivers_of(pid: int) -> set[int]:
    """The receiver processes: spawned by multiprocessing to run spawn_main."""
    return {
        child
        for child in children_of(pid)
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    }


def gone(pids: set[int]) -> bool:
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


def serving_pids(node: NodeProcess) -> set[int]:
    return {int(pid) for pid in ASSOCIATION_LINE.findall(node.log())}


def send_in_pairs(port: int, folder: Path, until: set[int], node: NodeProcess) -> list[Path]:
    """Rounds of 2 parallel storescu (3 instances each) until every pid in `until` served one."""
    sent: list[Path] = []
    with ThreadPoolExecutor(2) as pool:
        for round_number in range(MAX_ROUNDS):
            batches = [
                copies_with_new_uids(CT_SMALL, folder / f"{round_number}-{i}", 3) for i in range(2)
            ]
            for result in pool.map(lambda files: storescu(port, files), batches):
                assert result.returncode == 0, result.stderr
            sent += [path for batch in batches for path in batch]
            if until <= serving_pids(node):
                break
    return sent


def assert_all_stored(archive: Path, sent: list[Path]) -> None:
    expected = {path.stem for path in sent}

    def stored() -> set[str]:
        return {path.stem for path in archive.rglob("*.dcm")}

    assert wait_until(lambda: expected <= stored(), timeout=60), expected - stored()


def start_two_receivers(start_node: StartNode) -> tuple[NodeProcess, int]:
    """The node with node.receivers = 2, once both receivers are serving."""
    node = start_node(receivers=2)
    port = node.port
    assert wait_until(lambda: "ready (" in node.log(), timeout=60), node.log()
    return node, port


def test_two_receiver_processes_share_the_port(start_node: StartNode, tmp_path: Path) -> None:
    node, port = start_two_receivers(start_node)
    try:
        children = children_of(node.pid)
        (child,) = receivers_of(node.pid)
        sent = send_in_pairs(port, tmp_path / "sent", {node.pid, child}, node)
        assert serving_pids(node) == {node.pid, child}, node.log()
        assert_all_stored(tmp_path / "archive", sent)
    finally:
        assert node.stop() == 0, node.log()
    assert wait_until(lambda: gone(children), timeout=10), "child processes outlived the node"
    assert "exited with code" not in node.log()


def test_a_killed_receiver_is_restarted(start_node: StartNode, tmp_path: Path) -> None:
    node, port = start_two_receivers(start_node)
    try:
        (child,) = receivers_of(node.pid)
        os.kill(child, signal.SIGKILL)
        assert wait_until(lambda: "restarted as pid" in node.log(), timeout=60), node.log()
        (replacement,) = receivers_of(node.pid)
        assert replacement != child
        sent = send_in_pairs(port, tmp_path / "sent", {replacement}, node)
        assert replacement in serving_pids(node), node.log()
        assert_all_stored(tmp_path / "archive", sent)
        children = children_of(node.pid)
    finally:
        assert node.stop() == 0, node.log()
    assert wait_until(lambda: gone(children), timeout=10), "child processes outlived the node"
