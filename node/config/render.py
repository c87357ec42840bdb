"""The effective config as TOML (`dicom-node check-config`), walked by the same fields
the reader uses, so that what is printed loads back into an equal Config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from node.config.model import SECTIONS, Config
from node.config.schema import config_fields, excluded_keys, nested_class, writer_of
from node.dicom.syntaxes import syntax_name
from node.transcode.targets import Target

_TARGET_OPTIONS = {
    "near": "near_lossless",
    "ratio": "j2k_ratio",
    "psnr": "j2k_psnr",
    "quality": "jpeg_quality",
}


def toml_value(value: Any) -> str:
    """One value as TOML: syntaxes by keyword, ladder rungs with options as inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Target):
        options = {
            option: getattr(value, attribute)
            for option, attribute in _TARGET_OPTIONS.items()
            if getattr(value, attribute) is not None
        }
        if not options:
            return toml_value(value.name)
        pairs = [("syntax", value.name), *options.items()]
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in pairs) + " }"
    if isinstance(value, UID):
        return (
            toml_value(syntax_name(value)) if value.is_transfer_syntax else toml_value(str(value))
        )
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value) + " }"
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def toml_field_value(hint: Any, value: Any) -> str:
    """A field's value as TOML, in the field's own form where it has one."""
    write = writer_of(hint)
    return write(value) if write is not None else toml_value(value)


def _toml_table(
    header: str, name: str, table: Any, without: frozenset[str] = frozenset()
) -> list[str]:
    lines = [header]
    nested: list[str] = []
    cls: type = type(table)
    for item, hint in config_fields(cls):
        if item.name in without:
            continue
        value = getattr(table, item.name)
        sub, many = nested_class(hint)
        dotted = f"{name}.{item.name}"
        if sub is not None and many and not value:
            lines.append(f"{item.name} = []")
        elif sub is not None and many:
            for entry in value:
                nested += ["", *_toml_table(f"[[{dotted}]]", dotted, entry)]
        elif sub is not None:
            nested += ["", *_toml_table(f"[{dotted}]", dotted, value, excluded_keys(hint))]
        elif value is None:
            lines.append(f"# {item.name} is not set")
        else:
            lines.append(f"{item.name} = {toml_field_value(hint, value)}")
    return lines + nested


def format_config(config: Config) -> str:
    """The effective config as TOML: every default filled in, syntaxes by keyword."""
    lines = [f"# effective configuration of {config.source}"]
    for section in SECTIONS:
        value = getattr(config, section.attribute)
        for table in value if section.many else (value,):
            header = f"[[{section.name}]]" if section.many else f"[{section.name}]"
            lines += ["", *_toml_table(header, section.name, table)]
    return "\n".join(lines) + "\n"
