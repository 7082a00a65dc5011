"""runtime-modules: switch NixOS runtime modules on and off, by hand or by rules.

The layout follows the pipeline: sources (udev, netlink) -> world -> rules -> reconciler ->
applier -> journal, with the CLI and the daemon on top. Modules are private; the public surface is
this package's ``__all__``.
"""

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
from ._settings import Settings, settings_from_env
from ._world import (
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

__version__ = "0.1.0"

__all__ = [
    "ApplyError",
    "ConfigError",
    "ControlError",
    "Device",
    "DeviceMoved",
    "DeviceRemoved",
    "DeviceUpsert",
    "DumpError",
    "ExitCode",
    "HookVetoError",
    "Link",
    "LinkRemoved",
    "LinkUpsert",
    "LockBusyError",
    "OperState",
    "PermissionDeniedError",
    "RegistryError",
    "RollbackFailedError",
    "RuleError",
    "RuleProblem",
    "RuntimeModulesError",
    "Settings",
    "UnknownModuleError",
    "World",
    "WorldChange",
    "WorldReplaced",
    "settings_from_env",
]
