"""tests/strict_ci.py: a skip hides a gap under CI=true, so there it fails; locally it still skips."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SUITE = {
    "test_tools.py": '''
import pytest

@pytest.fixture
def chromium():
    pytest.skip("Debian's chromium is not installed")

def test_in_the_browser(chromium):
    pass

def test_on_the_emulators():
    pytest.skip("pubsub emulator unavailable")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_to_fail():
    assert False

def test_that_runs():
    pass
''',
    "test_dependency.py": '''
import pytest
hcl2 = pytest.importorskip("a_module_that_is_not_installed")

def test_terraform():
    pass
''',
}


def _run(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    for name, text in SUITE.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                           "-p", "tests.strict_ci", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_locally_a_missing_tool_skips_with_its_reason(tmp_path):
    run = _run(tmp_path, None)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 3 skipped, 1 xfailed" in run.stdout
    assert "Debian's chromium is not installed" in run.stdout and "a_module_that_is_not_installed" in run.stdout


def test_under_ci_every_skip_fails_with_its_reason_and_the_rest_still_runs(tmp_path):
    run = _run(tmp_path, "true")
    assert run.returncode == 1, run.stdout
    assert "1 failed, 1 passed, 1 xfailed, 2 errors" in run.stdout
    for reason in ("Debian's chromium is not installed", "pubsub emulator unavailable",
                   "could not import 'a_module_that_is_not_installed'"):
        assert f"skipped under CI=true, where every test must run: Skipped: {reason}" in run.stdout
