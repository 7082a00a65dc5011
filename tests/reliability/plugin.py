"""A pytest plugin that turns the reliability suite's outcomes into docs/reliability.md.

- ``@pytest.mark.reliability("case name")`` marks a test as proof of a case of ``cases.CASES``
  (an unknown name is a collection error); ``cases.py`` also lists tests of other files.
- ``pytest tests/test_reliability.py`` (the whole file, as ``scripts/test
  tests/test_reliability.py`` runs it) also runs the tests that ``cases.py`` lists elsewhere, so
  that one command runs the whole matrix.
- At the end of a session that ran every case (a full ``scripts/test`` run, or the command
  above), the matrix is written to ``--reliability-matrix`` (default docs/reliability.md): case,
  outcome, the known end it asserts, and the tests. A partial run (``-k``, one test, ``-x``
  stopping early) leaves the file as it is and says so. The file holds no time or duration, so an
  unchanged outcome leaves it byte for byte the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .cases import CASES, Case, case

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "tests" / "test_reliability.py"
DEFAULT_MATRIX = REPO / "docs" / "reliability.md"
_PARAMS = re.compile(r"\[.*\]$")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-matrix",
        default=str(DEFAULT_MATRIX),
        metavar="PATH",
        help="where a run of every reliability case writes the matrix ('none': nowhere)",
    )


def _selects_only_the_suite(config: pytest.Config) -> bool:
    if not config.args:
        return False
    root = Path(config.invocation_params.dir)
    for arg in config.args:
        if "::" in arg:
            return False
        if (root / arg).resolve() != SUITE:
            return False
    return True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability(case): the test proves the named case of tests/reliability/cases.py"
    )
    if _selects_only_the_suite(config):
        # Session collection reads config.args after configure: the listed tests of other files
        # join the run, so the one command runs the whole matrix.
        config.args.extend(t for c in CASES for t in c.tests)
    config.pluginmanager.register(_Recorder(config), "reliability-recorder")


@dataclass
class _Outcome:
    nodeid: str
    status: str = "not run"  # passed, failed, error, skipped, xfailed, xpassed
    reason: str = ""


@dataclass(eq=False)  # registered as a plugin: hashed by identity
class _Recorder:
    config: pytest.Config
    items: dict[str, list[str]] = field(default_factory=dict)  # case name -> node ids
    outcomes: dict[str, _Outcome] = field(default_factory=dict)
    interrupted: bool = False

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            for marker in item.iter_markers("reliability"):
                if len(marker.args) != 1 or not isinstance(marker.args[0], str):
                    raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.reliability('case')")
                try:
                    case(marker.args[0])
                except KeyError:
                    raise pytest.UsageError(
                        f"{item.nodeid}: reliability case {marker.args[0]!r} is not in "
                        "tests/reliability/cases.py"
                    ) from None
                self._add(marker.args[0], item.nodeid)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # Only what survived deselection (-k, -m) counts: reference lookups happen here.
        collected = [item.nodeid for item in session.items]
        kept = set(collected)
        self.items = {name: [n for n in ids if n in kept] for name, ids in self.items.items()}
        for c in CASES:
            for ref in c.tests:
                for nodeid in collected:
                    if nodeid == ref or _PARAMS.sub("", nodeid) == ref:
                        self._add(c.name, nodeid)

    def _add(self, name: str, nodeid: str) -> None:
        ids = self.items.setdefault(name, [])
        if nodeid not in ids:
            ids.append(nodeid)
        self.outcomes.setdefault(nodeid, _Outcome(nodeid))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = self.outcomes.get(report.nodeid)
        if outcome is None:
            return
        if report.when == "setup" and report.skipped:
            outcome.status, outcome.reason = "skipped", _skip_reason(report)
        elif report.failed:
            outcome.status = "failed" if report.when == "call" else "error"
        elif report.when == "call":
            if hasattr(report, "wasxfail"):
                outcome.status = "xfailed" if report.skipped else "xpassed"
                outcome.reason = str(report.wasxfail)
            elif report.skipped:
                outcome.status, outcome.reason = "skipped", _skip_reason(report)
            else:
                outcome.status = "passed"

    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        target = self.config.getoption("reliability_matrix")
        if not self.outcomes or target == "none":
            return
        missing = [c.name for c in CASES if not self.items.get(c.name)]
        not_run = [o.nodeid for o in self.outcomes.values() if o.status == "not run"]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")

        def say(text: str) -> None:
            if reporter is not None:
                reporter.write_line(f"reliability matrix: {text}")

        if self.interrupted or missing or not_run:
            why = (
                f"{len(missing)} of {len(CASES)} cases did not run"
                if missing
                else f"{len(not_run)} of its tests did not finish"
            )
            say(f"not written ({why}); run `scripts/test tests/test_reliability.py`")
            return
        path = Path(target)
        text = render(CASES, self.items, self.outcomes)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        counts = _count(_case_status(self.items[c.name], self.outcomes)[0] for c in CASES)
        say(f"{len(CASES)} cases ({counts}) -> {path}")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr or "")


def _case_status(ids: list[str], outcomes: dict[str, _Outcome]) -> tuple[str, str]:
    """The outcome of a case, and a note (skip and xfail reasons)."""
    results = [outcomes[n] for n in ids]
    statuses = {o.status for o in results}
    reasons = sorted({o.reason for o in results if o.reason})
    note = "; ".join(reasons)
    if statuses & {"failed", "error", "xpassed"}:
        return "FAILED", note
    if statuses == {"passed"}:
        return "passed", ""
    if "xfailed" in statuses:
        return "known bug (xfail)", note
    if statuses == {"skipped"}:
        return "skipped", note
    return "passed", f"some skipped: {note}"


def _count(statuses: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _tests_cell(ids: list[str], outcomes: dict[str, _Outcome]) -> str:
    groups: dict[str, list[_Outcome]] = {}
    for n in ids:
        groups.setdefault(_PARAMS.sub("", n), []).append(outcomes[n])
    parts = []
    for base, results in groups.items():
        shown = base.removeprefix("tests/")
        bad = [o for o in results if o.status in ("failed", "error", "xpassed")]
        passed = sum(o.status == "passed" for o in results)
        if len(results) == 1:
            shown = results[0].nodeid.removeprefix("tests/")
        if len(results) > 1:
            shown += f" ({passed}/{len(results)} passed)"
        elif results[0].status != "passed":
            shown += f" ({results[0].status})"
        if bad and len(results) > 1:
            shown += " failing: " + ", ".join(_PARAMS.search(o.nodeid)[0] for o in bad)  # type: ignore[index]
        parts.append(f"`{shown}`")
    return "<br>".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(
    cases: tuple[Case, ...], items: dict[str, list[str]], outcomes: dict[str, _Outcome]
) -> str:
    statuses = {c.name: _case_status(items[c.name], outcomes) for c in cases}
    tests = sum(len(items[c.name]) for c in cases)
    lines = [
        "# Reliability matrix",
        "",
        "<!-- Generated by tests/reliability/plugin.py from a test run; do not edit by hand. -->",
        "",
        "Every fault of issue 7 must end with the system on a known module set (the wanted one, "
        "or the previous one after a rollback), the state file telling the truth, one clear line "
        "for the user, and the details in the journal. Each row is one fault, the end its tests "
        "assert, and their outcome in the last full run. The cases and the tests that prove them "
        "are listed in `tests/reliability/cases.py`; tests in `tests/test_reliability.py` carry "
        '`@pytest.mark.reliability("case")`.',
        "",
        "Regenerate with `scripts/test` (the whole suite) or `scripts/test "
        "tests/test_reliability.py` (the reliability suite alone: it runs the listed tests of "
        "the other files too). A partial run leaves this file alone.",
        "",
        f"**{len(cases)} cases, {tests} tests: {_count(s for s, _ in statuses.values())}.**",
    ]
    group = None
    for c in cases:
        if c.group != group:
            group = c.group
            lines += [
                "",
                f"## {group}",
                "",
                "| case | outcome | known end | tests |",
                "|---|---|---|---|",
            ]
        status, note = statuses[c.name]
        shown = f"**{status}**" if status == "FAILED" else status
        if note:
            shown += f" ({note})"
        lines.append(
            f"| {_cell(c.name)} | {_cell(shown)} | {_cell(c.end)} | "
            f"{_tests_cell(items[c.name], outcomes)} |"
        )
    return "\n".join(lines) + "\n"
