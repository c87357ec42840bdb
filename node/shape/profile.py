"""PS3.15 Annex E Table E.1-1, the Basic Profile column, as dicom-anonymizer ships it.

dicom-anonymizer (KitwareMedical) generates its tables from the standard's own XML,
one module per edition; the newest one installed is used, and its name is the
edition this node says it applies.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass

from dicomanonymizer import dicom_anonymization_databases  # type: ignore[import-untyped]

# The table's categories and the action each stands for (PS3.15 E.1.1).
CATEGORIES = {
    "X_TAGS": "X",
    "Z_TAGS": "Z",
    "D_TAGS": "D",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


@dataclass(frozen=True)
class ProfileTable:
    edition: str  # e.g. "2026c"
    actions: dict[int, str]  # tag -> action as the table writes it
    masked: tuple[tuple[int, int, int, int, str], ...]  # (group, element, masks, action)

    def action_for(self, tag: int) -> str | None:
        action = self.actions.get(tag)
        if action is not None:
            return action
        group, element = tag >> 16, tag & 0xFFFF
        for want_group, want_element, group_mask, element_mask, masked in self.masked:
            if group & group_mask == want_group and element & element_mask == want_element:
                return masked
        return None


@functools.cache
def basic_profile_table() -> ProfileTable:
    edition = newest_edition()
    module = importlib.import_module(f"{dicom_anonymization_databases.__name__}.{edition}")
    actions: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in CATEGORIES.items():
        for entry in getattr(module, category):
            if len(entry) == 2:
                actions[entry[0] << 16 | entry[1]] = action
            else:
                masked.append((*entry, action))
    return ProfileTable(edition.removeprefix("dicomfields_"), actions, tuple(masked))


def newest_edition() -> str:
    names = [
        info.name
        for info in pkgutil.iter_modules(dicom_anonymization_databases.__path__)
        if info.name.startswith("dicomfields_")
    ]
    # dicomfields_2023 < dicomfields_2024b < dicomfields_2026c: the names sort by edition.
    return max(names, key=lambda name: name.removeprefix("dicomfields_").ljust(5, " "))
