"""The exception tree of runtime-modules.

    RuntimeModulesError            every error a user may see: what, where, what to do
    ├── ConfigError                a settings value, registry, state or override file is wrong
    │   └── RegistryError          the module registry cannot be read or is invalid
    ├── RuleError                  one or more rules are invalid (carries every RuleProblem)
    ├── DumpError                  a recorded world (udev db, umockdev, ip link) is unreadable
    ├── UnknownModuleError         a module name is not in the registry (carries suggestions)
    ├── LockBusyError              another apply holds the lock and the caller asked not to wait
    ├── ApplyError                 an apply failed (the system was rolled back)
    │   └── RollbackFailedError    ... and the previous system could not be restored
    ├── HookVetoError              a pre-apply hook refused the apply
    ├── StateError                 the state directory cannot be written (read-only, full)
    ├── ControlError               the control socket refused or failed a request
    │   └── NoDaemonError          no daemon listens on the control socket
    └── PermissionDeniedError      the caller may not change state (not root, not in the group)

Errors are raised inside and translated once at the CLI boundary into one line on stderr and an
exit code (see ``ExitCode``); no traceback is ever shown for bad input.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitCode(enum.IntEnum):
    """Documented exit codes of the ``runtime-modules`` command (README, "Exit codes")."""

    OK = 0
    FAILURE = 1  # an apply failed and was rolled back, or a check found problems
    USAGE = 2  # bad command line, unknown module, invalid input file
    PERMISSION = 3  # needs root or membership of the control group
    BUSY = 4  # another apply holds the lock (with --no-wait)
    ROLLBACK_FAILED = 5  # the apply failed and the previous system could not be restored
    VETOED = 6  # a pre-apply hook refused the apply
    NO_DAEMON = 7  # a daemon-only verb was used while no daemon runs


class RuntimeModulesError(Exception):
    """Base of every error meant for the user."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(RuntimeModulesError):
    exit_code = ExitCode.USAGE


class RegistryError(ConfigError):
    pass


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One problem in one rule: where it is, what is wrong, and a hint."""

    file: str
    rule: str | None  # rule name, or "rule[3]" when it has none
    field: str | None  # dotted path inside the rule, e.g. "when.device.properties"
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.rule is not None:
            where += f": rule {self.rule}"
        if self.field:
            where += f": {self.field}"
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class RuleError(RuntimeModulesError):
    # Invalid rule files are bad input for every verb that reads them; `rules check`, which
    # looks for problems, exits 1 when it finds some (it returns that itself).
    exit_code = ExitCode.USAGE

    def __init__(self, problems: list[RuleProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DumpError(RuntimeModulesError):
    exit_code = ExitCode.USAGE


class UnknownModuleError(RuntimeModulesError):
    exit_code = ExitCode.USAGE


class LockBusyError(RuntimeModulesError):
    exit_code = ExitCode.BUSY


class ApplyError(RuntimeModulesError):
    exit_code = ExitCode.FAILURE


class RollbackFailedError(ApplyError):
    exit_code = ExitCode.ROLLBACK_FAILED


class HookVetoError(RuntimeModulesError):
    exit_code = ExitCode.VETOED


class StateError(RuntimeModulesError):
    exit_code = ExitCode.FAILURE


class ControlError(RuntimeModulesError):
    exit_code = ExitCode.FAILURE


class NoDaemonError(ControlError):
    exit_code = ExitCode.NO_DAEMON


class PermissionDeniedError(RuntimeModulesError):
    exit_code = ExitCode.PERMISSION
