"""Test tiers are selected with markers; each test gets its tier from its top folder
under tests/ (tests/unit/admission/... is unit)."""

import faulthandler
import sys
import threading
from pathlib import Path

import pytest

# The session's real server (started once, on first use) serves the integration and
# loadtest tiers alike.
pytest_plugins = ["tests.live_server"]

TIERS = {"unit", "integration", "loadtest", "deploy", "ray"}
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        relative = Path(str(item.fspath)).resolve().relative_to(TESTS)
        tier = relative.parts[0] if len(relative.parts) > 1 else None
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


# A rerun (pytest-rerunfailures) hides why the first try failed; CI's log is often all there
# is to go on, so the summary prints the end of each rerun try's failure.
_RERUN_FAILURES: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.outcome == "rerun" and report.longrepr is not None:
        _RERUN_FAILURES.append((report.nodeid, report.longreprtext[-3000:]))


def pytest_terminal_summary(terminalreporter):
    for nodeid, text in _RERUN_FAILURES:
        terminalreporter.write_sep("-", f"why {nodeid} was rerun")
        terminalreporter.write_line(text)


# CI once printed the summary and then never exited (killed at its time limit). After the
# summary nothing may keep this process alive: name what is left, and if the interpreter
# still has not exited after EXIT_WATCHDOG_S, dump every thread's stack and exit 1.
EXIT_WATCHDOG_S = 300


def pytest_unconfigure(config):
    import multiprocessing

    for child in multiprocessing.active_children():
        print(f"\ntests left a child process running: {child.name} (pid {child.pid}); killing it", file=sys.stderr)
        child.kill()
        child.join(10)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            print(f"\ntests left a non-daemon thread running: {thread.name}", file=sys.stderr)
    faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True)
