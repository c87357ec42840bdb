"""Every config key lives in one place, node/config/model.py's dataclasses, and the
rest is held to it: the docs, the shipped config.toml and `dicom-node check-config`.

The docs' convention: a key is documented where it is the only thing in the first
cell of a table row, in backticks, under a heading that names its TOML section
(`[node]`, `[[storage]]`, `[destination.retry]`, ...); the key is written bare
(`port`) or dotted (`security.tls.port`). The table has a `default` column: a
TOML value in backticks (compared after reading it as the node would: `30` is
`30.0`, `"./data"` is the data_dir), `required`, or words (a dash, "the first
[[storage]]") for a key that is unset by default.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config.model import SECTIONS, load_config, parse_config
from node.config.render import toml_field_value
from node.config.schema import ConfigError, Setting, iter_settings, read_setting

REPO = Path(__file__).resolve().parents[2]
CONFIG_TOML = REPO / "config.toml"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SETTINGS = {setting.dotted: setting for setting in iter_settings(SECTIONS)}
TOP_LEVEL = {section.name for section in SECTIONS}

_SECTION_IN_HEADING = re.compile(r"\[\[?([a-z_][a-z_.]*)\]\]?")
_KEY_CELL = re.compile(r"^`([A-Za-z_][\w.]*)`$")


@dataclass(frozen=True)
class DocumentedKey:
    """One table row documenting a key: where, which key, and its default cell."""

    where: str
    dotted: str  # resolved against the heading, or "?..." when it names no known key
    default: str | None  # None: the table has no default column


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _sections_named(heading: str) -> tuple[str, ...]:
    named = _SECTION_IN_HEADING.findall(heading)
    return tuple(name for name in named if name.split(".")[0] in TOP_LEVEL)


def _resolve(token: str, sections: tuple[str, ...]) -> str:
    if "." in token:
        parent = token.rpartition(".")[0]
        under = any(parent == s or parent.startswith(f"{s}.") for s in sections)
        return token if under else f"?{token} (not under a heading naming its section)"
    candidates = [f"{s}.{token}" for s in sections if f"{s}.{token}" in SETTINGS]
    if len(candidates) == 1:
        return candidates[0]
    return f"?{token} under {', '.join(sections)}"


def documented_keys(path: Path) -> Iterator[DocumentedKey]:
    sections: tuple[str, ...] = ()
    default_column: int | None = None
    in_code = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{number}"
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code:
            continue
        elif line.startswith("#"):
            sections, default_column = _sections_named(line), None
        elif not line.startswith("|") or not sections:
            continue
        elif "default" in [cell.lower() for cell in _cells(line)]:
            default_column = [cell.lower() for cell in _cells(line)].index("default")
        elif "`" in _cells(line)[0]:
            cells = _cells(line)
            key = _KEY_CELL.match(cells[0])
            dotted = _resolve(key[1], sections) if key else f"?{cells[0]} (one key per row)"
            default = cells[default_column] if default_column is not None else None
            yield DocumentedKey(where, dotted, default)


DOCUMENTED = [entry for doc in DOCS for entry in documented_keys(doc)]


def test_every_key_is_documented_exactly_once() -> None:
    counts = Counter(entry.dotted for entry in DOCUMENTED)
    missing = sorted(set(SETTINGS) - set(counts))
    twice = {
        key: [e.where for e in DOCUMENTED if e.dotted == key] for key, n in counts.items() if n > 1
    }
    unknown = [f"{e.where}: {e.dotted}" for e in DOCUMENTED if e.dotted not in SETTINGS]
    assert not missing, f"config keys documented nowhere: {missing}"
    assert not twice, f"config keys documented more than once: {twice}"
    assert not unknown, f"documented keys the config does not have: {unknown}"


def _documented_default_problem(setting: Setting, cell: str | None) -> str | None:
    """Why a default cell disagrees with the field's default, or None if it agrees."""
    if cell is None:
        return "the table has no default column"
    if cell.lower().startswith("required"):
        return None if setting.required else "says required, but the key has a default"
    if setting.required:
        return f"the key is required, the docs say {cell!r}"
    default = read_setting(setting, CONFIG_TOML)
    if not cell.startswith("`"):
        return None if default is None else f"says {cell!r} (unset), the default is {default!r}"
    text = cell.split("`")[1]
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return f"{text!r} is not a TOML value"
    try:
        documented = read_setting(setting, CONFIG_TOML, value)
    except ConfigError as exc:
        return f"{text} is not a valid value: {exc.message}"
    return None if documented == default else f"says {text}, the default is {default!r}"


def test_documented_defaults_are_the_fields_defaults() -> None:
    problems = [
        f"{entry.where}: {entry.dotted}: {problem}"
        for entry in DOCUMENTED
        if entry.dotted in SETTINGS
        and (problem := _documented_default_problem(SETTINGS[entry.dotted], entry.default))
    ]
    assert not problems, "\n".join(problems)


@dataclass(frozen=True)
class ConfigLine:
    """A `key = value` line of config.toml, active or commented out."""

    number: int
    dotted: str
    value: Any
    example: bool  # its comment, or its table header's, says "example" (or "required")


_EXAMPLE = re.compile(r"\b(example|required)\b", re.IGNORECASE)


def _key_value(body: str) -> tuple[str, Any, str] | None:
    """(key, value, comment) of a one-line `key = value  # comment`, or None."""
    try:
        parsed = tomllib.loads(body)
    except tomllib.TOMLDecodeError:
        return None
    if len(parsed) != 1:
        return None
    ((key, value),) = parsed.items()
    for cut in (i for i, char in enumerate(body) if char == "#"):
        try:
            if tomllib.loads(body[:cut]) == parsed:
                return key, value, body[cut:]
        except tomllib.TOMLDecodeError:
            continue
    return key, value, ""


def config_toml_lines(path: Path) -> Iterator[ConfigLine]:
    section, example_table = "", False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        commented = line.lstrip().startswith("#")
        body = line.lstrip().lstrip("#").strip() if commented else line.strip()
        header = re.match(r"^\[\[?([a-z_][a-z_.]*)\]\]?\s*(#.*)?$", body)
        if header:
            section, example_table = header[1], bool(_EXAMPLE.search(header[2] or ""))
            continue
        if not re.match(r"^[a-z_]+\s*=", body):
            continue
        parsed = _key_value(body)
        if parsed is None:
            # Commented prose that happens to look like an assignment is left alone.
            assert commented, f"config.toml:{number}: one key = value per line: {line!r}"
            continue
        key, value, comment = parsed
        example = example_table or bool(_EXAMPLE.search(comment))
        yield ConfigLine(number, f"{section}.{key}", value, example)


CONFIG_LINES = list(config_toml_lines(CONFIG_TOML))


def test_shipped_config_has_only_real_keys_at_their_defaults_or_marked_examples() -> None:
    load_config(CONFIG_TOML)  # it works as shipped
    problems = []
    for line in CONFIG_LINES:
        setting = SETTINGS.get(line.dotted)
        if setting is None:
            problems.append(f"config.toml:{line.number}: {line.dotted} is not a config key")
            continue
        try:
            value = read_setting(setting, CONFIG_TOML, line.value)  # examples must be valid too
        except ConfigError as exc:
            problems.append(f"config.toml:{line.number}: {exc.key}: {exc.message}")
            continue
        default = None if setting.required else read_setting(setting, CONFIG_TOML)
        if not line.example and value != default:
            problems.append(
                f"config.toml:{line.number}: {line.dotted} = {line.value!r} is not the default"
                f" ({default!r}) and is not marked as an example"
            )
    assert not problems, "\n".join(problems)


def test_shipped_config_is_the_commented_reference() -> None:
    """Every key appears in config.toml, set to its default or as a commented example."""
    missing = sorted(set(SETTINGS) - {line.dotted for line in CONFIG_LINES})
    assert not missing, f"keys config.toml does not show: {missing}"


def test_the_checks_above_catch_a_wrong_default_and_an_unknown_key(tmp_path: Path) -> None:
    """The tests above can fail: a stale default and a stale key are both reported."""
    doc = tmp_path / "docs.md"
    doc.write_text(
        "### [node]\n\n| key | default | meaning |\n|---|---|---|\n"
        "| `port` | `104` | stale |\n| `colour` | `1` | gone |\n"
    )
    port, colour = documented_keys(doc)
    assert port.dotted == "node.port"
    assert _documented_default_problem(SETTINGS["node.port"], port.default) == (
        "says 104, the default is 11112"
    )
    assert colour.dotted == "?colour under node"
    shipped = tmp_path / "config.toml"
    shipped.write_text('[node]\nport = 104\n# colour = "blue"  # example\n# [routing]  # example\n')
    lines = list(config_toml_lines(shipped))
    assert [(line.dotted, line.value, line.example) for line in lines] == [
        ("node.port", 104, False),
        ("node.colour", "blue", True),
    ]


def _printed_keys(text: str) -> set[str]:
    """Dotted keys check-config printed, counting `# key is not set` for unset ones."""
    keys: set[str] = set()
    section = ""
    for line in text.splitlines():
        header = re.match(r"^\[\[?([a-z_][a-z_.]*)\]\]?$", line)
        unset = re.match(r"^# ([a-z_]+) is not set$", line)
        assigned = re.match(r"^([a-z_]+) = ", line)
        if header:
            section = header[1]
        elif unset or assigned:
            keys.add(f"{section}.{(unset or assigned)[1]}")  # type: ignore[index]
    return keys


def test_check_config_prints_every_key_and_loads_back(tmp_path: Path) -> None:
    secret = tmp_path / "pacs.passcode"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    source = tmp_path / "config.toml"
    source.write_text(
        f"""
[[security.users]]
username = "alice"
[[storage]]
name = "archive"
path = "./archive"
[[destination]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
username = "node"
passcode_file = "{secret}"
[[route]]
match = {{ Modality = "CT" }}
destinations = ["pacs"]
[[route]]
storage = ["archive"]
[[commitment.requestor]]
ae_title = "CT01"
host = "10.0.0.5"
port = 104
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "node", "check-config", "-c", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    printed = _printed_keys(result.stdout)
    # `users = []` is how an empty array of tables prints; here users has one entry.
    assert printed - set(SETTINGS) == set(), "printed keys the config does not have"
    assert set(SETTINGS) - printed == set(), "keys check-config leaves out"
    # The second route has no match (it catches all): printed as `match = {}`, not `[]`.
    assert parse_config(tomllib.loads(result.stdout), source) == load_config(source)


def test_every_default_prints_as_toml_that_reads_back_to_it() -> None:
    """check-config prints each default; read back, it must be the same value."""
    problems = []
    for setting in SETTINGS.values():
        default = None if setting.required else read_setting(setting, CONFIG_TOML)
        if default is None:
            continue
        printed = toml_field_value(setting.hint, default)
        value = tomllib.loads(f"value = {printed}")["value"]
        if read_setting(setting, CONFIG_TOML, value) != default:
            problems.append(f"{setting.dotted}: {printed} reads back as something else")
    assert not problems, problems
    assert len(SETTINGS) > 50  # the walk found the whole schema, sub-tables included
