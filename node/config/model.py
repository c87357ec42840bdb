"""The node's configuration: a TOML file parsed once into typed, frozen objects.

Every key is checked here, so the rest of the node never sees a raw dict. An
unknown key or a bad value raises ConfigError naming the file and the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom.uid import UID

from node.dicom.syntaxes import ALL_DECODABLE, LOSSY_OR_MIXED, resolve_syntax
from node.transcode.targets import Target, parse_target

DuplicatePolicy = Literal["overwrite", "keep", "reject"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Acceptor = Literal["native", "pynetdicom"]

DEFAULT_LAYOUT = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


class ConfigError(Exception):
    """A configuration problem, located by file and dotted key."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class TLSConfig:
    """DICOM TLS for the listener or for one destination (PS3.15 B.1)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_bundle: Path | None = None
    require_client_cert: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"
    port: int = 2762
    # Listener only: false leaves node.port closed, so every peer must use TLS.
    plain_listener: bool = True


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("data")
    max_associations: int = 32
    max_pdu: int = 262144
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    workers: int = 0
    # Processes accepting associations on node.port (SO_REUSEPORT); 1 = the main process only.
    receivers: int = 1
    log_level: LogLevel = "INFO"
    # Who speaks the Upper Layer and DIMSE on the listener: our own code, or pynetdicom
    # (the reference implementation, kept so that the two can be compared).
    acceptor: Acceptor = "native"


@dataclass(frozen=True)
class AcceptConfig:
    transfer_syntaxes: tuple[UID, ...] = ALL_DECODABLE


@dataclass(frozen=True)
class UserConfig:
    """One [[security.users]] entry: a username and its scrypt passcode hash."""

    username: str
    # From `dicom-node hash-passcode`; empty: the user is known by name alone.
    passcode_hash: str = ""


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
    address: str = ""


@dataclass(frozen=True)
class StorageConfig:
    name: str
    path: Path
    layout: str = DEFAULT_LAYOUT
    duplicates: DuplicatePolicy = "overwrite"
    transfer_syntax: tuple[Target, ...] = ()
    allow_lossy: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: float = 5.0
    max_delay: float = 600.0
    max_attempts: int = 0


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    ae_title: str
    host: str
    port: int
    transfer_syntaxes: tuple[str, ...] = ()
    max_associations: int = 1
    idle_timeout: float = 10.0
    allow_lossy: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: TLSConfig = field(default_factory=TLSConfig)
    # User Identity sent in the A-ASSOCIATE-RQ: username alone, or with the passcode
    # read from passcode_file when an association is opened (never kept in the config).
    username: str = ""
    passcode_file: Path | None = None


@dataclass(frozen=True)
class RouteConfig:
    match: tuple[tuple[str, str], ...]
    storage: tuple[str, ...]
    destinations: tuple[str, ...]


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

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def queue_path(self) -> Path:
        return self.node.data_dir / "queue.sqlite3"


_MISSING: Any = object()


class _Table:
    """One TOML table being read: typed getters that remember what was used."""

    def __init__(self, file: Path, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(file, name, f"must be a table, got {type(data).__name__}")
        self.file = file
        self.name = name
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(key), message)

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        # bool is an int in Python, but `port = true` is a mistake, not 1.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"must be {kind_name}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(key, f"must be {kind_name}, got {value!r}")
        return value

    def text(self, key: str, default: Any = _MISSING, *, allow_empty: bool = False) -> Any:
        value = self._get(key, default, (str,), "a string")
        if isinstance(value, str) and not value and not allow_empty:
            raise self.error(key, "must not be empty")
        return value

    def integer(
        self, key: str, default: Any = _MISSING, *, minimum: int = 0, maximum: int | None = None
    ) -> Any:
        value = self._get(key, default, (int,), "a whole number")
        if value is None:
            return value
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and {maximum}" if maximum is not None else ""
            bound = f"between {minimum}{upper}" if maximum is not None else f">= {minimum}"
            raise self.error(key, f"must be {bound}, got {value}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, minimum: float = 0.0) -> Any:
        value = self._get(key, default, (int, float), "a number")
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, (bool,), "true or false")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def text_list(self, key: str, default: Any = _MISSING) -> tuple[str, ...]:
        value = self._get(key, default, (list, tuple), "a list of strings")
        for item in value:
            if not isinstance(item, str) or not item:
                raise self.error(key, f"must contain only non-empty strings, got {item!r}")
        return tuple(value)

    def path(self, key: str, default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.file.parent / path).resolve()

    def table(self, key: str) -> _Table:
        self.used.add(key)
        return _Table(self.file, self.key(key), self.data.get(key, {}))

    def tables(self, key: str) -> Iterator[_Table]:
        self.used.add(key)
        items = self.data.get(key, [])
        if not isinstance(items, list):
            raise self.error(key, f"must be an array of tables ([[{key}]]), got a single value")
        for index, item in enumerate(items):
            yield _Table(self.file, f"{self.key(key)}[{index}]", item)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(
                unknown[0], "unknown key (check the spelling; see README 'Configuration')"
            )


def _ae_title(table: _Table, key: str, default: Any = _MISSING) -> str:
    value = table.text(key, default)
    if len(value) > 16 or not value.isprintable() or "\\" in value or value.strip() != value:
        raise table.error(
            key, f"must be 1-16 printable characters without backslash, got {value!r}"
        )
    return value


def _syntax_list(table: _Table, key: str, default: Any) -> tuple[str, ...]:
    names = table.text_list(key, default)
    for name in names:
        try:
            resolve_syntax(name)
        except ValueError as exc:
            raise table.error(key, str(exc)) from None
    return names


def _read_node(table: _Table) -> NodeConfig:
    node = NodeConfig(
        ae_title=_ae_title(table, "ae_title", "DICOMNODE"),
        host=table.text("host", "0.0.0.0"),
        port=table.integer("port", 11112, minimum=1, maximum=65535),
        data_dir=table.path("data_dir", "./data"),
        max_associations=table.integer("max_associations", 32, minimum=1),
        max_pdu=table.integer("max_pdu", 262144, minimum=0, maximum=2**32 - 1),
        acse_timeout=table.number("acse_timeout", 30.0),
        dimse_timeout=table.number("dimse_timeout", 60.0),
        network_timeout=table.number("network_timeout", 60.0),
        workers=table.integer("workers", 0, minimum=0),
        receivers=table.integer("receivers", 1, minimum=1, maximum=64),
        log_level=table.choice("log_level", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        acceptor=table.choice("acceptor", "native", ("native", "pynetdicom")),
    )
    if 0 < node.max_pdu < 4096:
        raise table.error("max_pdu", f"must be 0 (unlimited) or at least 4096, got {node.max_pdu}")
    if node.acceptor == "pynetdicom" and node.receivers > 1:
        raise table.error(
            "receivers", 'must be 1 with acceptor = "pynetdicom" (receiver processes run ours)'
        )
    table.finish()
    return node


def _read_accept(table: _Table) -> AcceptConfig:
    table.used.add("transfer_syntaxes")
    value = table.data.get("transfer_syntaxes", "all")
    table.finish()
    if value == "all":
        return AcceptConfig()
    if not isinstance(value, list) or not value:
        raise table.error("transfer_syntaxes", 'must be "all" or a non-empty list of syntaxes')
    names = _syntax_list(table, "transfer_syntaxes", ())
    return AcceptConfig(transfer_syntaxes=tuple(dict.fromkeys(resolve_syntax(n) for n in names)))


def _read_tls(table: _Table, *, server: bool) -> TLSConfig:
    tls = TLSConfig(
        enabled=table.flag("enabled", False),
        certificate=table.path("certificate", None),
        private_key=table.path("private_key", None),
        ca_bundle=table.path("ca_bundle", None),
        require_client_cert=table.flag("require_client_cert", False) if server else False,
        min_version=table.choice("min_version", "1.2", ("1.2", "1.3")),
        port=table.integer("port", 2762, minimum=1, maximum=65535) if server else 2762,
        plain_listener=table.flag("plain_listener", True) if server else True,
    )
    table.finish()
    if not tls.plain_listener and not tls.enabled:
        raise table.error("plain_listener", "false needs enabled = true: nothing would listen")
    if tls.enabled and server and not (tls.certificate and tls.private_key):
        raise table.error("certificate", "TLS is enabled: certificate and private_key are required")
    if tls.require_client_cert and not tls.ca_bundle:
        raise table.error(
            "ca_bundle", "require_client_cert needs a ca_bundle to check clients against"
        )
    return tls


def _read_security(table: _Table) -> SecurityConfig:
    security = SecurityConfig(
        allowed_calling_aets=table.text_list("allowed_calling_aets", ()),
        require_called_aet=table.flag("require_called_aet", True),
        max_associations_per_calling_aet=table.integer("max_associations_per_calling_aet", 0),
        tls=_read_tls(table.table("tls"), server=True),
        require_user_identity=table.flag("require_user_identity", False),
        users=tuple(_read_user(t) for t in table.tables("users")),
    )
    table.finish()
    _unique_names(table.file, table.key("users"), [u.username for u in security.users], "username")
    if security.require_user_identity and not security.users:
        raise table.error(
            "require_user_identity",
            "true needs at least one [[security.users]] entry: nobody could associate",
        )
    return security


def _read_user(table: _Table) -> UserConfig:
    from node.ingest.identity import PasscodeHashError, parse_passcode_hash

    user = UserConfig(
        username=table.text("username"),
        passcode_hash=table.text("passcode_hash", "", allow_empty=True),
    )
    table.finish()
    if user.passcode_hash:
        try:
            parse_passcode_hash(user.passcode_hash)
        except PasscodeHashError as exc:
            raise table.error("passcode_hash", str(exc)) from None
    return user


def _read_limits(table: _Table) -> LimitsConfig:
    limits = LimitsConfig(
        max_instance_size=table.integer("max_instance_size", 0),
        min_free_space=table.integer("min_free_space", 256 * 1024 * 1024),
    )
    table.finish()
    return limits


def _read_metrics(table: _Table) -> MetricsConfig:
    metrics = MetricsConfig(address=table.text("address", "", allow_empty=True))
    port = metrics.address.rpartition(":")[2]
    if metrics.address and not (port.isdigit() and 0 < int(port) < 65536):
        raise table.error(
            "address", f'must be host:port such as "127.0.0.1:9110", got {metrics.address!r}'
        )
    table.finish()
    return metrics


def _syntax_or_list(table: _Table, key: str) -> tuple[str, ...]:
    value = table.data.get(key)
    if isinstance(value, str):
        table.data[key] = [value]
    return _syntax_list(table, key, ())


def _read_storage(table: _Table) -> StorageConfig:
    storage = StorageConfig(
        name=table.text("name"),
        path=table.path("path"),
        layout=table.text("layout", DEFAULT_LAYOUT),
        duplicates=table.choice("duplicates", "overwrite", ("overwrite", "keep", "reject")),
        transfer_syntax=_ladder(table, "transfer_syntax"),
        allow_lossy=table.flag("allow_lossy", False),
    )
    table.finish()
    _check_layout(table, storage.layout)
    _check_lossy_opt_in(table, storage.transfer_syntax, storage.allow_lossy)
    return storage


def _ladder(table: _Table, key: str) -> tuple[Target, ...]:
    """A fallback ladder: one syntax, or a list of syntaxes and {syntax = ..., near = 2} tables."""
    table.used.add(key)
    value = table.data.get(key, [])
    items = value if isinstance(value, list) else [value]
    try:
        return tuple(parse_target(item) for item in items)
    except ValueError as exc:
        raise table.error(key, str(exc)) from None


def _check_lossy_opt_in(table: _Table, ladder: tuple[Target, ...], allow_lossy: bool) -> None:
    lossy = [rung.name for rung in ladder if rung.lossy]
    if lossy and not allow_lossy:
        raise table.error(
            "transfer_syntax",
            f"{', '.join(lossy)} is lossy: set allow_lossy = true to opt in explicitly",
        )


def _check_layout(table: _Table, layout: str) -> None:
    from node.store.layout import LayoutError, parse_layout

    try:
        parse_layout(layout)
    except LayoutError as exc:
        raise table.error("layout", str(exc)) from None


def _read_retry(table: _Table) -> RetryPolicy:
    retry = RetryPolicy(
        initial_delay=table.number("initial_delay", 5.0),
        max_delay=table.number("max_delay", 600.0),
        max_attempts=table.integer("max_attempts", 0),
    )
    table.finish()
    if retry.max_delay < retry.initial_delay:
        raise table.error("max_delay", "must be >= initial_delay")
    return retry


def _read_destination(table: _Table) -> DestinationConfig:
    destination = DestinationConfig(
        name=table.text("name"),
        ae_title=_ae_title(table, "ae_title"),
        host=table.text("host"),
        port=table.integer("port", minimum=1, maximum=65535),
        transfer_syntaxes=_syntax_or_list(table, "transfer_syntaxes"),
        max_associations=table.integer("max_associations", 1, minimum=1),
        idle_timeout=table.number("idle_timeout", 10.0),
        allow_lossy=table.flag("allow_lossy", False),
        retry=_read_retry(table.table("retry")),
        tls=_read_tls(table.table("tls"), server=False),
        username=table.text("username", "", allow_empty=True),
        passcode_file=table.path("passcode_file", None),
    )
    table.finish()
    _check_destination_identity(table, destination)
    lossy = [n for n in destination.transfer_syntaxes if resolve_syntax(n) in LOSSY_OR_MIXED]
    if lossy and not destination.allow_lossy:
        # Listing a lossy syntax asks the node to encode into it; an instance that arrived
        # lossy is proposed as received anyway, without being listed.
        raise table.error(
            "transfer_syntaxes",
            f"{', '.join(lossy)} is lossy: set allow_lossy = true to opt in explicitly",
        )
    return destination


def _check_destination_identity(table: _Table, destination: DestinationConfig) -> None:
    if len(destination.username.encode("utf-8")) > 65535:
        raise table.error("username", "is longer than a User Identity field (65535 bytes)")
    path = destination.passcode_file
    if path is None:
        return
    if not destination.username:
        raise table.error("passcode_file", "needs a username to go with it")
    from node.ingest.identity import read_passcode_file

    try:
        mode = path.stat().st_mode
        read_passcode_file(path)  # checked now, read again (not kept) for each association
    except OSError as exc:
        raise table.error("passcode_file", f"cannot be read: {exc.strerror} ({path})") from None
    except ValueError as exc:
        raise table.error("passcode_file", f"{path}: {exc}") from None
    if mode & 0o004:
        raise table.error(
            "passcode_file", f"{path} is readable by every user: chmod o-r it (e.g. 0600)"
        )


def _read_route(table: _Table) -> RouteConfig:
    match = table.table("match")
    for key, value in match.data.items():
        if not isinstance(value, str):
            raise match.error(key, f"must be a glob pattern string, got {value!r}")
    match.used.update(match.data)
    route = RouteConfig(
        match=tuple(match.data.items()),
        storage=table.text_list("storage", ()),
        destinations=table.text_list("destinations", ()),
    )
    table.finish()
    if not route.storage and not route.destinations:
        raise table.error("storage", "a route must name at least one storage or destination")
    return route


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


def parse_config(data: dict[str, Any], file: Path) -> Config:
    """Build a Config from already-decoded TOML data (file is used for messages and paths)."""
    root = _Table(file, "", data)
    routing = root.table("routing")
    unrouted = routing.text("unrouted_storage", None)
    routing.finish()
    config = Config(
        source=file,
        node=_read_node(root.table("node")),
        accept=_read_accept(root.table("accept")),
        security=_read_security(root.table("security")),
        limits=_read_limits(root.table("limits")),
        metrics=_read_metrics(root.table("metrics")),
        storage=tuple(_read_storage(t) for t in root.tables("storage")),
        destinations=tuple(_read_destination(t) for t in root.tables("destination")),
        routes=tuple(_read_route(t) for t in root.tables("route")),
        unrouted_storage=unrouted,
    )
    root.finish()
    _unique_names(file, "storage", [s.name for s in config.storage])
    _unique_names(file, "destination", [d.name for d in config.destinations])
    _check_route_targets(file, config)
    return config


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
