"""The generated flake, evaluated by the real Nix against the stub base (and nixpkgs' lib)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from runtime_modules._errors import ConfigError
from runtime_modules._flake import (
    ENABLED_JSON,
    FLAKE_LOCK,
    FLAKE_NIX,
    flake_ref,
    render_flake,
    write_flake,
)
from runtime_modules._registry import parse_registry
from tests.fixtures.applier import BASE_FLAKE, HOST

HOSTILE = [
    'quote"',
    'dollar${builtins.abort "x"}',
    "back\\slash",
    "new\nline",
    "''${x}",
    "ünïcode",
    "semi;colon }",
]


def _base(tmp: Path, modules: list[str], version: int = 1) -> Path:
    base = tmp / "base"
    shutil.copytree(BASE_FLAKE, base)
    (base / "base.json").write_text(
        json.dumps({"host": HOST, "modules": modules, "version": version})
    )
    return base


def _eval(nix: list[str], flake_dir: Path, attr: str) -> Any:
    ref = flake_ref(flake_dir, HOST).split("#")[0]
    out = subprocess.run(
        [*nix, "eval", "--json", f"{ref}#nixosConfigurations.{HOST}.config.{attr}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _markers(arrived: list[dict[str, Any]]) -> list[str]:
    return [a["runtimeModulesStub"]["marker"] for a in arrived]


def test_flake_text_is_the_same_for_any_modules(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_flake(a, base_url="path:/base", host=HOST, modules=[])
    write_flake(b, base_url="path:/base", host=HOST, modules=HOSTILE)
    assert (a / FLAKE_NIX).read_bytes() == (b / FLAKE_NIX).read_bytes()
    assert json.loads((b / ENABLED_JSON).read_text()) == {"host": HOST, "modules": sorted(HOSTILE)}


def test_hostile_names_reach_nix_as_data_only(tmp_path: Path, nix: list[str]) -> None:
    base = _base(tmp_path, HOSTILE)
    flake_dir = tmp_path / "flake"
    write_flake(flake_dir, base_url=f"path:{base}", host=HOST, modules=[])
    plain = (flake_dir / FLAKE_NIX).read_bytes()
    write_flake(flake_dir, base_url=f"path:{base}", host=HOST, modules=HOSTILE)
    assert (flake_dir / FLAKE_NIX).read_bytes() == plain
    # Nix evaluates it, and every hostile name arrives intact as a string.
    assert _markers(_eval(nix, flake_dir, "runtimeModulesStub.arrived")) == sorted(HOSTILE)


def test_hostile_descriptions_do_not_change_the_flake(tmp_path: Path) -> None:
    plain = parse_registry(
        json.dumps({"host": HOST, "flake": "path:/b", "modules": [{"name": "m"}]}), "r"
    )
    evil = parse_registry(
        json.dumps(
            {
                "host": HOST,
                "flake": "path:/b",
                "modules": [{"name": "m", "description": '"; ${abort "x"} \\\n\'\'${y}'}],
            }
        ),
        "r",
    )
    assert render_flake(plain.flake) == render_flake(evil.flake)


@pytest.mark.parametrize(
    "url",
    ['path:/x";}', "path:/x${y}", "path:/x\\y", "path:/x y", "github:o/r\n", "", "path:/$x"],
)
def test_unsafe_base_urls_are_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fix `flake` in the registry"):
        write_flake(tmp_path, base_url=url, host=HOST, modules=[])
    assert not (tmp_path / FLAKE_NIX).exists()


def test_lock_is_kept_so_the_base_stays_pinned(tmp_path: Path, nix: list[str]) -> None:
    base = _base(tmp_path, ["gaming", "podman"], version=1)
    flake_dir = tmp_path / "flake"
    write_flake(flake_dir, base_url=f"path:{base}", host=HOST, modules=["gaming"])
    assert _eval(nix, flake_dir, "runtimeModulesStub.baseVersion") == 1
    lock = (flake_dir / FLAKE_LOCK).read_bytes()

    # The base changes on disk (e.g. someone edits the checkout): enabling a module must not
    # pick that up, because the lock is kept between applies.
    (base / "base.json").write_text(
        json.dumps({"host": HOST, "modules": ["gaming", "podman"], "version": 2})
    )
    relocked = write_flake(
        flake_dir, base_url=f"path:{base}", host=HOST, modules=["gaming", "podman"]
    )
    assert not relocked
    assert (flake_dir / FLAKE_LOCK).read_bytes() == lock
    assert _eval(nix, flake_dir, "runtimeModulesStub.baseVersion") == 1
    assert _markers(_eval(nix, flake_dir, "runtimeModulesStub.arrived")) == ["gaming", "podman"]

    # A new base reference (the base system was rebuilt) is locked afresh.
    moved = tmp_path / "base2"
    shutil.copytree(base, moved)
    assert write_flake(flake_dir, base_url=f"path:{moved}", host=HOST, modules=["gaming"])
    assert _eval(nix, flake_dir, "runtimeModulesStub.baseVersion") == 2


def test_a_module_missing_from_the_base_is_named(tmp_path: Path, nix: list[str]) -> None:
    base = _base(tmp_path, ["gaming"])
    flake_dir = tmp_path / "flake"
    write_flake(flake_dir, base_url=f"path:{base}", host=HOST, modules=["podman"])
    ref = flake_ref(flake_dir, HOST).split("#")[0]
    out = subprocess.run(
        [*nix, "eval", "--json", f"{ref}#nixosConfigurations.{HOST}.config.runtimeModulesStub"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
    assert 'defines no runtime module "podman"' in out.stderr


_LIB_BASE = """
{
  inputs.nixpkgs-lib.url = "path:@LIB@";
  outputs = { self, nixpkgs-lib }:
    let
      lib = nixpkgs-lib.lib;
      spec = builtins.fromJSON (builtins.readFile ./base.json);
      # What the NixOS module of this project declares (services.runtimeModules.internal).
      internal = {
        options.services.runtimeModules.internal.moduleImports = lib.mkOption {
          type = lib.types.attrsOf (lib.types.listOf lib.types.raw);
          default = { };
          internal = true;
        };
      };
      # Stands in for the rest of NixOS's option declarations.
      freeform = { config._module.freeformType = lib.types.lazyAttrsOf lib.types.anything; };
      modules = {
        services.runtimeModules.internal.moduleImports = lib.genAttrs spec.modules
          (name: [ ({ ... }: { enabledModules.${name} = true; }) ]);
        base.hostName = spec.host;
      };
    in {
      nixosConfigurations.${spec.host} =
        lib.evalModules { modules = [ internal freeform modules ]; };
    };
}
"""


def test_extend_modules_of_a_real_module_system(
    tmp_path: Path, nix: list[str], nixpkgs_lib: Path
) -> None:
    """The generated flake against nixpkgs' real evalModules/extendModules."""
    lib_flake = nixpkgs_lib.parent if (nixpkgs_lib.parent / "flake.nix").exists() else nixpkgs_lib
    base = tmp_path / "base"
    base.mkdir()
    (base / "flake.nix").write_text(_LIB_BASE.replace("@LIB@", str(lib_flake)))
    (base / "base.json").write_text(
        json.dumps({"host": HOST, "modules": ["gaming", "podman", "virtualization"]})
    )
    flake_dir = tmp_path / "flake"
    write_flake(flake_dir, base_url=f"path:{base}", host=HOST, modules=["gaming", "virtualization"])
    assert _eval(nix, flake_dir, "enabledModules") == {"gaming": True, "virtualization": True}
    assert _eval(nix, flake_dir, "base.hostName") == HOST


def test_errors_name_the_registry_file(tmp_path: Path) -> None:
    registry = tmp_path / "modules.json"
    with pytest.raises(ConfigError, match=f"fix `flake` in the registry {registry}"):
        write_flake(tmp_path, base_url="path:/x y", host=HOST, modules=[], registry=registry)
    with pytest.raises(ConfigError, match=f"fix `host` in the registry {registry}"):
        write_flake(tmp_path, base_url="path:/x", host="a b", modules=[], registry=registry)
