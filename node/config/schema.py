"""A TOML reader driven by the config dataclasses' own fields.

The dataclasses in node.config.model are the one source of truth: a field's
type says how its key is read (bool, whole number, number, string, choice,
path, list, sub-table, array of tables), its default is the key's default, and
`Annotated` markers add bounds (`Between`), value checks (`Check`), readers for
the few keys with a TOML form of their own (`Reader`) and the keys a sub-table
leaves out (`Without`). `iter_settings` lists every key with its default, so a
test can hold config.toml, check-config and the docs to the same fields.

Errors name the file and the dotted key, e.g. `storage[0].duplicates`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(Exception):
    """A configuration problem, located by file and dotted key."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {message}")


MISSING: Any = object()
"""The default of a required key (a dataclass field without a default)."""


class Table:
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

    def raw(self, key: str, default: Any) -> Any:
        """The value as TOML decoded it, for keys with a form of their own."""
        self.used.add(key)
        return self.data.get(key, default)

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is MISSING:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        # bool is an int in Python, but `port = true` is a mistake, not 1.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"must be {kind_name}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(key, f"must be {kind_name}, got {value!r}")
        return value

    def text(self, key: str, default: Any = MISSING, *, allow_empty: bool = False) -> Any:
        value = self._get(key, default, (str,), "a string")
        if isinstance(value, str) and not value and not allow_empty:
            raise self.error(key, "must not be empty")
        return value

    def integer(
        self, key: str, default: Any = MISSING, *, minimum: int = 0, maximum: int | None = None
    ) -> Any:
        value = self._get(key, default, (int,), "a whole number")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and {maximum}" if maximum is not None else ""
            bound = f"between {minimum}{upper}" if maximum is not None else f">= {minimum}"
            raise self.error(key, f"must be {bound}, got {value}")
        return value

    def number(self, key: str, default: Any = MISSING, *, minimum: float = 0.0) -> Any:
        value = self._get(key, default, (int, float), "a number")
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return float(value)

    def flag(self, key: str, default: Any = MISSING) -> Any:
        return self._get(key, default, (bool,), "true or false")

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def text_list(self, key: str, default: Any = MISSING) -> tuple[str, ...]:
        value = self._get(key, default, (list, tuple), "a list of strings")
        for item in value:
            if not isinstance(item, str) or not item:
                raise self.error(key, f"must contain only non-empty strings, got {item!r}")
        return tuple(value)

    def path(self, key: str, default: Any = MISSING) -> Any:
        value = self.text(key, default)
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.file.parent / path).resolve()

    def table(self, key: str) -> Table:
        self.used.add(key)
        return Table(self.file, self.key(key), self.data.get(key, {}))

    def tables(self, key: str) -> Iterator[Table]:
        self.used.add(key)
        items = self.data.get(key, [])
        if not isinstance(items, list):
            raise self.error(key, f"must be an array of tables ([[{key}]]), got a single value")
        for index, item in enumerate(items):
            yield Table(self.file, f"{self.key(key)}[{index}]", item)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(
                unknown[0], "unknown key (check the spelling; see docs/configuration.md)"
            )


# Markers, used as `Annotated[int, Between(1, 65535)]` in the dataclasses.


@dataclass(frozen=True)
class Between:
    """Bounds of a whole number or a number; without it the minimum is 0."""

    minimum: int = 0
    maximum: int | None = None


@dataclass(frozen=True)
class Check:
    """A check of the value once read: check(table, key, value) raises table.error(...)."""

    check: Callable[[Table, str, Any], None]


@dataclass(frozen=True)
class Reader:
    """A key with a TOML form of its own: read(table, key, default) -> value.

    write(value) -> TOML text, for check-config, when the generic form would not read back.
    """

    read: Callable[[Table, str, Any], Any]
    write: Callable[[Any], str] | None = None


@dataclass(frozen=True)
class Without:
    """A sub-table that does not take these keys (e.g. a client's TLS has no listener port)."""

    keys: frozenset[str]


TableCheck = Callable[[Table, Any], None]
"""Checks across the keys of one table, run once it is read: check(table, value)."""


@dataclass(frozen=True)
class Section:
    """A top-level TOML table: `[name]` or, with many, `[[name]]`; attribute is on Config."""

    name: str
    cls: type
    attribute: str
    many: bool = False


@dataclass(frozen=True)
class Setting:
    """One config key: `storage.layout` is read from every [[storage]] table."""

    dotted: str
    section: str
    key: str
    field: dataclasses.Field[Any]
    hint: Any

    @property
    def required(self) -> bool:
        return default_of(self.field) is MISSING


def default_of(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return MISSING


def _split(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """The base type of a hint and its Annotated markers."""
    if get_origin(hint) is Annotated:
        base, *markers = get_args(hint)
        return base, tuple(markers)
    return hint, ()


def _optional(base: Any) -> Any:
    """T for `T | None`, else None."""
    if get_origin(base) in (Union, types.UnionType):
        args = [arg for arg in get_args(base) if arg is not type(None)]
        if len(args) == 1 and len(get_args(base)) == 2:
            return args[0]
    return None


def _marker(markers: tuple[Any, ...], kind: type) -> Any:
    return next((m for m in markers if isinstance(m, kind)), None)


def _table_class(base: Any) -> type | None:
    """C for `tuple[C, ...]` where C is a dataclass: an array of tables."""
    if get_origin(base) is tuple:
        args = get_args(base)
        if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
            return args[0]  # type: ignore[return-value]
    return None


@functools.cache
def config_fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """The fields of a config dataclass with their resolved type hints."""
    hints = get_type_hints(cls, include_extras=True)
    return tuple((item, hints[item.name]) for item in dataclasses.fields(cls))


def writer_of(hint: Any) -> Callable[[Any], str] | None:
    reader = _marker(_split(hint)[1], Reader)
    return reader.write if reader else None


def excluded_keys(hint: Any) -> frozenset[str]:
    without = _marker(_split(hint)[1], Without)
    return without.keys if without else frozenset()


def nested_class(hint: Any) -> tuple[type | None, bool]:
    """The dataclass of a sub-table field, and whether it is an array of tables."""
    base, markers = _split(hint)
    if _marker(markers, Reader) is not None:
        return None, False  # a form of its own, e.g. a ladder of Target
    if dataclasses.is_dataclass(base):
        return base, False  # type: ignore[return-value]
    many = _table_class(base)
    return (many, True) if many is not None else (None, False)


def read_table(
    table: Table,
    cls: type,
    checks: Mapping[type, TableCheck],
    without: frozenset[str] = frozenset(),
) -> Any:
    """Read one table into cls, field by field, then run cls's checks across fields."""
    values = {
        item.name: read_field(table, item, hint, checks)
        for item, hint in config_fields(cls)
        if item.name not in without
    }
    table.finish()
    value = cls(**values)
    check = checks.get(cls)
    if check is not None:
        check(table, value)
    return value


def read_field(
    table: Table, item: dataclasses.Field[Any], hint: Any, checks: Mapping[type, TableCheck]
) -> Any:
    key = item.name
    default = default_of(item)
    base, markers = _split(hint)
    nested, many = nested_class(hint)
    reader = _marker(markers, Reader)
    if reader is not None:
        value = reader.read(table, key, default)
    elif nested is not None and many:
        value = tuple(read_table(t, nested, checks) for t in table.tables(key))
    elif nested is not None:
        value = read_table(table.table(key), nested, checks, excluded_keys(hint))
    else:
        value = _read_plain(table, key, default, _optional(base) or base, markers)
    for marker in markers:
        if isinstance(marker, Check):
            marker.check(table, key, value)
    return value


def _read_plain(table: Table, key: str, default: Any, base: Any, markers: tuple[Any, ...]) -> Any:
    between = _marker(markers, Between) or Between()
    if base is bool:
        return table.flag(key, default)
    if base is int:
        return table.integer(key, default, minimum=between.minimum, maximum=between.maximum)
    if base is float:
        assert between.maximum is None, "a number takes a minimum only"
        return table.number(key, default, minimum=float(between.minimum))
    if base is str:
        return table.text(key, default, allow_empty=default == "")
    if base is Path:
        return table.path(key, default)
    if get_origin(base) is Literal:
        return table.choice(key, default, get_args(base))
    if base == tuple[str, ...]:
        return table.text_list(key, default)
    raise TypeError(f"no reader for {table.key(key)} of type {base!r}")


def iter_settings(sections: tuple[Section, ...]) -> Iterator[Setting]:
    """Every config key, dotted without indices: node.port, storage.layout, security.users.username."""
    for section in sections:
        yield from _settings_of(section.name, section.cls, frozenset())


def _settings_of(prefix: str, cls: type, without: frozenset[str]) -> Iterator[Setting]:
    for item, hint in config_fields(cls):
        if item.name in without:
            continue
        nested, _many = nested_class(hint)
        if nested is not None:
            yield from _settings_of(f"{prefix}.{item.name}", nested, excluded_keys(hint))
        else:
            yield Setting(f"{prefix}.{item.name}", prefix, item.name, item, hint)


def read_setting(setting: Setting, file: Path, *value: Any) -> Any:
    """A key's value as the reader makes it from one TOML value, or from its default if none."""
    table = Table(file, setting.section, {setting.key: value[0]} if value else {})
    return read_field(table, setting.field, setting.hint, {})
