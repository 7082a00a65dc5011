"""Settings from the environment: durations as rule files write them; bad values: ConfigError."""

from __future__ import annotations

import pytest

from runtime_modules._errors import ConfigError
from runtime_modules._settings import Settings, settings_from_env


@pytest.mark.parametrize(
    ("variable", "attribute"),
    [
        ("RUNTIME_MODULES_APPLY_TIMEOUT", "apply_timeout"),
        ("RUNTIME_MODULES_HOOK_TIMEOUT", "hook_timeout"),
        ("RUNTIME_MODULES_SETTLE", "default_settle"),
        ("RUNTIME_MODULES_LINGER", "default_linger"),
    ],
)
@pytest.mark.parametrize(("text", "seconds"), [("1800", 1800.0), ("3s", 3.0), ("1m30s", 90.0)])
def test_durations(variable: str, attribute: str, text: str, seconds: float) -> None:
    assert getattr(settings_from_env({variable: text}), attribute) == seconds


@pytest.mark.parametrize(
    "variable",
    [
        "RUNTIME_MODULES_APPLY_TIMEOUT",
        "RUNTIME_MODULES_HOOK_TIMEOUT",
        "RUNTIME_MODULES_SETTLE",
        "RUNTIME_MODULES_LINGER",
    ],
)
@pytest.mark.parametrize("text", ["inf", "nan", "-1", "1e400", "8d", "soon", "1" + "0" * 400])
def test_non_finite_negative_or_huge_values_are_refused(variable: str, text: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        settings_from_env({variable: text})


def test_zero_is_allowed_for_settle_and_linger_only() -> None:
    s = settings_from_env({"RUNTIME_MODULES_SETTLE": "0", "RUNTIME_MODULES_LINGER": "0s"})
    assert (s.default_settle, s.default_linger) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="more than 0 seconds"):
        settings_from_env({"RUNTIME_MODULES_APPLY_TIMEOUT": "0"})


def test_unset_or_empty_variables_keep_the_defaults() -> None:
    assert settings_from_env({"RUNTIME_MODULES_SETTLE": ""}) == Settings()
    assert settings_from_env({}) == Settings()
