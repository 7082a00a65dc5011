"""runtime-modules: switch NixOS runtime modules on and off, by hand or by rules.

The layout follows the pipeline: sources (udev, netlink) -> world -> rules -> reconciler ->
applier -> journal, with the CLI and the daemon on top. Modules are private; the public surface is
this package's ``__all__``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    ApplyError,
    ConfigError,
    ControlError,
    DumpError,
    ExitCode,
    HookVetoError,
    LockBusyError,
    PermissionDeniedError,
    RegistryError,
    RollbackFailedError,
    RuleError,
    RuleProblem,
    RuntimeModulesError,
    UnknownModuleError,
)
from ._settings import (
    Settings,
    settings_from_env,
)
from ._world import (
    AddressAdded,
    AddressRemoved,
    Device,
    DeviceMoved,
    DeviceRemoved,
    DeviceUpsert,
    Link,
    LinkRemoved,
    LinkUpsert,
    OperState,
    World,
    WorldChange,
    WorldReplaced,
)

if TYPE_CHECKING:
    from ._applier import (
        Applier,
        ApplyOutcome,
    )
    from ._daemon import (
        Daemon,
    )
    from ._dumps import (
        read_ip_link_json,
        read_udev_db,
        read_umockdev,
        world_from_files,
    )
    from ._evaluate import (
        Evaluation,
        IncrementalEvaluator,
        RuleResult,
        evaluate,
    )
    from ._explain import (
        Explanation,
        explain,
    )
    from ._journal import (
        Journal,
        JournalEvent,
    )
    from ._reconciler import (
        Action,
        AppliedKnown,
        ApplyCancelled,
        ApplyFinished,
        ApplyGivenUp,
        ApplyScheduled,
        ConditionsChanged,
        Input,
        Override,
        OverrideExpired,
        OverridesChanged,
        OverrideState,
        Paused,
        RebuildRequested,
        Reconciler,
        ReconcilerStatus,
        ResetRequested,
        RuleActivated,
        RuleDeactivated,
        RuleLingering,
        RuleSettleCancelled,
        RuleSettling,
        RulesLoaded,
        RuleTiming,
        StartApply,
    )
    from ._registry import (
        ModuleInfo,
        Registry,
        load_registry,
    )
    from ._rules import (
        Needs,
        Rule,
        RuleSet,
        load_rules,
        parse_rules,
    )
    from ._state import (
        ApplyResult,
        State,
        load_state,
    )

__version__ = "0.1.0"

# The heavier parts (pydantic models, the daemon) load on first use, so that `import
# runtime_modules` and every CLI verb stay cheap (PEP 562).
_LAZY: dict[str, str] = {
    "Action": "._reconciler",
    "AppliedKnown": "._reconciler",
    "Applier": "._applier",
    "ApplyCancelled": "._reconciler",
    "ApplyFinished": "._reconciler",
    "ApplyGivenUp": "._reconciler",
    "ApplyOutcome": "._applier",
    "ApplyResult": "._state",
    "ApplyScheduled": "._reconciler",
    "ConditionsChanged": "._reconciler",
    "Daemon": "._daemon",
    "Evaluation": "._evaluate",
    "Explanation": "._explain",
    "IncrementalEvaluator": "._evaluate",
    "Input": "._reconciler",
    "Journal": "._journal",
    "JournalEvent": "._journal",
    "ModuleInfo": "._registry",
    "Needs": "._rules",
    "Override": "._reconciler",
    "OverrideExpired": "._reconciler",
    "OverrideState": "._reconciler",
    "OverridesChanged": "._reconciler",
    "Paused": "._reconciler",
    "RebuildRequested": "._reconciler",
    "Reconciler": "._reconciler",
    "ReconcilerStatus": "._reconciler",
    "Registry": "._registry",
    "ResetRequested": "._reconciler",
    "Rule": "._rules",
    "RuleActivated": "._reconciler",
    "RuleDeactivated": "._reconciler",
    "RuleLingering": "._reconciler",
    "RuleResult": "._evaluate",
    "RuleSet": "._rules",
    "RuleSettleCancelled": "._reconciler",
    "RuleSettling": "._reconciler",
    "RuleTiming": "._reconciler",
    "RulesLoaded": "._reconciler",
    "StartApply": "._reconciler",
    "State": "._state",
    "evaluate": "._evaluate",
    "explain": "._explain",
    "load_registry": "._registry",
    "load_rules": "._rules",
    "load_state": "._state",
    "parse_rules": "._rules",
    "read_ip_link_json": "._dumps",
    "read_udev_db": "._dumps",
    "read_umockdev": "._dumps",
    "world_from_files": "._dumps",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
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
