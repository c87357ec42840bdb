"""DICOMweb destinations: a forward worker's STOW-RS client (protocol = "dicomweb").

The forwarder claims a batch of a destination's jobs and hands it here; this
module groups it by study, sends each study's instances in one STOW-RS request
over a kept-alive HTTP connection (httpx), and says per job what came of it.
The queue, retries, holds, dead letters and completions are the forwarder's, the
same as for DIMSE, so both kinds are operated alike.

The transfer syntax of each instance is the first of the destination's
`transfer_syntaxes` (then the received syntax, then Explicit VR Little Endian,
as for DIMSE) that the node can produce, verified, through the same decode-once
cache of derived files, and that the server has not refused: a 415, or a
Failure Reason 0xC122, for one syntax sends the instance again at once in the
next, and the refusal is remembered for that SOP class while the worker runs.

Credentials are read from their files for every request, so a rotated token or
a corrected password is used without a reload. A job counts as delivered only
after the server's answer named it stored: delivery is at least once.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian

import node
from node.config.model import DestinationConfig
from node.dicom.syntaxes import LOSSY_OR_MIXED, resolve_syntax, syntax_name
from node.forward.derived import DerivedFiles, Untranscodable
from node.forward.stow import (
    ACCEPT,
    Answer,
    InstanceOutcome,
    MultipartBody,
    Verdict,
    read_answer,
)
from node.ingest.identity import read_passcode_file
from node.jobs.model import Job
from node.net.tls import client_context

log = logging.getLogger("node.forward")
# httpx logs every request at INFO; the node logs each instance's outcome instead.
logging.getLogger("httpx").setLevel(logging.WARNING)

MAX_RESPONSE = 16 << 20  # bytes of a response body read, at most: a Store response is small
# Errors after which a request on a kept-alive connection is sent once more at once: the
# server closed the idle connection as we reused it (Orthanc keeps them for 1 s).
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class Held(Exception):
    """The destination cannot take anything now: unreachable, 5xx, 401/403, busy."""


@dataclass(frozen=True)
class JobOutcome:
    """What one job came to: the forwarder's verdict names, bytes sent."""

    job: Job
    verdict: str  # "delivered" | "retry" | "refused"
    detail: str
    warning: bool = False
    size: int = 0


@dataclass
class BatchResult:
    outcomes: list[JobOutcome] = field(default_factory=list)
    untried: list[Job] = field(default_factory=list)  # give back: not sent
    hold: str | None = None  # why the destination must wait, if it must


@dataclass
class _Choices:
    """One instance's transfer syntaxes in the order to try them, and what failed so far."""

    syntaxes: list[UID]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _File:
    job: Job
    path: Path
    syntax: UID


def study_of(path: Path) -> str:
    """The Study Instance UID in a spooled file's header ("" if it cannot be read)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except (OSError, InvalidDicomError, ValueError):
        return ""
    return str(header.get("StudyInstanceUID", ""))


def by_study(jobs: Sequence[Job], limit: int) -> list[list[Job]]:
    """Jobs grouped by study in the order claimed, at most `limit` per group."""
    groups: dict[str, list[list[Job]]] = {}
    for job in jobs:
        runs = groups.setdefault(study_of(job.instance.spool_path), [[]])
        if len(runs[-1]) >= limit:
            runs.append([])
        runs[-1].append(job)
    return [run for runs in groups.values() for run in runs]


def syntax_order(destination: DestinationConfig, received: str) -> list[UID]:
    """The destination's syntaxes first, then the received one, then Explicit VR Little
    Endian; a lossy instance as received first (decoding it would only inflate it)."""
    preferred = [resolve_syntax(name) for name in destination.transfer_syntaxes]
    order = list(dict.fromkeys([*preferred, UID(received), ExplicitVRLittleEndian]))
    if UID(received) in LOSSY_OR_MIXED:
        order.remove(UID(received))
        order.insert(0, UID(received))
    return order


class StowSender:
    """One forward worker's STOW-RS client to one destination; its connection is reused."""

    def __init__(self, destination: DestinationConfig, derived: DerivedFiles) -> None:
        self.destination = destination
        self.derived = derived
        self.url = destination.url.rstrip("/") + "/studies"
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        # (SOP Class UID, transfer syntax) the server refused (415 or 0xC122).
        self._refused: set[tuple[str, str]] = set()
        self.last_used = time.monotonic()

    # The worker's side.

    def deliver(self, jobs: Sequence[Job], stopping: threading.Event) -> BatchResult:
        """Send a claimed batch, one request per study; stop at the first hold."""
        result = BatchResult()
        groups = by_study(jobs, self.destination.batch_size)
        for index, group in enumerate(groups):
            if stopping.is_set():
                result.untried = [job for rest in groups[index:] for job in rest]
                break
            outcomes, busy = self._send_study(group)
            result.outcomes += outcomes
            if busy is not None:
                result.untried = [job for rest in groups[index + 1 :] for job in rest]
                result.hold = busy
                break
        return result

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    def release(self) -> None:
        """Close the kept-alive connection (idle, or stopping)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    interrupt = release  # from another thread at stop: a request in progress fails now

    # One study.

    def _send_study(self, jobs: Sequence[Job]) -> tuple[list[JobOutcome], str | None]:
        """Each job's outcome, and why the destination must wait, if it must: no answer
        came, or it is out of resources. Jobs without an answer are retried."""
        done: dict[int, JobOutcome] = {}
        try:
            busy = self._send_each(jobs, done)
        except Held as held:
            busy = str(held)
        retry = [JobOutcome(job, "retry", busy or "") for job in jobs if job.id not in done]
        return [done[job.id] for job in jobs if job.id in done] + retry, busy

    def _send_each(self, jobs: Sequence[Job], done: dict[int, JobOutcome]) -> str | None:
        """Fill `done` per job; resend in the next syntax, or alone, as the answers say."""
        busy: str | None = None
        choices = {
            job.id: _Choices(syntax_order(self.destination, job.instance.transfer_syntax))
            for job in jobs
        }
        alone: list[Job] = []
        pending = list(jobs)
        while pending:
            files = []
            for job in pending:
                chosen = self._file_for(job, choices[job.id])
                if isinstance(chosen, JobOutcome):
                    done[job.id] = chosen
                else:
                    files.append(chosen)
            if not files:
                break
            answer = self._post(files)
            pending = []
            for sent in files:
                outcome = answer.outcomes[sent.job.instance.sop_instance_uid]
                if outcome.verdict is Verdict.NEXT_SYNTAX:
                    self._refused.add((sent.job.instance.sop_class_uid, str(sent.syntax)))
                    choices[sent.job.id].notes.append(
                        f"{syntax_name(sent.syntax)} refused: {outcome.detail}"
                    )
                    pending.append(sent.job)
                elif outcome.verdict is Verdict.ALONE:
                    alone.append(sent.job)
                else:
                    done[sent.job.id] = _job_outcome(sent, outcome, choices[sent.job.id])
                    busy = outcome.detail if outcome.busy else busy
        for job in alone:  # on its own a request never answers ALONE
            busy = self._send_each([job], done) or busy
        return busy

    def _file_for(self, job: Job, choices: _Choices) -> _File | JobOutcome:
        """The instance as a file in the first syntax left that can be made; else refused."""
        instance = job.instance
        if not instance.spool_path.exists():
            detail = f"spool file {instance.spool_path} is missing (removed by hand?)"
            return JobOutcome(job, "refused", detail)
        skipped: list[UID] = []
        while choices.syntaxes:
            syntax = choices.syntaxes.pop(0)
            if (instance.sop_class_uid, str(syntax)) in self._refused:
                skipped.append(syntax)
                if not choices.syntaxes and not choices.notes:
                    # Every syntax was refused for earlier instances, none for this one: the
                    # server may have changed (or an operator retried): ask it again.
                    self._refused -= {(instance.sop_class_uid, str(s)) for s in skipped}
                    choices.syntaxes = skipped
                continue
            try:
                path = self.derived.get(
                    instance.spool_path,
                    instance.transfer_syntax,
                    syntax,
                    allow_lossy=self.destination.allow_lossy,
                )
            except Untranscodable as exc:
                choices.notes.append(str(exc))
                continue
            return _File(job, path, syntax)
        refused = [
            syntax_name(s) for s in skipped if (instance.sop_class_uid, str(s)) in self._refused
        ]
        if refused:
            choices.notes.append(f"refused for earlier instances: {', '.join(refused)}")
        reasons = "; ".join(choices.notes)
        return JobOutcome(job, "refused", f"no transfer syntax left for {self.url}: {reasons}")

    # HTTP.

    def _post(self, files: Sequence[_File]) -> Answer:
        body = MultipartBody([f.path for f in files])
        headers = {
            "Content-Type": body.content_type,
            "Content-Length": str(len(body)),
            "Accept": ACCEPT,
            **self._authorization(),
        }
        uids = [f.job.instance.sop_instance_uid for f in files]
        started = time.monotonic()
        status, content_type, content = self._exchange(body, headers)
        log.debug(
            "STOW-RS of %d instances (%d bytes) to %s: HTTP %d in %.3f s",
            len(files),
            len(body),
            self.url,
            status,
            time.monotonic() - started,
        )
        answer = read_answer(status, content_type, content, uids, self.url)
        if answer.hold is not None:
            raise Held(answer.hold + self._hint(status))
        return answer

    def _exchange(self, body: MultipartBody, headers: dict[str, str]) -> tuple[int, str, bytes]:
        client = self._ensure_client()
        for attempt in (1, 2):
            try:
                with client.stream("POST", self.url, content=body.chunks(), headers=headers) as r:
                    content = _read_limited(r.iter_bytes(), MAX_RESPONSE)
                    self.last_used = time.monotonic()
                    return r.status_code, r.headers.get("content-type", ""), content
            except STALE_CONNECTION as exc:
                if attempt == 1:
                    log.debug("STOW-RS to %s: %s on a kept-alive connection; again", self.url, exc)
                    continue
                raise Held(f"cannot reach {self.url}: {_describe(exc)}") from None
            except httpx.TransportError as exc:
                raise Held(f"cannot reach {self.url}: {_describe(exc)}") from None
        raise AssertionError("unreachable")

    def _ensure_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _new_client(self) -> httpx.Client:
        d = self.destination
        try:  # verification is always on for https: the CA bundle, or the system store
            verify = client_context(d.tls) if d.url.startswith("https://") else True
        except OSError as exc:
            raise Held(f"TLS setup for {self.url}: {exc}") from None
        return httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(d.request_timeout),
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=d.idle_timeout
            ),
            follow_redirects=False,  # a redirected POST would lose its body: fix the url
            trust_env=False,  # no proxy or .netrc from the environment: the config says all
            headers={"User-Agent": f"dicom-node/{node.__version__}"},
        )

    def _authorization(self) -> dict[str, str]:
        """The Authorization header, from the secret files as they are now."""
        auth = self.destination.auth
        try:
            if auth.bearer_token_file is not None:
                token = read_passcode_file(auth.bearer_token_file).decode("utf-8").strip()
                return {"Authorization": f"Bearer {token}"}
            if auth.password_file is not None:
                password = read_passcode_file(auth.password_file)
                pair = auth.username.encode("utf-8") + b":" + password
                return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        except (OSError, ValueError) as exc:
            which = auth.bearer_token_file or auth.password_file
            raise Held(f"cannot read the credentials in {which}: {exc}") from None
        return {}

    def _hint(self, status: int) -> str:
        if status not in (401, 403):
            return ""
        auth = self.destination.auth
        if auth.bearer_token_file is not None:
            return f": check the token in {auth.bearer_token_file}"
        if auth.password_file is not None:
            return f": check user {auth.username!r} and the password in {auth.password_file}"
        return ": the destination has no [destination.auth]"


def _job_outcome(sent: _File, outcome: InstanceOutcome, choices: _Choices) -> JobOutcome:
    verdict = str(outcome.verdict)
    detail = f"STOW-RS {outcome.detail} in {syntax_name(sent.syntax)}"
    if choices.notes and verdict == "delivered":
        detail += f" (fallback: {'; '.join(choices.notes)})"
    size = sent.path.stat().st_size if verdict == "delivered" else 0
    return JobOutcome(sent.job, verdict, detail, outcome.warning, size)


def _read_limited(chunks: Iterator[bytes], limit: int) -> bytes:
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise Held(f"a response body over {limit} bytes")
    return bytes(data)


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__}: {text})"
    return text
