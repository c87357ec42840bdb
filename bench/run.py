"""dicom-node benchmark: ingest, ingest + transcode, forwarding and resources, against DCMTK and Orthanc.

    python bench/run.py            # full: 200 CT, 50 MR, 30 CR, 3 runs each (about 8 minutes on 2 cores)
    python bench/run.py --quick    # full inputs, 1 run
    python bench/run.py --smoke    # a few files, one run of each case (< 60 s; CI runs this)

Every receiver is started here on a free loopback port and stopped by its PID.
Numbers are medians over the runs; ratios compare receivers measured in the
same run, which is what matters on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.inputs import Workload, build_multiframe, build_workloads
from bench.latency import Latency, measure_latency, send_timed, wait_delivered
from bench.measure import Sample, timed_transfer
from bench.receivers import (
    Node,
    Orthanc,
    OrthancDicomweb,
    Receiver,
    Storescp,
    StowNode,
    ToolMissing,
)

OUT = Path(__file__).resolve().parent / "out"
JPEGLS = "1.2.840.10008.1.2.4.80"
TRANSCODE_TARGETS = (
    ("JPEG-LS", "JPEGLSLossless"),
    ("HTJ2K", "HTJ2KLossless"),
    ("J2K", "JPEG2000Lossless"),
)
MIB = 1024 * 1024
# The same node with pynetdicom as its acceptor (node.acceptor): how much our own layer gains.
PYNETDICOM_NODE = "node pynetdicom"


@dataclass(frozen=True)
class Setup:
    send_to: Receiver  # storescu talks to this one
    watch: Receiver  # whose stored() says when the data has arrived
    measured: Receiver  # whose process tree is sampled
    receivers: tuple[Receiver, ...]  # all, started in this order


@dataclass(frozen=True)
class Case:
    section: str
    label: str  # receiver and options, as shown in the table
    workload: Workload
    associations: int
    build: Callable[[Path], Setup]
    wait_stored: bool = False
    anchor: str | None = None  # label of the case this one is compared with
    check: Callable[[Setup], str] = lambda setup: ""  # a note when the result is not what we asked

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.section, self.label, self.workload.name, self.associations)

    def anchor_key(self) -> tuple[str, str, str, int] | None:
        if self.anchor is None:
            return None
        return (self.section, self.anchor, self.workload.name, self.associations)


@dataclass
class Result:
    case: Case
    samples: list[Sample] = field(default_factory=list)
    notes: set[str] = field(default_factory=set)

    @property
    def failure(self) -> str:
        failures = [s.failure for s in self.samples if s.failure]
        return failures[0] if failures else ""

    def seconds(self) -> float | None:
        times = [s.stored_seconds for s in self.samples if s.stored_seconds]
        return statistics.median(times) if times and not self.failure else None

    def inst_per_s(self) -> float | None:
        seconds = self.seconds()
        return self.samples[0].instances / seconds if seconds else None

    def mb_per_s(self) -> float | None:
        seconds = self.seconds()
        return self.samples[0].bytes / 1e6 / seconds if seconds else None

    def peak_rss_mb(self) -> float:
        return max(s.peak_rss for s in self.samples) / MIB

    def cpu_per_gb(self) -> float:
        return statistics.median(s.cpu_seconds / (s.bytes / 1e9) for s in self.samples)

    def cpu_ms_per_instance(self) -> float:
        return statistics.median(s.cpu_ms_per_instance for s in self.samples)


def single(receiver_class: type[Receiver], **options: object) -> Callable[[Path], Setup]:
    def build(workdir: Path) -> Setup:
        receiver = receiver_class(workdir, **options)  # type: ignore[call-arg]
        return Setup(receiver, receiver, receiver, (receiver,))

    return build


def forwarding(workdir: Path) -> Setup:
    pacs = Storescp(workdir / "pacs")
    node = Node(workdir / "node", destination_port=pacs.port)
    return Setup(node, pacs, node, (pacs, node))


def transcode_check(syntax_uid: str) -> Callable[[Setup], str]:
    def check(setup: Setup) -> str:
        assert isinstance(setup.send_to, Node)
        found = setup.send_to.stored_syntax()
        if found is not None and found != syntax_uid:
            return f"stored in {found}, not {syntax_uid}: storage transcoding not in place yet"
        return ""

    return check


def ingest_cases(workloads: list[Workload], associations: tuple[int, ...]) -> list[Case]:
    cases = []
    for count in associations:
        for w in workloads:
            cases += [
                Case("ingest", "storescp", w, count, single(Storescp, fork=count > 1)),
                Case("ingest", "Orthanc", w, count, single(Orthanc), anchor="storescp"),
                Case("ingest", "node", w, count, single(Node), anchor="storescp"),
                Case(
                    "ingest",
                    PYNETDICOM_NODE,
                    w,
                    count,
                    single(Node, node_options={"acceptor": "pynetdicom"}),
                    anchor="storescp",
                ),
            ]
    return cases


def transcode_cases(workloads: list[Workload], associations: int) -> list[Case]:
    cases = []
    for w in workloads:
        cases.append(
            Case(
                "transcode",
                "Orthanc JPEG-LS",
                w,
                associations,
                single(Orthanc, ingest_transcoding=JPEGLS),
            )
        )
        for name, keyword in TRANSCODE_TARGETS:
            uid = _syntax_uid(keyword)
            cases.append(
                Case(
                    "transcode",
                    f"node {name}",
                    w,
                    associations,
                    single(Node, storage_syntax=keyword),
                    wait_stored=True,
                    anchor="Orthanc JPEG-LS",
                    check=transcode_check(uid),
                )
            )
    return cases


def forward_cases(workloads: list[Workload]) -> list[Case]:
    cases = []
    for w in workloads:
        cases += [
            Case("forward", "storescu->storescp", w, 1, single(Storescp), wait_stored=True),
            Case(
                "forward",
                "node->storescp",
                w,
                1,
                forwarding,
                wait_stored=True,
                anchor="storescu->storescp",
            ),
        ]
    return cases


def to_orthanc(protocol: str) -> Callable[[Path], Setup]:
    """storescu -> node -> Orthanc (with its DICOMweb plugin), by C-STORE or by STOW-RS."""

    def build(workdir: Path) -> Setup:
        orthanc = OrthancDicomweb(workdir / "orthanc")
        if protocol == "dicomweb":
            node: Node = StowNode(workdir / "node", orthanc.url)
        else:
            node = Node(workdir / "node", destination_port=orthanc.port)
        return Setup(node, orthanc, node, (orthanc, node))

    return build


def stow_cases(workloads: list[Workload]) -> list[Case]:
    """The same files forwarded to the same Orthanc by C-STORE and by STOW-RS, in one run."""
    cases = []
    for w in workloads:
        cases += [
            Case("forward", "node->Orthanc C-STORE", w, 1, to_orthanc("dimse"), wait_stored=True),
            Case(
                "forward",
                "node->Orthanc STOW-RS",
                w,
                1,
                to_orthanc("dicomweb"),
                wait_stored=True,
                anchor="node->Orthanc C-STORE",
            ),
        ]
    return cases


def _syntax_uid(keyword: str) -> str:
    import pydicom.uid

    return str(getattr(pydicom.uid, keyword))


def run_case(case: Case, workdir: Path) -> tuple[Sample, str]:
    setup = case.build(workdir)
    try:
        for receiver in setup.receivers:
            receiver.start()
        sample = timed_transfer(
            pid=setup.measured.pid,
            port=setup.send_to.port,
            ae_title=setup.send_to.ae_title,
            files=case.workload.files,
            associations=case.associations,
            stored=setup.watch.stored,
            alive=lambda: all(r.alive() for r in setup.receivers),
            wait_stored=case.wait_stored,
        )
        note = case.check(setup) if not sample.failure else ""
        return sample, note
    finally:
        for receiver in reversed(setup.receivers):
            receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)


LATENCY_DESTINATIONS = 4


def run_latency(workload: Workload, associations: int, workdir: Path) -> Latency:
    """The node forwarding to 4 storescp: each instance's delay from its acknowledgement to
    its file at each destination."""
    import pydicom

    uids = {
        p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in workload.files
    }
    destinations = [Storescp(workdir / f"pacs{i}") for i in range(LATENCY_DESTINATIONS)]
    node = Node(workdir / "node", destination_ports=tuple(d.port for d in destinations))
    try:
        for receiver in (*destinations, node):
            receiver.start()
        acked = send_timed(node.port, node.ae_title, workload.files, associations)
        wait_delivered(destinations, len(workload.files), timeout=120)
        return measure_latency(acked, uids, destinations)
    finally:
        for receiver in (node, *destinations):
            receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def print_latency(latencies: dict[tuple[str, int], list[Latency]]) -> None:
    print(
        f"\n| forward latency, {LATENCY_DESTINATIONS} storescp | assoc | data | ack->delivered median ms | p99 ms | max ms | not delivered |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for (data, associations), runs in latencies.items():
        median = statistics.median(run.median for run in runs) * 1000
        p99 = statistics.median(run.p99 for run in runs) * 1000
        worst = max(max(run.delays, default=0.0) for run in runs) * 1000
        missing = sum(run.missing for run in runs)
        print(
            f"| node | {associations} | {data} | {median:.0f} | {p99:.0f} | {worst:.0f} | {missing} |"
        )


def codec_rates(workloads: list[Workload], files_per_kind: int) -> dict[tuple[str, str], float]:
    """Our own verified transcoding in one process, one file after another: inst/s."""
    from node.transcode import parse_target, transcode_file

    rates = {}
    with tempfile.TemporaryDirectory(prefix="bench-codec-") as tmp:
        for name, keyword in TRANSCODE_TARGETS:
            ladder = [parse_target(keyword)]
            for w in workloads:
                files = w.files[:files_per_kind]
                transcode_file(files[0], Path(tmp) / "warm-up.dcm", ladder)  # imports, codec init
                start = time.perf_counter()
                for i, src in enumerate(files):
                    transcode_file(src, Path(tmp) / f"{i}.dcm", ladder)
                rates[(name, w.name)] = len(files) / (time.perf_counter() - start)
    return rates


def multiframe_case(out: Path, size: int) -> Case:
    path = build_multiframe(out, size)
    workload = Workload("multi-frame", path.name, (path,))
    return Case("resources", "node", workload, 1, single(Node))


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: dict[tuple, Result], codec: dict[tuple[str, str], float]) -> None:
    print("\n| section | receiver | assoc | data | inst/s | MB/s | ratio | vs | note |")
    print("|---|---|---:|---|---:|---:|---:|---|---|")
    for result in results.values():
        case = result.case
        if case.section == "resources":
            continue
        anchor = results.get(case.anchor_key()) if case.anchor_key() else None
        ratio = _ratio(result, anchor)
        note = "; ".join(sorted(result.notes)) or result.failure
        vs = case.anchor or ""
        if case.section == "transcode" and case.label.startswith("node "):
            rate = codec.get((case.label.removeprefix("node "), case.workload.name))
            own = result.inst_per_s()
            if rate and own:
                vs += f"; {own / rate:.2f}x own 1-process codec ({rate:.1f} inst/s)"
        print(
            f"| {case.section} | {case.label} | {case.associations} | {case.workload.name}"
            f" ({len(case.workload.files)}) | {fmt(result.inst_per_s())} | {fmt(result.mb_per_s())}"
            f" | {ratio} | {vs} | {note} |"
        )
        if case.section == "ingest" and case.label == PYNETDICOM_NODE:
            print(_acceptor_ratio_row(results, result))
    print("\n| node case | assoc | data | peak RSS MB | CPU s/GB | CPU ms/inst |")
    print("|---|---:|---|---:|---:|---:|")
    for result in results.values():
        case = result.case
        # The anchors' ingest rows too: CPU per instance is the figure load disturbs least.
        shown = case.label.startswith("node") or case.section == "ingest"
        if shown and result.samples:
            print(
                f"| {case.section} {case.label} | {case.associations} | {case.workload.name}"
                f" ({_size_mb(case.workload)} MB) | {result.peak_rss_mb():.0f} | {result.cpu_per_gb():.1f}"
                f" | {result.cpu_ms_per_instance():.2f} |"
            )


def _acceptor_ratio_row(results: dict[tuple, Result], pynetdicom: Result) -> str:
    """native/pynetdicom: the same node and the same data, our acceptor against pynetdicom's."""
    case = pynetdicom.case
    native = results.get(("ingest", "node", case.workload.name, case.associations))
    ratio = _ratio(native, pynetdicom) if native else "-"
    # CPU per GB depends less on the machine's load than the rate does.
    cpu = ""
    if native and native.samples and pynetdicom.samples:
        cpu = f"CPU s/GB {native.cpu_per_gb():.1f} vs {pynetdicom.cpu_per_gb():.1f}"
    return (
        f"| ingest | native/pynetdicom | {case.associations} | {case.workload.name}"
        f" ({len(case.workload.files)}) | | | {ratio} | node vs {PYNETDICOM_NODE} | {cpu} |"
    )


def _size_mb(workload: Workload) -> str:
    return f"{workload.total_bytes / 1e6:.0f}"


def _ratio(result: Result, anchor: Result | None) -> str:
    if anchor is None:
        return ""
    ours, theirs = result.inst_per_s(), anchor.inst_per_s()
    if ours and theirs:
        return f"{ours / theirs:.2f}x"
    if ours and anchor.failure:
        return "(anchor failed)"
    return "-"


def print_targets(
    results: dict[tuple, Result],
    codec: dict[tuple[str, str], float],
    latencies: dict[tuple[str, int], list[Latency]] | None = None,
) -> None:
    """The issue's targets, checked against this run's medians."""
    print("\n| target | measured | met |")
    print("|---|---|---|")
    for result in results.values():
        case = result.case
        anchor = results.get(_goal_anchor(case)) if _goal_anchor(case) else None
        goal = _goal(case)
        if goal is None:
            continue
        name, needed = goal
        ours = result.inst_per_s()
        theirs = anchor.inst_per_s() if anchor else None
        if ours is None:
            print(f"| {name} ({case.workload.name}) | {result.failure or 'no result'} | no |")
        elif theirs is None:
            print(
                f"| {name} ({case.workload.name}) | anchor: {anchor.failure if anchor else '-'} | n/a |"
            )
        else:
            ratio = ours / theirs
            print(
                f"| {name} ({case.workload.name}) | {ratio:.2f}x | {'yes' if ratio >= needed else 'NO'} |"
            )
        if case.section == "ingest" and case.label == "node" and case.workload.name == "CT":
            cpu = result.cpu_ms_per_instance() if result.samples else None
            ok = "yes" if cpu is not None and cpu <= 3.0 else "NO"
            print(
                f"| CPU per CT instance <= 3 ms, {case.associations} assoc | {fmt(cpu, 2)} ms | {ok} |"
            )
            storescp = results.get(("ingest", "storescp", "CT", case.associations))
            if case.associations == 1 and storescp and storescp.inst_per_s() and ours:
                ratio = ours / storescp.inst_per_s()  # type: ignore[operator]
                ok = "yes" if ratio >= 0.6 else "no (stretch)"
                print(f"| stretch: CT 1 assoc >= 0.6x storescp | {ratio:.2f}x | {ok} |")
    for (data, associations), runs in (latencies or {}).items():
        p99 = statistics.median(run.p99 for run in runs)
        ok = "yes" if p99 < 2.0 and not any(run.missing for run in runs) else "NO"
        print(
            f"| forward ack->delivered p99 < 2 s, {LATENCY_DESTINATIONS} destinations"
            f" ({data}, {associations} assoc) | {p99 * 1000:.0f} ms | {ok} |"
        )
    for result in results.values():
        if result.case.section == "resources" and result.samples:
            ok = "yes" if result.peak_rss_mb() <= 300 else "NO"
            size = _size_mb(result.case.workload)
            print(
                f"| {size} MB multi-frame, peak RSS <= 300 MB | {result.peak_rss_mb():.0f} MB | {ok} |"
            )


def _goal(case: Case) -> tuple[str, float] | None:
    """Issue 12's targets: every ingest case at least Orthanc's rate; ingest + HTJ2K,
    verified, at least Orthanc's ingest + JPEG-LS."""
    if case.section == "ingest" and case.label == "node":
        return f"ingest {case.associations} assoc >= 1.0x Orthanc", 1.0
    if case.section == "transcode" and case.label == "node HTJ2K":
        return "ingest+HTJ2K >= 1.0x Orthanc JPEG-LS", 1.0
    return None


def _goal_anchor(case: Case) -> tuple[str, str, str, int] | None:
    if case.section == "ingest" and case.label == "node":
        return ("ingest", "Orthanc", case.workload.name, case.associations)
    return case.anchor_key()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="full inputs, one run")
    mode.add_argument("--smoke", action="store_true", help="a few files, one run of each case")
    parser.add_argument(
        "--runs", type=int, help="runs per case (default 3; 1 with --quick/--smoke)"
    )
    parser.add_argument(
        "--sections",
        default="ingest,transcode,forward,resources",
        help="comma-separated subset of: ingest, transcode, forward, resources"
        " (dicomweb: only the STOW-RS against C-STORE cases of forward)",
    )
    parser.add_argument("--data", default="CT,MR,CR", help="comma-separated subset of CT, MR, CR")
    parser.add_argument(
        "--multiframe-mb", type=int, default=1024, help="size of the synthetic multi-frame instance"
    )
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [node] config key for every node started, e.g. --node max_pdu=0 (repeatable)",
    )
    return parser.parse_args(argv)


def node_options(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs, each value read as TOML (so 0 is a number and "x" a string)."""
    import tomllib

    options: dict[str, object] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options.update(tomllib.loads(f"{key.strip()} = {value.strip()}"))
    return options


def plan(args: argparse.Namespace, workloads: list[Workload]) -> list[Case]:
    sections = set(args.sections.split(","))
    chosen = [w for w in workloads if w.name in args.data.split(",")]
    if args.smoke:
        chosen = [w.subset(8) for w in chosen if w.name == "CT"]
    cases: list[Case] = []
    if "ingest" in sections:
        cases += ingest_cases(chosen, (1, 4))
    if "transcode" in sections:
        cases += transcode_cases(chosen, 4)
    if "forward" in sections:
        cases += forward_cases(chosen)
    if "forward" in sections or "dicomweb" in sections:
        cases += stow_cases(chosen)
    if "resources" in sections:
        cases.append(multiframe_case(OUT, (32 if args.smoke else args.multiframe_mb) * MIB))
    return cases


def latency_plan(args: argparse.Namespace, workloads: list[Workload]) -> list[tuple[Workload, int]]:
    """CT on 1 and 4 associations, forwarded to 4 destinations, in the forward section."""
    if "forward" not in args.sections.split(",") or "CT" not in args.data.split(","):
        return []
    ct = next(w for w in workloads if w.name == "CT")
    if args.smoke:
        return [(ct.subset(8), 1)]
    return [(ct, 1), (ct, 4)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Node.extra_options = node_options(args.node)
    runs = args.runs or (1 if args.quick or args.smoke else 3)
    started = time.monotonic()
    print(
        f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min); {os.cpu_count()} CPUs"
    )
    try:
        workloads = build_workloads(OUT)
        cases = plan(args, workloads)
    except ToolMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    results = {case.key: Result(case) for case in cases}
    latencies: dict[tuple[str, int], list[Latency]] = {}
    workroot = Path(tempfile.mkdtemp(prefix="bench-", dir=OUT))
    try:
        for run in range(runs):
            for i, case in enumerate(cases):
                sample, note = run_case(case, workroot / f"{run}-{i}")
                results[case.key].samples.append(sample)
                if note:
                    results[case.key].notes.add(note)
                _progress(run, case, sample)
            for workload, associations in latency_plan(args, workloads):
                latency = run_latency(workload, associations, workroot / f"{run}-latency")
                latencies.setdefault((workload.name, associations), []).append(latency)
                print(
                    f"run {run + 1}: latency   node->{LATENCY_DESTINATIONS}x storescp    x{associations}"
                    f" {workload.name:11} p99 {latency.p99 * 1000:.0f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        codec = (
            codec_rates(
                [
                    w
                    for w in workloads
                    if w.name in {c.workload.name for c in cases if c.section == "transcode"}
                ],
                2 if args.smoke else 10,
            )
            if any(c.section == "transcode" for c in cases)
            else {}
        )
    except ToolMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    print_table(results, codec)
    if latencies:
        print_latency(latencies)
    print_targets(results, codec, latencies)
    load = os.getloadavg()
    print(
        f"\nruns: {runs}; load after: {load[0]:.2f} {load[1]:.2f}; {time.monotonic() - started:.0f} s"
    )
    return 0


def _progress(run: int, case: Case, sample: Sample) -> None:
    seconds = sample.stored_seconds
    rate = f"{sample.instances / seconds:.1f} inst/s" if seconds else sample.failure
    print(
        f"run {run + 1}: {case.section:9} {case.label:20} x{case.associations} {case.workload.name:11} {rate}",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
