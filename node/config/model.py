"""The node's configuration: a TOML file parsed once into typed, frozen objects.

These dataclasses are the one source of truth for every key: its type, its
default and its bounds are the field's (node.config.schema reads TOML by
them). What a field cannot say, checks across keys and values that another
stage parses, is in the `_check_*` functions below.

Every key is checked here, so the rest of the node never sees a raw dict. An
unknown key or a bad value raises ConfigError naming the file and the key.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydicom.uid import UID

from node.config.addresses import is_loopback, parse_web_address
from node.config.schema import (
    Between,
    Check,
    ConfigError,
    Reader,
    Section,
    Table,
    TableCheck,
    Without,
    read_table,
)
from node.dicom.syntaxes import ALL_DECODABLE, LOSSY_OR_MIXED, resolve_syntax
from node.transcode.targets import Target, parse_target

DuplicatePolicy = Literal["overwrite", "keep", "reject"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Acceptor = Literal["native", "pynetdicom"]
QueueBackendName = Literal["sqlite", "postgresql"]
StorageKind = Literal["filesystem", "s3"]
CommitWhen = Literal["received", "stored", "delivered"]
DestinationProtocol = Literal["dimse", "dicomweb"]
# "instance": each instance is sent on its own as it arrives; "series"/"study": per group.
Trigger = Literal["instance", "series", "study"]

DEFAULT_LAYOUT = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


# Value checks and readers for the keys whose type alone does not say enough.


def _check_ae_title(table: Table, key: str, value: str) -> None:
    if len(value) > 16 or not value.isprintable() or "\\" in value or value.strip() != value:
        raise table.error(
            key, f"must be 1-16 printable characters without backslash, got {value!r}"
        )


def _check_layout(table: Table, key: str, layout: str) -> None:
    from node.store.layout import LayoutError, parse_layout

    try:
        parse_layout(layout)
    except LayoutError as exc:
        raise table.error(key, str(exc)) from None


def _check_passcode_hash(table: Table, key: str, value: str) -> None:
    from node.ingest.identity import PasscodeHashError, parse_passcode_hash

    if value:
        try:
            parse_passcode_hash(value)
        except PasscodeHashError as exc:
            raise table.error(key, str(exc)) from None


def _check_metrics_address(table: Table, key: str, address: str) -> None:
    port = address.rpartition(":")[2]
    if address and not (port.isdigit() and 0 < int(port) < 65536):
        raise table.error(key, f'must be host:port such as "127.0.0.1:9110", got {address!r}')


def _check_web_address(table: Table, key: str, address: str) -> None:
    port = address.rpartition(":")[2]
    if address and not (port.isdigit() and 0 < int(port) < 65536):
        raise table.error(key, f'must be host:port such as "127.0.0.1:8080", got {address!r}')


def _read_optional_path(table: Table, key: str, default: Path | None) -> Path | None:
    """A file path, or "" (the default) for none; relative to the config file's folder."""
    return None if table.raw(key, "") == "" else table.path(key)


def _check_syntax_names(table: Table, key: str, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            resolve_syntax(name)
        except ValueError as exc:
            raise table.error(key, str(exc)) from None


def _read_accepted_syntaxes(table: Table, key: str, default: tuple[UID, ...]) -> tuple[UID, ...]:
    """`"all"` (the default: ALL_DECODABLE) or a non-empty list, first = preferred."""
    value = table.raw(key, "all")
    if value == "all":
        return default
    if not isinstance(value, list) or not value:
        raise table.error(key, 'must be "all" or a non-empty list of syntaxes')
    names = table.text_list(key)
    _check_syntax_names(table, key, names)
    return tuple(dict.fromkeys(resolve_syntax(name) for name in names))


def _read_proposed_syntaxes(table: Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """One syntax or a list of them, kept as written."""
    value = table.raw(key, default)
    one = Table(table.file, table.name, {key: [value] if isinstance(value, str) else value})
    names = one.text_list(key)
    _check_syntax_names(table, key, names)
    return names


def _read_ladder(table: Table, key: str, default: tuple[Target, ...]) -> tuple[Target, ...]:
    """A fallback ladder: one syntax, or a list of syntaxes and {syntax = ..., near = 2} tables."""
    value = table.raw(key, [])
    items = value if isinstance(value, list) else [value]
    try:
        return tuple(parse_target(item) for item in items)
    except ValueError as exc:
        raise table.error(key, str(exc)) from None


def _read_match(
    table: Table, key: str, default: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """A table of DICOM keyword = glob pattern; empty matches everything."""
    match = table.table(key)
    for name, value in match.data.items():
        if not isinstance(value, str):
            raise match.error(name, f"must be a glob pattern string, got {value!r}")
    return tuple(match.data.items())


def _write_match(match: tuple[tuple[str, str], ...]) -> str:
    # Always an inline table: `match = []` (an empty tuple's generic form) would not load.
    if not match:
        return "{}"
    return "{ " + ", ".join(f"{key} = {json.dumps(value)}" for key, value in match) + " }"


def _read_coerce_set(
    table: Table, key: str, default: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """A table of DICOM keyword = value template, each checked as coercion will use it."""
    from node.shape.coerce import CoercionError, parse_assignment

    assignments = table.table(key)
    for name, value in assignments.data.items():
        if not isinstance(value, str):
            raise assignments.error(name, f"must be a template string, got {value!r}")
        try:
            parse_assignment(name, value)
        except CoercionError as exc:
            raise assignments.error(name, str(exc)) from None
    return tuple(assignments.data.items())


def _check_selectors(table: Table, key: str, names: tuple[str, ...]) -> None:
    from node.shape.selectors import SelectorError, parse_selector

    for name in names:
        try:
            parse_selector(name)
        except SelectorError as exc:
            raise table.error(key, str(exc)) from None


def _check_deidentify_options(table: Table, key: str, names: tuple[str, ...]) -> None:
    from node.shape.options import OptionError, parse_options

    try:
        parse_options(names)
    except OptionError as exc:
        raise table.error(key, str(exc)) from None


def _check_count_keyword(table: Table, key: str, keyword: str) -> None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword) if keyword else None
    if keyword and (tag is None or dictionary_VR(tag) not in COUNT_VRS):
        raise table.error(
            key,
            f"must be the keyword of a DICOM attribute holding a number of instances"
            f" (VR IS, US or UL), such as NumberOfSeriesRelatedInstances; got {keyword!r}",
        )


COUNT_VRS = frozenset({"IS", "US", "UL", "SL", "SS"})
AETitle = Annotated[str, Check(_check_ae_title)]
Port = Annotated[int, Between(1, 65535)]
# Keys a destination's (client side) TLS does not take: they configure the listener.
LISTENER_ONLY_TLS = frozenset({"require_client_cert", "port", "plain_listener"})


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS for the listener or for one destination (PS3.15 B.1)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_bundle: Path | None = None
    require_client_cert: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"
    port: Port = 2762
    # Listener only: false leaves node.port closed, so every peer must use TLS.
    plain_listener: bool = True


@dataclass(frozen=True)
class NodeConfig:
    ae_title: AETitle = "DICOMNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    data_dir: Path = Path("data")
    max_associations: Annotated[int, Between(1)] = 32
    # 0 = unlimited; otherwise at least 4096 (_check_node).
    max_pdu: Annotated[int, Between(0, 2**32 - 1)] = 262144
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    workers: int = 0
    # Processes accepting associations on node.port (SO_REUSEPORT); 1 = the main process only.
    receivers: Annotated[int, Between(1, 64)] = 1
    log_level: LogLevel = "INFO"
    # Who speaks the Upper Layer and DIMSE on the listener: our own code, or pynetdicom
    # (the reference implementation, kept so that the two can be compared).
    acceptor: Acceptor = "native"
    # The node's name in a cluster (its jobs in a shared queue, its metrics' `node` label);
    # empty: the host name.
    name: str = ""


@dataclass(frozen=True)
class AcceptConfig:
    transfer_syntaxes: Annotated[tuple[UID, ...], Reader(_read_accepted_syntaxes)] = ALL_DECODABLE


@dataclass(frozen=True)
class UserConfig:
    """One [[security.users]] entry: a username and its scrypt passcode hash."""

    username: str
    # From `dicom-node hash-passcode`; empty: the user is known by name alone.
    passcode_hash: Annotated[str, Check(_check_passcode_hash)] = ""


@dataclass(frozen=True)
class SecurityConfig:
    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations_per_calling_aet: int = 0
    tls: TLSConfig = field(default_factory=TLSConfig)
    # User Identity negotiation (PS3.7 D.3.3.7)
    require_user_identity: bool = False
    users: tuple[UserConfig, ...] = ()


@dataclass(frozen=True)
class LimitsConfig:
    max_instance_size: int = 0
    min_free_space: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class MetricsConfig:
    address: Annotated[str, Check(_check_metrics_address)] = ""


@dataclass(frozen=True)
class WebConfig:
    """The status page and its JSON API (node.web)."""

    # "" = off; "127.0.0.1:8080"; a bare ":8080" or "8080" serves on loopback only.
    address: Annotated[str, Check(_check_web_address)] = ""
    # A file holding the bearer token every request must carry; required off loopback.
    token_file: Annotated[Path | None, Reader(_read_optional_path)] = None


@dataclass(frozen=True)
class RoutingConfig:
    """The [routing] table; Config keeps its one key as Config.unrouted_storage."""

    unrouted_storage: str | None = None


@dataclass(frozen=True)
class CoerceConfig:
    """[storage.coerce] and [destination.coerce]: attributes set or deleted in that
    target's copy only (node.shape.coerce)."""

    set: Annotated[tuple[tuple[str, str], ...], Reader(_read_coerce_set, _write_match)] = ()
    delete: Annotated[tuple[str, ...], Check(_check_selectors)] = ()


@dataclass(frozen=True)
class DeidentifyConfig:
    """[storage.deidentify] and [destination.deidentify]: PS3.15 Annex E for that target."""

    profile: Literal["none", "basic"] = "none"
    options: Annotated[tuple[str, ...], Check(_check_deidentify_options)] = ()
    uid_secret_file: Path | None = None
    keep: Annotated[tuple[str, ...], Check(_check_selectors)] = ()


@dataclass(frozen=True)
class StorageConfig:
    name: str
    # Required for kind = "filesystem" (_check_storage); an "s3" target has none.
    path: Path | None = None
    layout: Annotated[str, Check(_check_layout)] = DEFAULT_LAYOUT
    duplicates: DuplicatePolicy = "overwrite"
    transfer_syntax: Annotated[tuple[Target, ...], Reader(_read_ladder)] = ()
    allow_lossy: bool = False
    # kind = "s3": an S3-compatible bucket (node.store.s3); the keys below are its.
    kind: StorageKind = "filesystem"
    bucket: str = ""
    endpoint_url: str = ""
    region: str = "us-east-1"
    credentials_file: Path | None = None
    coerce: CoerceConfig = field(default_factory=CoerceConfig)
    deidentify: DeidentifyConfig = field(default_factory=DeidentifyConfig)


@dataclass(frozen=True)
class QueueConfig:
    """[queue]: SQLite in data_dir (one node), or PostgreSQL shared by a cluster."""

    backend: QueueBackendName = "sqlite"
    dsn_file: Path | None = None
    lease: Annotated[float, Between(3)] = 60.0
    shared_spool: bool = False
    pool_size: Annotated[int, Between(2, 200)] = 10


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: float = 5.0
    max_delay: float = 600.0
    max_attempts: int = 0


@dataclass(frozen=True)
class HTTPAuthConfig:
    """[destination.auth] of a DICOMweb destination: a bearer token, or HTTP basic auth.

    The secrets stay in their files, read again for every request, so a rotated
    token or a corrected password is used without a reload."""

    bearer_token_file: Path | None = None
    username: str = ""
    password_file: Path | None = None


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    # DIMSE only (required there, _check_destination): a DICOMweb destination has a url.
    ae_title: AETitle = ""
    host: str = ""
    port: Port = 104
    transfer_syntaxes: Annotated[tuple[str, ...], Reader(_read_proposed_syntaxes)] = ()
    max_associations: Annotated[int, Between(1)] = 1
    idle_timeout: float = 10.0
    allow_lossy: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: Annotated[TLSConfig, Without(LISTENER_ONLY_TLS)] = field(default_factory=TLSConfig)
    # User Identity sent in the A-ASSOCIATE-RQ: username alone, or with the passcode
    # read from passcode_file when an association is opened (never kept in the config).
    username: str = ""
    passcode_file: Path | None = None
    # protocol = "dicomweb": STOW-RS to {url}/studies, batch_size instances of one study
    # per request (node.forward.dicomweb); the DIMSE keys above are then not used.
    protocol: DestinationProtocol = "dimse"
    url: str = ""
    batch_size: Annotated[int, Between(1, 1000)] = 50
    request_timeout: Annotated[float, Between(1)] = 120.0
    auth: HTTPAuthConfig = field(default_factory=HTTPAuthConfig)
    coerce: CoerceConfig = field(default_factory=CoerceConfig)
    deidentify: DeidentifyConfig = field(default_factory=DeidentifyConfig)
    # Storage Commitment (PS3.4 J): a job is delivered only once the destination's
    # N-EVENT-REPORT says the instance is committed ("delivered means committed").
    commitment: bool = False


@dataclass(frozen=True)
class RequestorConfig:
    """One [[commitment.requestor]]: where a report goes when the requesting association is gone."""

    ae_title: AETitle
    host: str
    port: Port


@dataclass(frozen=True)
class CommitmentConfig:
    """Storage Commitment SCP (PS3.4 J): whether peers may ask, and when an instance is committed."""

    enabled: bool = False
    # received: spooled and recorded; stored: in every storage target; delivered: also
    # delivered to every destination of the instance.
    when: CommitWhen = "stored"
    # Seconds after a request: instances still not there are reported failed (0x0110);
    # also how long a destination's report is waited for before the instances are re-sent.
    report_timeout: Annotated[float, Between(1)] = 3600.0
    requestor: tuple[RequestorConfig, ...] = ()


@dataclass(frozen=True)
class RouteConfig:
    match: Annotated[tuple[tuple[str, str], ...], Reader(_read_match, _write_match)] = ()
    storage: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    # Series and study triggers (_check_route_trigger; docs/routing-and-forwarding.md).
    name: str = ""  # shown by `queue status`; "" = route[N]
    trigger: Trigger = "instance"
    stable_after: float = 0.0  # seconds without a new instance of the group; required
    force_after: float = 0.0  # seconds after the first instance; 0 = never
    expected_instances: int = 0  # a completeness condition: this many instances
    # ... or the number in this attribute of the header (e.g. NumberOfSeriesRelatedInstances)
    expected_instances_from: Annotated[str, Check(_check_count_keyword)] = ""
    required_series: tuple[str, ...] = ()  # study: SeriesDescription globs that must arrive


@dataclass(frozen=True)
class Config:
    source: Path
    node: NodeConfig
    accept: AcceptConfig
    security: SecurityConfig
    limits: LimitsConfig
    metrics: MetricsConfig
    storage: tuple[StorageConfig, ...]
    destinations: tuple[DestinationConfig, ...]
    routes: tuple[RouteConfig, ...]
    unrouted_storage: str | None = None
    queue: QueueConfig = field(default_factory=QueueConfig)
    commitment: CommitmentConfig = field(default_factory=CommitmentConfig)
    web: WebConfig = field(default_factory=WebConfig)

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def queue_path(self) -> Path:
        return self.node.data_dir / "queue.sqlite3"

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig(self.unrouted_storage)


SECTIONS = (
    Section("node", NodeConfig, "node"),
    Section("accept", AcceptConfig, "accept"),
    Section("security", SecurityConfig, "security"),
    Section("limits", LimitsConfig, "limits"),
    Section("metrics", MetricsConfig, "metrics"),
    Section("web", WebConfig, "web"),
    Section("routing", RoutingConfig, "routing"),
    Section("storage", StorageConfig, "storage", many=True),
    Section("destination", DestinationConfig, "destinations", many=True),
    Section("route", RouteConfig, "routes", many=True),
    Section("queue", QueueConfig, "queue"),
    Section("commitment", CommitmentConfig, "commitment"),
)
"""The top-level TOML tables, in the order check-config prints them."""


# Checks across the keys of one table, run once the table is read.


def _check_node(table: Table, node: NodeConfig) -> None:
    if 0 < node.max_pdu < 4096:
        raise table.error("max_pdu", f"must be 0 (unlimited) or at least 4096, got {node.max_pdu}")
    if node.acceptor == "pynetdicom" and node.receivers > 1:
        raise table.error(
            "receivers", 'must be 1 with acceptor = "pynetdicom" (receiver processes run ours)'
        )


def _check_tls(table: Table, tls: TLSConfig) -> None:
    # A destination's TLS leaves the listener-only keys out (Without): it is a client.
    listener = "port" in table.used
    if not tls.plain_listener and not tls.enabled:
        raise table.error("plain_listener", "false needs enabled = true: nothing would listen")
    if tls.enabled and listener and not (tls.certificate and tls.private_key):
        raise table.error("certificate", "TLS is enabled: certificate and private_key are required")
    if tls.require_client_cert and not tls.ca_bundle:
        raise table.error(
            "ca_bundle", "require_client_cert needs a ca_bundle to check clients against"
        )


def _check_security(table: Table, security: SecurityConfig) -> None:
    _unique_names(table.file, table.key("users"), [u.username for u in security.users], "username")
    if security.require_user_identity and not security.users:
        raise table.error(
            "require_user_identity",
            "true needs at least one [[security.users]] entry: nobody could associate",
        )


def _check_storage(table: Table, storage: StorageConfig) -> None:
    if storage.kind == "filesystem" and storage.path is None:
        raise table.error("path", 'is required (the storage root) unless kind = "s3"')
    if storage.kind == "s3":
        _check_s3_storage(table, storage)
    lossy = [rung.name for rung in storage.transfer_syntax if rung.lossy]
    if lossy and not storage.allow_lossy:
        raise table.error(
            "transfer_syntax",
            f"{', '.join(lossy)} is lossy: set allow_lossy = true to opt in explicitly",
        )


def _check_s3_storage(table: Table, storage: StorageConfig) -> None:
    if not storage.bucket:
        raise table.error("bucket", 'is required with kind = "s3"')
    if storage.path is not None:
        raise table.error("path", "an s3 target has no path: objects go to bucket and layout")
    if storage.credentials_file is not None:
        _check_private_file(table, "credentials_file", storage.credentials_file)


def _check_private_file(table: Table, key: str, path: Path) -> None:
    """A file holding a secret (a DSN, S3 keys): readable by us, not by every user."""
    try:
        mode = path.stat().st_mode
        path.read_bytes()
    except OSError as exc:
        raise table.error(key, f"cannot be read: {exc.strerror} ({path})") from None
    if mode & 0o004:
        raise table.error(key, f"{path} is readable by every user: chmod o-r it (e.g. 0600)")


def _check_queue(table: Table, queue: QueueConfig) -> None:
    if queue.backend != "postgresql":
        return
    if queue.dsn_file is None:
        raise table.error("dsn_file", 'is required with backend = "postgresql"')
    _check_private_file(table, "dsn_file", queue.dsn_file)


def _check_retry(table: Table, retry: RetryPolicy) -> None:
    if retry.max_delay < retry.initial_delay:
        raise table.error("max_delay", "must be >= initial_delay")


def _check_destination(table: Table, destination: DestinationConfig) -> None:
    _check_destination_view(table, destination)
    if destination.protocol == "dicomweb":
        _check_dicomweb_destination(table, destination)
    else:
        _check_dimse_destination(table, destination)
    _check_destination_identity(table, destination)
    lossy = [n for n in destination.transfer_syntaxes if resolve_syntax(n) in LOSSY_OR_MIXED]
    if lossy and not destination.allow_lossy:
        # Listing a lossy syntax asks the node to encode into it; an instance that arrived
        # lossy is proposed as received anyway, without being listed.
        raise table.error(
            "transfer_syntaxes",
            f"{', '.join(lossy)} is lossy: set allow_lossy = true to opt in explicitly",
        )


def _check_dimse_destination(table: Table, destination: DestinationConfig) -> None:
    for key in ("ae_title", "host"):
        if not getattr(destination, key):
            raise table.error(key, "is required")
    if destination.url:
        raise table.error("url", 'is for protocol = "dicomweb" destinations only')
    if destination.auth != HTTPAuthConfig():
        raise table.error("auth", 'is for protocol = "dicomweb" destinations only')


def _check_dicomweb_destination(table: Table, destination: DestinationConfig) -> None:
    # Values, not presence: check-config prints every key, and what it prints must load.
    for key in ("ae_title", "host", "username", "passcode_file", "commitment"):
        if getattr(destination, key):
            raise table.error(key, 'is for DIMSE destinations; a "dicomweb" one has a url')
    url = destination.url
    if not url.startswith(("http://", "https://")) or not url.split("/", 3)[2]:
        raise table.error(
            "url", f'must be the DICOMweb service root, "http://…" or "https://…", got {url!r}'
        )
    if destination.tls.enabled and url.startswith("http://"):
        raise table.error("tls.enabled", "an http:// url has no TLS: use https:// instead")
    _check_http_auth(table, destination.auth)


def _check_http_auth(table: Table, auth: HTTPAuthConfig) -> None:
    if auth.bearer_token_file is not None and (auth.username or auth.password_file):
        raise table.error("auth", "give bearer_token_file or username + password_file, not both")
    if bool(auth.username) != (auth.password_file is not None):
        raise table.error("auth.password_file", "basic auth needs both username and password_file")
    for key, path in (
        ("bearer_token_file", auth.bearer_token_file),
        ("password_file", auth.password_file),
    ):
        if path is not None:
            _check_secret_file(table, f"auth.{key}", path)


def _check_secret_file(table: Table, key: str, path: Path) -> None:
    """Checked once at load; read again (never kept) for each use."""
    from node.ingest.identity import read_passcode_file

    try:
        mode = path.stat().st_mode
        read_passcode_file(path)
    except OSError as exc:
        raise table.error(key, f"cannot be read: {exc.strerror} ({path})") from None
    except ValueError as exc:
        raise table.error(key, f"{path}: {exc}") from None
    if mode & 0o004:
        raise table.error(key, f"{path} is readable by every user: chmod o-r it (e.g. 0600)")


def _check_destination_identity(table: Table, destination: DestinationConfig) -> None:
    if len(destination.username.encode("utf-8")) > 65535:
        raise table.error("username", "is longer than a User Identity field (65535 bytes)")
    path = destination.passcode_file
    if path is None:
        return
    if not destination.username:
        raise table.error("passcode_file", "needs a username to go with it")
    _check_secret_file(table, "passcode_file", path)


def _check_destination_view(table: Table, destination: DestinationConfig) -> None:
    deidentify = destination.deidentify
    if (
        destination.commitment
        and deidentify.profile != "none"
        and "retain-uids" not in deidentify.options
    ):
        raise table.error(
            "commitment",
            "cannot go with [destination.deidentify]: the commitment would name SOP"
            " Instance UIDs the destination never received (add retain-uids, or drop one)",
        )


def _check_deidentify(table: Table, deidentify: DeidentifyConfig) -> None:
    if deidentify.profile == "none":
        for key in ("options", "uid_secret_file", "keep"):
            if getattr(deidentify, key):
                raise table.error(key, 'needs profile = "basic"')
        return
    path = deidentify.uid_secret_file
    if path is None:
        if "retain-uids" not in deidentify.options:
            raise table.error("uid_secret_file", "is required: UIDs are remapped under this key")
        return
    from node.shape.build import SecretError, read_uid_secret

    try:
        mode = path.stat().st_mode
        read_uid_secret(path)
    except OSError as exc:
        raise table.error("uid_secret_file", f"cannot be read: {exc.strerror} ({path})") from None
    except SecretError as exc:
        raise table.error("uid_secret_file", str(exc)) from None
    if mode & 0o004:
        raise table.error(
            "uid_secret_file", f"{path} is readable by every user: chmod o-r it (e.g. 0600)"
        )


def _check_web(table: Table, web: WebConfig) -> None:
    if web.address and not web.token_file and not is_loopback(parse_web_address(web.address)[0]):
        raise table.error(
            "token_file",
            f"is required when address ({web.address!r}) is not on loopback: anyone on the"
            " network could read the page (or use 127.0.0.1)",
        )
    if web.token_file is not None:
        _check_token_file(table, "token_file", web.token_file)


def _check_token_file(table: Table, key: str, path: Path) -> None:
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise table.error(key, f"cannot be read: {exc.strerror} ({path})") from None
    if not text:
        raise table.error(key, f"{path} is empty")
    if mode & 0o004:
        raise table.error(key, f"{path} is readable by every user: chmod o-r it (e.g. 0600)")


def _check_route(table: Table, route: RouteConfig) -> None:
    if not route.storage and not route.destinations:
        raise table.error("storage", "a route must name at least one storage or destination")
    _check_route_trigger(table, route)


# The keys that only mean something with trigger = "series" or "study".
GROUP_KEYS = (
    "stable_after",
    "force_after",
    "expected_instances",
    "expected_instances_from",
    "required_series",
)


def _check_route_trigger(table: Table, route: RouteConfig) -> None:
    if route.trigger == "instance":
        for key in GROUP_KEYS:
            if getattr(route, key):  # set (check-config prints the defaults: those are fine)
                raise table.error(key, 'applies only with trigger = "series" or "study"')
        return
    if route.stable_after <= 0:
        raise table.error(
            "stable_after",
            f'trigger = "{route.trigger}" needs stable_after: the seconds without a new'
            f" instance of the {route.trigger} after which it is sent (e.g. 30)",
        )
    if route.force_after and route.force_after < route.stable_after:
        raise table.error(
            "force_after",
            f"must be >= stable_after ({route.stable_after:g}), or 0 for never;"
            f" got {route.force_after:g}",
        )
    if route.expected_instances and route.expected_instances_from:
        raise table.error(
            "expected_instances_from", "set expected_instances or expected_instances_from, not both"
        )
    if route.required_series and route.trigger != "study":
        raise table.error("required_series", 'applies only with trigger = "study"')
    conditions = [
        key
        for key in ("expected_instances", "expected_instances_from", "required_series")
        if getattr(route, key)
    ]
    if conditions and not route.force_after:
        raise table.error(
            "force_after",
            f"{conditions[0]} needs force_after: a group whose condition never holds would"
            " otherwise wait for ever",
        )


CHECKS: Mapping[type, TableCheck] = {
    NodeConfig: _check_node,
    TLSConfig: _check_tls,
    SecurityConfig: _check_security,
    StorageConfig: _check_storage,
    QueueConfig: _check_queue,
    RetryPolicy: _check_retry,
    DestinationConfig: _check_destination,
    RouteConfig: _check_route,
    DeidentifyConfig: _check_deidentify,
    WebConfig: _check_web,
}


def _unique_names(file: Path, section: str, names: list[str], key: str = "name") -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            raise ConfigError(file, f"{section}[{index}].{key}", f"duplicate {key} {name!r}")
        seen.add(name)


def _check_route_targets(file: Path, config: Config) -> None:
    storages = {s.name for s in config.storage}
    destinations = {d.name for d in config.destinations}
    for index, route in enumerate(config.routes):
        for name in route.storage:
            if name not in storages:
                raise ConfigError(file, f"route[{index}].storage", f"no [[storage]] named {name!r}")
        for name in route.destinations:
            if name not in destinations:
                raise ConfigError(
                    file, f"route[{index}].destinations", f"no [[destination]] named {name!r}"
                )
    if config.unrouted_storage and config.unrouted_storage not in storages:
        raise ConfigError(
            file, "routing.unrouted_storage", f"no [[storage]] named {config.unrouted_storage!r}"
        )


def _read_section(root: Table, section: Section) -> Any:
    if section.many:
        return tuple(read_table(t, section.cls, CHECKS) for t in root.tables(section.name))
    return read_table(root.table(section.name), section.cls, CHECKS)


def parse_config(data: dict[str, Any], file: Path) -> Config:
    """Build a Config from already-decoded TOML data (file is used for messages and paths)."""
    root = Table(file, "", data)
    values = {section.attribute: _read_section(root, section) for section in SECTIONS}
    root.finish()
    routing: RoutingConfig = values.pop("routing")
    config = Config(source=file, unrouted_storage=routing.unrouted_storage, **values)
    _unique_names(file, "storage", [s.name for s in config.storage])
    _unique_names(file, "destination", [d.name for d in config.destinations])
    _check_route_targets(file, config)
    _check_commitment_acceptor(file, config)
    return config


def _check_commitment_acceptor(file: Path, config: Config) -> None:
    """Storage Commitment runs on our own acceptor, in the main process only."""
    uses = [
        ("commitment.enabled", config.commitment.enabled),
        *(
            (f"destination[{index}].commitment", d.commitment)
            for index, d in enumerate(config.destinations)
        ),
    ]
    key = next((key for key, used in uses if used), None)
    if key is None:
        return
    if config.node.acceptor != "native":
        raise ConfigError(
            file, key, 'needs node.acceptor = "native" (the pynetdicom acceptor has no N-ACTION)'
        )
    if config.node.receivers > 1:
        raise ConfigError(
            file,
            key,
            "needs node.receivers = 1 (reports are sent and received by the main process)",
        )


def load_config(path: Path | str) -> Config:
    """Read and validate a config file. Raises ConfigError with file and key."""
    file = Path(path).expanduser().resolve()
    try:
        with file.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from None
    return parse_config(data, file)
