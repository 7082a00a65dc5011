"""Settings from the environment: durations as rule files write them; bad values: ConfigError."""

from __future__ import annotations

import pytest

from runtime_modules._errors import ConfigError
from runtime_modules._settings import Settings, parse_command, parse_seconds, settings_from_env


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1", "RUNTIME_MODULES_APPLY_TIMEOUT='-1': a duration cannot be negative; write e.g. "
               "1800 (seconds), 30m or 1h"),
        ("soon", "RUNTIME_MODULES_APPLY_TIMEOUT='soon': not a duration; write e.g. 1800 "
                 "(seconds), 30m or 1h"),
        ("200h", "RUNTIME_MODULES_APPLY_TIMEOUT='200h': at most a week"),
    ],
)  # fmt: skip
def test_a_bad_duration_variable_says_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_env({"RUNTIME_MODULES_APPLY_TIMEOUT": text})
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "variable", "flag"),
    [
        ("30", 30.0, "give a unit: 30s, 30m or 30h"),
        ("1m30s", 90.0, 90.0),
        (" 1h 5s ", 3605.0, 3605.0),
        ("-1s", "cannot be negative", "cannot be negative"),
        ("1" + "0" * 400, "at most a week", "at most a week"),
        ("inf", "not a duration", "not a duration"),
        ("1e3", "not a duration", "not a duration"),
    ],
)
def test_one_duration_parser_a_bare_number_being_seconds_in_variables_only(
    text: str, variable: float | str, flag: float | str
) -> None:
    """The variables (written in seconds by the NixOS module) and the flags (--for, --timeout)
    read durations alike, but for a bare number: seconds in a variable, refused on the command
    line with the units to choose from."""
    for number_is_seconds, expected in ((True, variable), (False, flag)):
        name = "RUNTIME_MODULES_APPLY_TIMEOUT" if number_is_seconds else "--timeout"
        if isinstance(expected, float):
            assert parse_seconds(text, name, number_is_seconds=number_is_seconds) == expected
        else:
            with pytest.raises(ConfigError, match=expected):
                parse_seconds(text, name, number_is_seconds=number_is_seconds)


@pytest.mark.parametrize(
    ("text", "argv"),
    [
        ("nixos-rebuild", ("nixos-rebuild",)),
        ("sudo '/opt/my rebuild' --fast", ("sudo", "/opt/my rebuild", "--fast")),
    ],
)
def test_nixos_rebuild_is_split_as_a_shell_would(text: str, argv: tuple[str, ...]) -> None:
    assert settings_from_env({"RUNTIME_MODULES_NIXOS_REBUILD": text}).nixos_rebuild == argv
    assert parse_command(text, "--nixos-rebuild") == argv


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"x', "RUNTIME_MODULES_NIXOS_REBUILD='\"x': no closing quotation; write the command as "
               "for a shell"),
        ("x\\", "RUNTIME_MODULES_NIXOS_REBUILD='x\\\\\\\\': no escaped character; write the "
                "command as for a shell"),
        ("   ", "RUNTIME_MODULES_NIXOS_REBUILD='   ': names no command; give one \\(e.g. "
               "nixos-rebuild\\), or unset it for the default, nixos-rebuild"),
    ],
)  # fmt: skip
def test_a_bad_nixos_rebuild_variable_is_a_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        settings_from_env({"RUNTIME_MODULES_NIXOS_REBUILD": text})
