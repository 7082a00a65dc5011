"""The module registry: validation names the file and the field."""

from pathlib import Path

import pytest

from runtime_modules._errors import RegistryError, UnknownModuleError
from runtime_modules._registry import load_registry, parse_registry

GOOD = '{"host": "laptop", "flake": "path:/nix/store/abc-source", "modules": [{"name": "gaming"}]}'


def test_good_registry_keeps_extra_fields() -> None:
    reg = parse_registry(GOOD.replace('"gaming"}', '"gaming", "future": 1}'), "r.json")
    assert reg.names == {"gaming"}
    assert reg.modules[0].model_extra == {"future": 1}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "r.json: not valid JSON"),
        ('{"flake": "path:/x"}', "r.json: host: is missing; the NixOS module writes this file"),
        (
            GOOD.replace('{"name": "gaming"}', '{"name": "gaming", "kernel_changes": 3}'),
            "r.json: modules[0].kernel_changes (module gaming): must be a list;",
        ),
        (GOOD.replace("laptop", "a b"), "r.json: host:"),
        (GOOD.replace("path:/nix/store/abc-source", 'x\\"; ${evil}'), "r.json: flake:"),
        (GOOD.replace('"gaming"', '"a\\nb"'), "r.json: modules[0].name:"),
        (GOOD.replace('"gaming"', '"gaming\\n"'), "r.json: modules[0].name:"),
        (GOOD.replace("abc-source", "abc-source\\n"), "r.json: flake:"),
        (
            GOOD.replace('{"name": "gaming"}', '{"name": "g"}, {"name": "g"}'),
            "r.json: modules: module 'g' is listed twice; the NixOS module",
        ),
    ],
)
def test_bad_registry_names_file_and_field(text: str, expected: str) -> None:
    with pytest.raises(RegistryError) as err:
        parse_registry(text, "r.json")
    assert expected in str(err.value)


def test_missing_registry_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"enable services\.runtimeModules"):
        load_registry(tmp_path / "none.json")


def test_unknown_module_suggests_close_names() -> None:
    reg = parse_registry(GOOD, "r.json")
    with pytest.raises(UnknownModuleError, match="did you mean 'gaming'"):
        reg.check_known(["gamin"])


def test_deeply_nested_json_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="nested too deeply"):
        parse_registry("[" * 100_000 + "]" * 100_000, "deep.json")
