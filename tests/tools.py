"""The external programs the tests drive, and what a missing one means.

On a developer's machine a missing program skips the tests that need it, with the reason.
In CI (`CI=true`), where .ci/run installs every one of them, it is a failure: a skip there
would let a green run hide tests that never ran.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from tests.processes import find_tool

# The Debian packages of the programs the tests use, as .ci/run and the README install them.
DEBIAN_PACKAGES = (
    "dcmtk orthanc orthanc-dicomweb libgdcm-tools dicom3tools postgresql haproxy chromium"
    " chromium-driver prometheus systemd openssl"
)


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def missing_tool(reason: str) -> NoReturn:
    """Skip the calling test for a missing program, or fail it when running in CI."""
    if in_ci():
        pytest.fail(f"{reason}; with CI=true a missing tool is a failure", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of an external program, or skip the test (fail it in CI) when it is missing.

    The tests need the real DCMTK, Orthanc, GDCM and dicom3tools programs.
    """
    found = find_tool(name)
    if found is None:
        missing_tool(f"{name} is not installed (apt-get install {DEBIAN_PACKAGES})")
    return found


def have_tool(name: str) -> bool:
    """Whether an optional cross-check can run: False when the program is missing, so the
    test goes on without that check, but in CI a missing program fails the test."""
    if find_tool(name) is not None:
        return True
    if in_ci():
        missing_tool(f"{name} is not installed (apt-get install {DEBIAN_PACKAGES})")
    return False
