"""The public surface: one sorted ``__all__``; a change to it must be deliberate."""

import subprocess
import sys

import runtime_modules

PUBLIC = [
    "Action",
    "AddressAdded",
    "AddressRemoved",
    "AppliedKnown",
    "Applier",
    "ApplyCancelled",
    "ApplyError",
    "ApplyFinished",
    "ApplyGivenUp",
    "ApplyOutcome",
    "ApplyResult",
    "ApplyScheduled",
    "ConditionsChanged",
    "ConfigError",
    "ControlError",
    "Daemon",
    "Device",
    "DeviceMoved",
    "DeviceRemoved",
    "DeviceUpsert",
    "DumpError",
    "Evaluation",
    "ExitCode",
    "Explanation",
    "HookVetoError",
    "IncrementalEvaluator",
    "Input",
    "Journal",
    "JournalEvent",
    "Link",
    "LinkRemoved",
    "LinkUpsert",
    "LockBusyError",
    "ModuleInfo",
    "Needs",
    "OperState",
    "Override",
    "OverrideExpired",
    "OverrideState",
    "OverridesChanged",
    "Paused",
    "PermissionDeniedError",
    "RebuildRequested",
    "Reconciler",
    "ReconcilerStatus",
    "Registry",
    "RegistryError",
    "ResetRequested",
    "RollbackFailedError",
    "Rule",
    "RuleActivated",
    "RuleDeactivated",
    "RuleError",
    "RuleLingering",
    "RuleProblem",
    "RuleResult",
    "RuleSet",
    "RuleSettleCancelled",
    "RuleSettling",
    "RuleTiming",
    "RulesLoaded",
    "RuntimeModulesError",
    "Settings",
    "StartApply",
    "State",
    "UnknownModuleError",
    "World",
    "WorldChange",
    "WorldReplaced",
    "evaluate",
    "explain",
    "load_registry",
    "load_rules",
    "load_state",
    "parse_rules",
    "read_ip_link_json",
    "read_udev_db",
    "read_umockdev",
    "settings_from_env",
    "world_from_files",
]


def test_public_names_are_exactly_these() -> None:
    assert runtime_modules.__all__ == PUBLIC == sorted(PUBLIC)


def test_every_public_name_resolves() -> None:
    for name in PUBLIC:
        assert getattr(runtime_modules, name) is not None, name


def test_importing_the_package_loads_no_heavy_module() -> None:
    # Every CLI verb imports the package: pydantic and the daemon load only when used.
    code = "import runtime_modules, sys; print(sorted(m for m in sys.modules if m in "
    code += "('pydantic', 'runtime_modules._daemon', 'runtime_modules._applier')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
