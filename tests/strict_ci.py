"""Under CI=true a skipped test fails: a test skips where something it needs is missing here
(chromium, the Google Cloud emulators, Java, the infra tools of .venv-infra, a test dependency), and
a green CI must mean that everything ran. Locally such tests still skip, with the reason.
(A plugin of both suites: tests/conftest.py and chaos/conftest.py.)"""
from __future__ import annotations

import os

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_the_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and on_ci():
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true, where every test must run: {_reason(report)}\n"
                           "(install what it needs in `make setup`, or fix the test)")


def pytest_configure(config):
    if on_ci():  # a module that could not be collected fails, and the others still run
        config.option.continue_on_collection_errors = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_the_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips itself at import (pytest.importorskip of a missing dependency)."""
    outcome = yield
    _fail_the_skip(outcome.get_result())
