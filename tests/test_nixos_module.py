"""The NixOS module, flake.nix and the package, evaluated for real with nixpkgs' lib.

nixos-module.nix is evaluated by ``lib.evalModules`` with stub declarations of the NixOS options it
sets and a stub ``pkgs`` (tests/nix/); what it generates is compared with the contracts the Python
side reads: the registry goes through ``parse_registry``, the rules through ``runtime-modules rules
check`` exactly as the build-time check runs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from runtime_modules._registry import parse_registry
from tests.fixtures.system import REPO

EVAL = REPO / "tests" / "nix" / "eval.nix"
SAMPLE = REPO / "tests" / "nix" / "sample.nix"
BASE_FLAKE = REPO / "tests" / "nix" / "base-flake"
SAMPLE_FLAKE_REF = f"path:{BASE_FLAKE}?narHash=sha256-Q0s6KkG8c1TqKcI3Qe2K2Y2m1hC8b0a5G9G2d2a2b2c="
# A module that swaps nixpkgs for one where every store path differs, as an overlay would.
OVERLAY = (
    "({ lib, ... }: { _module.args.pkgs = lib.mkForce "
    f'(import {REPO}/tests/nix/pkgs.nix {{ inherit lib; salt = "overlay"; }}); }})'
)


@pytest.fixture(scope="session")
def nix_instantiate() -> str:
    exe = shutil.which("nix-instantiate")
    if exe is None:
        pytest.skip("nix-instantiate is not installed (Debian package nix-bin)")
    return exe


class NixEval:
    """Runs tests/nix/eval.nix with nixpkgs' lib; arguments are Nix expressions."""

    def __init__(self, exe: str, lib: Path) -> None:
        self.exe = exe
        self.lib = lib

    def run(
        self, attr: str | None = None, *, show_trace: bool = False, **args: str
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.exe, "--eval", "--strict", "--json", str(EVAL)]
        argv += ["--arg", "lib", f"import {self.lib}"]
        for name, expr in args.items():
            argv += ["--arg", name, expr]
        if attr:
            argv += ["-A", attr]
        if show_trace:
            argv.append("--show-trace")
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    def __call__(self, attr: str | None = None, **args: str) -> Any:
        proc = self.run(attr, **args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def error(self, attr: str = "base.toplevel", **args: str) -> str:
        """The evaluation must fail; returns its message."""
        proc = self.run(attr, **args)
        assert proc.returncode != 0, f"evaluated although it should not: {proc.stdout}"
        return proc.stderr


@pytest.fixture(scope="module")
def nix_eval(nix_instantiate: str, nixpkgs_lib: Path) -> NixEval:
    return NixEval(nix_instantiate, nixpkgs_lib)


@pytest.fixture(scope="module")
def sample(nix_eval: NixEval) -> dict[str, Any]:
    base: dict[str, Any] = nix_eval("base")
    return base


def with_sample(*modules: str) -> str:
    """The `modules` argument: the sample configuration plus more modules (Nix expressions)."""
    return "[ " + " ".join([str(SAMPLE), *(f"({m})" for m in modules)]) + " ]"


MINIMAL = (
    '{ networking.hostName = "box"; '
    'services.runtimeModules = { enable = true; flakeUrl = "github:alice/nixos-config"; }; }'
)


# --- Every .nix file parses -------------------------------------------------------------------


def _nix_files() -> list[Path]:
    skip = {".venv", ".git", "node_modules"}
    return sorted(
        p for p in REPO.rglob("*.nix") if not skip.intersection(p.relative_to(REPO).parts)
    )


def test_the_nix_files_are_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in _nix_files()}
    assert {"flake.nix", "nixos-module.nix", "nix/package.nix", "nix/vm-test.nix"} <= names
    assert {"nix/modules/gaming.nix", "nix/modules/virtualization.nix"} <= names


@pytest.mark.parametrize("path", _nix_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_nix_file_parses(nix_instantiate: str, path: Path) -> None:
    proc = subprocess.run(
        [nix_instantiate, "--parse", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


# --- The registry -----------------------------------------------------------------------------


def test_registry_is_what_the_cli_reads(sample: dict[str, Any]) -> None:
    registry = parse_registry(sample["registryText"], "modules.json")
    assert registry.host == "laptop"
    assert registry.flake == SAMPLE_FLAKE_REF
    assert [(m.name, m.description) for m in registry.modules] == [
        ("lab", "Lab VPN and tools"),
        ("office", "Printing"),
        ("rt.gaming", "Steam, Gamescope and GameMode"),
        ("rt.podman", "Podman containers with podman-compose"),
        ("rt.virtualization", "libvirt/QEMU virtual machines with virt-manager"),
    ]


def test_registry_names_the_kernel_level_changes_of_each_module(sample: dict[str, Any]) -> None:
    data = json.loads(sample["registryText"])
    changes = {m["name"]: m["kernel_changes"] for m in data["modules"]}
    # lab.nix adds a kernel module; the sample's base already has one, which must not count.
    assert changes == {
        "lab": ["boot.kernelModules"],
        "office": [],
        "rt.gaming": [],
        "rt.podman": [],
        "rt.virtualization": [],
    }


def test_kernel_params_and_initrd_changes_are_detected(nix_eval: NixEval) -> None:
    module = """{ services.runtimeModules.modules = [ { name = "iommu"; imports = [ {
        boot.kernelParams = [ "intel_iommu=on" ];
        system.build.initialRamdisk = { type = "derivation"; name = "initrd";
          outPath = "/nix/store/22222222222222222222222222222222-initrd"; };
      } ]; } ]; }"""
    data = json.loads(nix_eval("base.registryText", modules=with_sample(module)))
    iommu = next(m for m in data["modules"] if m["name"] == "iommu")
    assert iommu["kernel_changes"] == ["boot.initrd", "boot.kernelParams"]


def test_kernel_settings_the_base_already_has_are_no_change(nix_eval: NixEval) -> None:
    """Lists are sets here: re-adding the base's kvm-amd, or reordering, changes nothing."""
    module = """{ boot.kernelModules = [ "kvm-amd" ];
      services.runtimeModules.modules = [ { name = "kvm"; imports = [ {
        boot.kernelModules = [ "kvm-amd" ];
        boot.kernelParams = [ "quiet" "quiet" ];
      } ]; } ]; }"""
    base = """{ boot.kernelParams = [ "quiet" ]; }"""
    data = json.loads(nix_eval("base.registryText", modules=with_sample(module, base)))
    kvm = next(m for m in data["modules"] if m["name"] == "kvm")
    assert kvm["kernel_changes"] == []


def test_kernel_changes_are_left_out_when_not_detected(nix_eval: NixEval) -> None:
    off = "{ services.runtimeModules.detectKernelChanges = false; }"
    data = json.loads(nix_eval("base.registryText", modules=with_sample(off)))
    assert all("kernel_changes" not in m for m in data["modules"])


def test_flake_url_goes_to_the_registry_as_given(nix_eval: NixEval) -> None:
    data = json.loads(nix_eval("base.registryText", modules=f"[ {MINIMAL} ]"))
    assert data == {"host": "box", "flake": "github:alice/nixos-config", "modules": []}


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("github:alice/nixos-config", True),
        ("path:/etc/nixos", True),
        ("git+https://example.org/cfg?ref=main", True),
        ("github:alice/nixos-config?rev=" + "a" * 40, False),
        ("github:alice/nixos-config/" + "0123456789abcdef0123456789abcdef01234567", False),
        ("git+file:///srv/cfg?dir=nixos&rev=" + "b" * 40, False),
        ("path:/nix/store/" + "c" * 32 + "-source?narHash=sha256-AAAA", False),
    ],
)
def test_an_unlocked_flake_url_is_warned_about(nix_eval: NixEval, url: str, warned: bool) -> None:
    """An unlocked base can differ from the running one: after an update, or after a reboot."""
    module = MINIMAL.replace('"github:alice/nixos-config"', json.dumps(url))
    warnings = nix_eval("base.warnings", modules=f"[ {module} ]")
    if warned:
        [warning] = warnings
        text = " ".join(warning.split())
        assert f"services.runtimeModules.flakeUrl = {json.dumps(url)} is not locked" in text
        assert "services.runtimeModules.flake = self" in text
    else:
        assert warnings == []


def test_flake_without_narhash_is_a_plain_path_ref(nix_eval: NixEval) -> None:
    module = f"""{{ networking.hostName = "box"; services.runtimeModules = {{ enable = true;
        flake = {{ outPath = "{BASE_FLAKE}"; }}; }}; }}"""
    data = json.loads(nix_eval("base.registryText", modules=f"[ {module} ]"))
    assert data["flake"] == f"path:{BASE_FLAKE}"


def test_the_base_flake_and_all_its_inputs_are_kept_in_the_store(nix_eval: NixEval) -> None:
    """After nix-collect-garbage, enabling a module must still not need the network."""
    nixpkgs, home, utils, data = (f"/nix/store/{c * 32}-source" for c in "2345")
    module = f"""{{ lib, ... }}: {{ services.runtimeModules.flake = lib.mkForce {{
        outPath = "{BASE_FLAKE}"; narHash = "sha256-AAAA";
        inputs = {{
          nixpkgs = {{ outPath = "{nixpkgs}"; inputs = {{ }}; }};
          home-manager = {{ outPath = "{home}"; inputs = {{
            nixpkgs = {{ outPath = "{nixpkgs}"; inputs = {{ }}; }};
            utils = {{ outPath = "{utils}"; inputs = {{ }}; }};
          }}; }};
          data = {{ outPath = "{data}"; }};
        }}; }}; }}"""
    base = nix_eval("base", modules=with_sample(module))
    assert sorted(base["extraDependencies"]) == sorted(
        [str(BASE_FLAKE), nixpkgs, home, utils, data]
    )


def test_a_flake_without_flake_nix_at_its_out_path_is_refused(nix_eval: NixEval) -> None:
    """Nix 2.8's `self` of a flake in a subdirectory (?dir=) is the repository's root."""
    root = REPO / "tests" / "nix"  # no flake.nix here; base-flake/ has one
    module = f"""{{ lib, ... }}: {{ services.runtimeModules.flake = lib.mkForce {{
        outPath = "{root}"; narHash = "sha256-AAAA"; }}; }}"""
    message = " ".join(nix_eval.error(modules=with_sample(module)).split())
    assert f"services.runtimeModules.flake: {root} has no flake.nix" in message
    assert "services.runtimeModules.flakeUrl" in message


def test_a_flake_in_a_subdirectory_is_referenced_with_dir(nix_eval: NixEval) -> None:
    """Newer Nix: outPath is the subdirectory, sourceInfo and narHash the repository's root."""
    root = REPO / "tests" / "nix"
    module = f"""{{ lib, ... }}: {{ services.runtimeModules.flake = lib.mkForce {{
        outPath = "{BASE_FLAKE}"; narHash = "sha256-AAAA";
        sourceInfo = {{ outPath = "{root}"; narHash = "sha256-AAAA"; }}; }}; }}"""
    data = json.loads(nix_eval("base.registryText", modules=with_sample(module)))
    assert data["flake"] == f"path:{root}?dir=base-flake&narHash=sha256-AAAA"


# --- The rules --------------------------------------------------------------------------------


def test_rules_json_has_the_structure_of_a_rules_file(sample: dict[str, Any]) -> None:
    # Options left unset (null) are not written: the rule format has no nulls.
    assert json.loads(sample["rulesFromOptions"]) == {
        "rule": [
            {
                "name": "gaming-on-nvidia-gpu",
                "description": "Steam while an NVIDIA GPU is present",
                "modules": ["rt.gaming"],
                "settle": "2s",
                "when": {
                    "device": {
                        "subsystem": "pci",
                        "properties": {"RUNTIME_MODULES_GPU_VENDOR": "nvidia"},
                    }
                },
            },
            {
                "name": "virtualization-when-docked",
                "modules": ["rt.virtualization"],
                "linger": 120,
                "when": {
                    "any": [
                        {
                            "device": {
                                "properties": {"RUNTIME_MODULES_CLASS": "thunderbolt-peripheral"}
                            }
                        },
                        {
                            "device": {
                                "properties": {
                                    "RUNTIME_MODULES_CLASS": "net",
                                    "RUNTIME_MODULES_NET_BUS": "usb",
                                }
                            }
                        },
                    ]
                },
            },
        ]
    }


def test_rule_files_are_linked_by_number_and_name(sample: dict[str, Any]) -> None:
    script = sample["rulesScript"]
    assert '"$fromOptions" $out/00-services.runtimeModules.rules.json' in script
    assert re.search(
        r"ln -s /nix/store/[a-z0-9]{32}-sample-rules\.toml \$out/01-sample-rules\.toml", script
    )


def _rules_check(
    registry_text: str, files: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """What the build-time derivation runs: `runtime-modules rules check --registry R DIR`."""
    registry = tmp_path / "modules.json"
    registry.write_text(registry_text)
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in files.items():
        (rules / name).write_text(text)
    argv = [
        sys.executable,
        "-m",
        "runtime_modules",
        "rules",
        "check",
        "--registry",
        str(registry),
        str(rules),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_generated_rules_pass_the_build_time_check(sample: dict[str, Any], tmp_path: Path) -> None:
    assert sample["rulesChecked"]
    assert 'runtime-modules rules check --registry "$registry" "$rules"' in sample["rulesCheck"]
    files = {
        "00-services.runtimeModules.rules.json": sample["rulesFromOptions"],
        "01-sample-rules.toml": (REPO / "tests" / "nix" / "sample-rules.toml").read_text(),
    }
    proc = _rules_check(sample["registryText"], files, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_rule_naming_an_unknown_module_fails_the_build_time_check(
    nix_eval: NixEval, tmp_path: Path
) -> None:
    typo = """{ services.runtimeModules.rules = [ { name = "typo"; modules = [ "rt.gamming" ];
        when.link.ifname = "wg*"; } ]; }"""
    base = nix_eval("base", modules=with_sample(typo))
    proc = _rules_check(base["registryText"], {"00.json": base["rulesFromOptions"]}, tmp_path)
    assert proc.returncode == 1
    assert "rt.gamming" in proc.stdout + proc.stderr
    assert "rt.gaming" in proc.stdout + proc.stderr  # did you mean


def test_check_rules_off_installs_the_folder_unchecked(nix_eval: NixEval) -> None:
    base = nix_eval("base", modules=with_sample("{ services.runtimeModules.checkRules = false; }"))
    assert not base["rulesChecked"]
    assert base["rulesFromOptions"] is not None


# --- The unit ---------------------------------------------------------------------------------


def test_unit_environment_is_the_settings_contract(sample: dict[str, Any]) -> None:
    assert sample["service"]["environment"] == {
        "RUNTIME_MODULES_REGISTRY": "/etc/runtime-modules/modules.json",
        "RUNTIME_MODULES_STATE_DIR": "/run/runtime-modules",
        "RUNTIME_MODULES_RULES": "/etc/runtime-modules/rules",
        "RUNTIME_MODULES_HOOKS_DIR": "/etc/runtime-modules/hooks",
        "RUNTIME_MODULES_CONTROL_GROUP": "wheel",
        "RUNTIME_MODULES_LOG_LEVEL": "debug",
        "RUNTIME_MODULES_SETTLE": "0.5",
        "RUNTIME_MODULES_LINGER": "45",
        "RUNTIME_MODULES_APPLY_TIMEOUT": "1800",
        "RUNTIME_MODULES_HOOK_TIMEOUT": "30",
        "NIX_REMOTE": "daemon",
    }


def test_unit_environment_is_read_by_the_settings(sample: dict[str, Any]) -> None:
    from runtime_modules._settings import settings_from_env

    s = settings_from_env(sample["service"]["environment"])
    assert (s.default_settle, s.default_linger, s.log_level) == (0.5, 45.0, "debug")
    assert (s.control_group, s.apply_timeout, s.hook_timeout) == ("wheel", 1800.0, 30.0)
    assert s.rules == (Path("/etc/runtime-modules/rules"),)


def test_unit_runs_the_package_and_is_never_restarted_by_a_switch(sample: dict[str, Any]) -> None:
    unit = sample["service"]
    package = sample["systemPackages"][0]
    assert unit["serviceConfig"]["ExecStart"] == f"{package}/bin/runtime-modules watch"
    assert unit["serviceConfig"]["Type"] == "notify"
    assert unit["restartIfChanged"] is False
    assert unit["reloadIfChanged"] is True
    assert unit["serviceConfig"]["ExecReload"].endswith("/bin/kill -HUP $MAINPID")
    # The unit names /etc paths; the triggers make a new registry or new rules change the unit,
    # which reloadIfChanged turns into a reload. reloadTriggers next to reloadIfChanged would make
    # NixOS warn on every build.
    etc = sample["etc"]
    assert "reloadTriggers" not in unit
    assert unit["restartTriggers"] == [
        etc["runtime-modules/modules.json"],
        etc["runtime-modules/rules"],
    ]
    assert unit["wantedBy"] == ["multi-user.target"]
    assert unit["path"][0].endswith("-nixos-rebuild")
    assert unit["path"][-1] == "/run/current-system/sw"


def test_no_rules_no_daemon(nix_eval: NixEval) -> None:
    base = nix_eval("base", modules=f"[ {MINIMAL} ]")
    assert base["service"] is None
    assert base["rulesFromOptions"] is None
    assert not base["rulesChecked"]  # nothing to check
    assert "runtime-modules/rules" in base["etc"]  # an empty folder all the same
    assert base["tmpfiles"]  # the CLI needs the state directory without the daemon


def test_watch_can_be_forced_on_without_rules(nix_eval: NixEval) -> None:
    on = "{ services.runtimeModules.watch.enable = true; }"
    base = nix_eval("base", modules=f"[ {MINIMAL} {on} ]")
    assert base["service"] is not None


def test_disabled_module_generates_nothing(nix_eval: NixEval) -> None:
    off = "{ lib, ... }: { services.runtimeModules.enable = lib.mkForce false; }"
    base = nix_eval("base", modules=with_sample(off))
    assert base["etc"] == {} and base["service"] is None and base["udev"] == []
    assert base["moduleImports"] == {}


# --- udev, hooks, tmpfiles, groups ------------------------------------------------------------


def test_udev_rules_are_the_repository_file(sample: dict[str, Any]) -> None:
    [package] = sample["udevRules"]
    assert package["destination"] == "/lib/udev/rules.d/90-runtime-modules.rules"
    assert package["text"] == (REPO / "udev" / "90-runtime-modules.rules").read_text()


def test_hooks_become_files_in_the_hook_folders(sample: dict[str, Any]) -> None:
    hooks = sample["hooks"]
    assert set(hooks) == {
        "runtime-modules/hooks/pre-apply.d/10-guard",
        "runtime-modules/hooks/post-apply.d/50-notify",
    }
    # A path stays a path; text becomes an executable script in the store.
    assert (
        hooks["runtime-modules/hooks/post-apply.d/50-notify"] == "/run/current-system/sw/bin/true"
    )
    assert re.fullmatch(
        r"/nix/store/[0-9a-f]{32}-runtime-modules-pre-apply-10-guard",
        hooks["runtime-modules/hooks/pre-apply.d/10-guard"],
    )
    texts = sample["hookTexts"]
    assert texts["runtime-modules/hooks/pre-apply.d/10-guard"] == (
        'echo "about to apply: $RUNTIME_MODULES_AFTER"\n'
    )
    assert texts["runtime-modules/hooks/post-apply.d/50-notify"] is None


def test_a_one_line_command_starting_with_a_slash_is_script_text(nix_eval: NixEval) -> None:
    """A command line with arguments is not a path: /etc would hold a dangling symlink."""
    hooks = """{ services.runtimeModules.hooks = {
        postApply."60-x" = "/run/current-system/sw/bin/systemctl try-restart nginx.service";
        preApply."20-tab" = "/run/current-system/sw/bin/true\t--flag";
        postApply."70-exe" = "/run/current-system/sw/bin/true";
        postApply."80-pkg" = "${pkgs.coreutils}/bin/true";
        postApply."90-path" = ./nix/lab.nix;
      }; }"""
    hooks = hooks.replace("./nix/", f"{REPO}/tests/nix/")
    base = nix_eval("base", modules=with_sample("{ pkgs, ... }: " + hooks))
    texts, sources = base["hookTexts"], base["hooks"]
    post = "runtime-modules/hooks/post-apply.d/"
    assert texts[post + "60-x"] == "/run/current-system/sw/bin/systemctl try-restart nginx.service"
    assert re.fullmatch(
        r"/nix/store/[0-9a-f]{32}-runtime-modules-post-apply-60-x", sources[post + "60-x"]
    )
    assert texts["runtime-modules/hooks/pre-apply.d/20-tab"] is not None
    assert sources[post + "70-exe"] == "/run/current-system/sw/bin/true"
    assert re.fullmatch(r"/nix/store/[0-9a-f]{32}-coreutils/bin/true", sources[post + "80-pkg"])
    # A path literal is copied to the store, as NixOS does with an /etc source.
    assert re.fullmatch(r"/nix/store/[0-9a-z]{32}-lab\.nix", sources[post + "90-path"])


def test_a_package_hook_is_its_executable_not_its_folder(nix_eval: NixEval) -> None:
    """A package is linked as its main program (lib.getExe); a single-file script as itself."""
    hooks = """{ services.runtimeModules.hooks.postApply = {
        "10-pkg" = pkgs.coreutils;
        "20-script" = pkgs.writeShellScript "notify" "true";
        "30-no-main" = { type = "derivation"; name = "tool-1.0"; pname = "tool";
                         outPath = "/nix/store/00000000000000000000000000000000-tool-1.0"; };
      }; }"""
    proc = nix_eval.run("base", modules=with_sample("{ pkgs, ... }: " + hooks))
    assert proc.returncode == 0, proc.stderr
    sources = json.loads(proc.stdout)["hooks"]
    post = "runtime-modules/hooks/post-apply.d/"
    assert re.fullmatch(
        r"/nix/store/[0-9a-f]{32}-coreutils/bin/coreutils", sources[post + "10-pkg"]
    )
    assert re.fullmatch(r"/nix/store/[0-9a-f]{32}-notify", sources[post + "20-script"])
    # No meta.mainProgram: nixpkgs' guess, bin/<name>, and its warning saying what to set.
    assert sources[post + "30-no-main"] == (
        "/nix/store/00000000000000000000000000000000-tool-1.0/bin/tool"
    )
    assert "does not have the meta.mainProgram attribute" in proc.stderr


def test_tmpfiles_group_and_package(sample: dict[str, Any]) -> None:
    assert sample["tmpfiles"] == [
        "d /run/runtime-modules 0755 root root - -",
        "d /var/lib/runtime-modules 0755 root root - -",
    ]
    assert sample["groups"] == {"wheel": {}}
    assert re.fullmatch(r"/nix/store/[0-9a-f]{32}-runtime-modules", sample["systemPackages"][0])
    assert sample["warnings"] == []
    assert sample["toplevel"].endswith("-toplevel.drv")  # every assertion holds


# --- Assertions and types name the option -----------------------------------------------------


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (
            '{ services.runtimeModules.flakeUrl = "github:a/b"; }',
            "set exactly one of services.runtimeModules.flake",
        ),
        (
            "{ services.runtimeModules.flake = lib.mkForce null; "
            'services.runtimeModules.flakeUrl = "github:a/b c"; }',
            'services.runtimeModules.flakeUrl = "github:a/b c" is not a flake reference',
        ),
        (
            '{ services.runtimeModules.hostName = "my laptop"; }',
            'services.runtimeModules.hostName = "my laptop" is not a nixosConfigurations name',
        ),
        (
            '{ services.runtimeModules.modules = [ { name = "bad name"; } ]; }',
            'services.runtimeModules.modules: the name "bad name" is not a module name',
        ),
        (
            '{ services.runtimeModules.modules = [ { name = "lab"; } ]; }',
            "services.runtimeModules.modules: the module name(s) lab are used more than once",
        ),
        (
            '{ services.runtimeModules.hooks.postApply."../escape" = "true"; }',
            'services.runtimeModules.hooks: the hook name "../escape" cannot be a file name',
        ),
        (
            "{ services.runtimeModules.ruleFiles = [ ./nix/stubs.nix ]; }",
            "services.runtimeModules.ruleFiles:",
        ),
        (
            '{ services.runtimeModules.controlGroup = lib.mkForce "Runtime Users"; }',
            'services.runtimeModules.controlGroup = "Runtime Users" is not a group name',
        ),
    ],
    ids=[
        "flake-and-url",
        "bad-url",
        "host",
        "module-name",
        "duplicate",
        "hook",
        "rule-file",
        "group",
    ],
)
def test_bad_values_fail_with_the_option_path(
    nix_eval: NixEval, module: str, expected: str
) -> None:
    module = module.replace("./nix/", f"{REPO}/tests/nix/")
    message = nix_eval.error(modules=with_sample("{ lib, ... }: " + module))
    assert "Failed assertions" in message
    assert expected in " ".join(message.split())


def test_a_type_error_names_the_option(nix_eval: NixEval) -> None:
    negative = "{ lib, ... }: { services.runtimeModules.settle = lib.mkForce (-1); }"
    message = nix_eval.error("base.service", modules=with_sample(negative))
    assert "services.runtimeModules.settle" in message
    assert "is not of type" in message


def test_a_module_that_cannot_be_enabled_fails_the_build_by_name(nix_eval: NixEval) -> None:
    broken = """{ services.runtimeModules.modules = [ { name = "broken";
        imports = [ { assertions = [ { assertion = false; message = "needs a GPU driver"; } ]; } ];
      } ]; }"""
    message = " ".join(nix_eval.error(modules=with_sample(broken)).split())
    assert "the runtime module broken cannot be enabled on this system" in message
    assert "- needs a GPU driver" in message


def test_any_other_evaluation_error_of_a_module_is_traced_to_it(nix_eval: NixEval) -> None:
    broken = """{ services.runtimeModules.modules = [ { name = "thrower";
        imports = [ { system.build.toplevel = lib.mkForce (throw "unfree package refused"); } ];
      } ]; }"""
    proc = nix_eval.run(
        "base.toplevel", show_trace=True, modules=with_sample("{ lib, ... }: " + broken)
    )
    assert proc.returncode != 0
    assert "unfree package refused" in proc.stderr
    assert "while evaluating the runtime module thrower" in proc.stderr


def test_skip_validation_skips_evaluation_and_kernel_detection(nix_eval: NixEval) -> None:
    broken = """{ services.runtimeModules.modules = [ { name = "broken"; skipValidation = true;
        imports = [ { assertions = [ { assertion = false; message = "needs a GPU driver"; } ]; } ];
      } ]; }"""
    base = nix_eval("base", modules=with_sample(broken))
    entry = next(m for m in json.loads(base["registryText"])["modules"] if m["name"] == "broken")
    assert "kernel_changes" not in entry


def test_validation_can_be_switched_off(nix_eval: NixEval) -> None:
    broken = """{ services.runtimeModules.validateModules = false;
      services.runtimeModules.modules = [ { name = "broken";
        imports = [ { assertions = [ { assertion = false; message = "needs a GPU driver"; } ]; } ];
      } ]; }"""
    assert nix_eval("base.toplevel", modules=with_sample(broken)).endswith("-toplevel.drv")


def test_reference_path_still_works_with_a_warning(nix_eval: NixEval) -> None:
    lab = REPO / "tests" / "nix" / "lab.nix"
    old = f'{{ services.runtimeModules.modules = [ {{ name = "old"; path = {lab}; }} ]; }}'
    base = nix_eval("base", modules=with_sample(old))
    assert base["moduleImports"]["old"] == 2  # the path, then the marker
    [warning] = base["warnings"]
    assert "module old uses `path`, which is deprecated" in warning
    entry = next(m for m in json.loads(base["registryText"])["modules"] if m["name"] == "old")
    assert entry["kernel_changes"] == ["boot.kernelModules"]  # lab.nix, reached through `path`


# --- Base and extended systems are identical --------------------------------------------------

SAME = [
    "etc",
    "hooks",
    "registryText",
    "rulesFromOptions",
    "rulesScript",
    "service",
    "udev",
    "tmpfiles",
    "groups",
]


def test_extended_system_keeps_registry_rules_unit_and_udev(nix_eval: NixEval) -> None:
    result = nix_eval(extend='[ "lab" "rt.gaming" "rt.podman" ]')
    base, extended = result["base"], result["extended"]
    for key in SAME:
        assert extended[key] == base[key], key
    # The extension is real: the modules' own packages are there.
    assert len(extended["systemPackages"]) > len(base["systemPackages"])


def test_no_warnings_in_the_base_or_any_extended_system(nix_eval: NixEval) -> None:
    """The stubs give NixOS's unit warnings (tests/nix/stubs.nix); a warning is printed at every
    build, and the extended systems are built at every apply."""
    result = nix_eval(extend='[ "lab" "office" "rt.gaming" "rt.podman" "rt.virtualization" ]')
    assert result["base"]["warnings"] == []
    assert result["extended"]["warnings"] == []
    assert result["extended"]["service"] == result["base"]["service"]


def test_extended_system_keeps_them_even_when_a_module_changes_nixpkgs(nix_eval: NixEval) -> None:
    result = nix_eval(extend='[ "lab" ]', extraExtension=f"[ {OVERLAY} ]")
    base, extended = result["base"], result["extended"]
    for key in SAME:
        assert extended[key] == base[key], key
    [ours] = base["systemPackages"]
    assert ours in extended["systemPackages"]  # our package, unchanged
    [labs] = set(extended["systemPackages"]) - {ours}  # lab's, built with the overlay
    assert labs.endswith("-git")


def test_without_the_marker_the_same_extension_changes_them(nix_eval: NixEval) -> None:
    """What the marker module prevents: a naive extension recomputes, and differs."""
    result = nix_eval(extend='[ "lab" ]', extraExtension=f"[ {OVERLAY} ]", withMarker="false")
    base, extended = result["base"], result["extended"]
    assert extended["service"] != base["service"]
    assert extended["etc"] != base["etc"]
    # kernel_changes of an extension is relative to itself: lab no longer "changes" anything.
    assert extended["registryText"] != base["registryText"]


def test_module_imports_end_with_one_shared_marker(nix_instantiate: str, nixpkgs_lib: Path) -> None:
    expr = f"""
      let lib = import {nixpkgs_lib};
          c = (lib.evalModules {{ modules = [ {REPO}/tests/nix/stubs.nix {REPO}/nixos-module.nix
                {{ _module.args.pkgs = import {REPO}/tests/nix/pkgs.nix {{ inherit lib; }}; }}
                {SAMPLE} ]; }}).config;
          imports = c.services.runtimeModules.internal.moduleImports;
      in lib.mapAttrs (_: l: {{ first = builtins.typeOf (builtins.head l);
                                 key = (lib.last l).key; }}) imports
    """
    proc = subprocess.run(
        [nix_instantiate, "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["lab"] == {"first": "path", "key": "runtime-modules#base"}
    assert {v["key"] for v in data.values()} == {"runtime-modules#base"}


# --- flake.nix and the package ----------------------------------------------------------------


def test_flake_outputs_and_package_follow_pyproject(
    nix_instantiate: str, nixpkgs_lib: Path
) -> None:
    """flake.nix's outputs with a stub nixpkgs input: names, and the package's arguments."""
    expr = f"""
      let
        lib = import {nixpkgs_lib};
        python3Packages = {{
          buildPythonApplication = args: args;
          setuptools = "setuptools"; pydantic = "pydantic"; pyudev = "pyudev";
          pyroute2 = "pyroute2"; systemd-python = "systemd-python";
        }};
        pkgs = {{
          callPackage = f: args: import f ({{ inherit lib python3Packages; }} // args);
          stdenv.hostPlatform.system = "x86_64-linux";
        }};
        flake = import {REPO}/flake.nix;
        out = flake.outputs {{ self = out // {{ outPath = {REPO}; }};
                               nixpkgs = {{ inherit lib; legacyPackages = lib.genAttrs
                                 [ "x86_64-linux" "aarch64-linux" ]
                                 (s: pkgs // {{ stdenv.hostPlatform.system = s; }}); }}; }};
        package = out.packages.x86_64-linux.default;
      in {{
        outputs = builtins.attrNames out;
        modules = lib.mapAttrs (_: toString) out.nixosModules;
        checks = builtins.attrNames out.checks.x86_64-linux;
        checksArm = builtins.attrNames out.checks.aarch64-linux;
        devShells = builtins.attrNames out.devShells.x86_64-linux;
        inherit (package) pname version dependencies build-system;
        mainProgram = package.meta.mainProgram;
      }}
    """
    proc = subprocess.run(
        [nix_instantiate, "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"packages", "nixosModules", "devShells", "checks", "overlays"} <= set(data["outputs"])
    module = str(REPO / "nixos-module.nix")
    assert data["modules"] == {"default": module, "runtimeModules": module}
    assert set(data["checks"]) == {
        "package",
        "vm-test",
        "builtin-gaming",
        "builtin-podman",
        "builtin-virtualization",
    }
    assert "vm-test" not in data["checksArm"]
    assert data["devShells"] == ["default"]

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert (data["pname"], data["version"]) == (project["name"], project["version"])
    wanted = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert set(data["dependencies"]) == wanted
    assert data["build-system"] == ["setuptools"]
    assert data["mainProgram"] == next(iter(project["scripts"]))


# --- The documented configuration allows rt.gaming's unfree packages ------------------------

STEAM = ["steam", "steam-unwrapped", "steam-original", "steam-run"]


def _nix_json(nix_instantiate: str, expr: str) -> Any:
    proc = subprocess.run(
        [nix_instantiate, "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _snippet(path: Path, heading: str) -> str:
    """The first ```nix block after ``heading``."""
    text = path.read_text().split(heading, 1)[1]
    return text.split("```nix\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(
    ("doc", "heading"), [("README.md", "## On NixOS"), ("docs/nixos.md", "## Quick start")]
)
def test_the_documented_flake_allows_steam_and_nothing_else(
    nix_instantiate: str, nixpkgs_lib: Path, tmp_path: Path, doc: str, heading: str
) -> None:
    """builtinModules.enable validates rt.gaming, whose Steam is unfree (else the build fails)."""
    flake = tmp_path / "flake.nix"
    flake.write_text(_snippet(REPO / doc, heading))
    expr = f"""
      let
        lib = import {nixpkgs_lib};
        nixpkgs = {{ lib = lib // {{ nixosSystem = args: args; }}; }};
        out = (import {flake}).outputs {{ self = {{ }}; inherit nixpkgs; runtime-modules = {{
          nixosModules.default = {{ }}; }}; }};
        modules = out.nixosConfigurations.laptop.modules;
        ours = lib.findFirst (m: builtins.isAttrs m && m ? services) null modules;
        allowed = ours.nixpkgs.config.allowUnfreePredicate;
      in {{
        builtins = ours.services.runtimeModules.builtinModules.enable;
        host = ours.services.runtimeModules.hostName or null;
        steam = map (pname: allowed {{ inherit pname; }}) {json.dumps(STEAM).replace(",", "")};
        other = allowed {{ pname = "nvidia-x11"; }};
      }}
    """
    data = _nix_json(nix_instantiate, expr)
    # Applies build nixosConfigurations.<hostName>: the snippet names the one it defines, so it
    # works whatever networking.hostName says.
    assert data == {
        "builtins": True,
        "host": "laptop",
        "steam": [True] * len(STEAM),
        "other": False,
    }


def test_the_builtin_checks_allow_only_what_the_docs_allow(
    nix_instantiate: str, nixpkgs_lib: Path
) -> None:
    """With allowUnfree the builtin-gaming check would hide the documented failure."""
    expr = f"""
      let
        lib = import {nixpkgs_lib};
        config = args: (lib.last args.modules).nixpkgs.config;
        pkgs = {{
          stdenv.hostPlatform.system = "aarch64-linux";
          system = "aarch64-linux";
          runCommand = name: env: script: env;
          callPackage = f: args: {{ }};
        }};
        nixosSystem = args: {{ config.system.build.toplevel.drvPath = builtins.toJSON {{
          allowUnfree = (config args).allowUnfree or false;
          steam = map (pname: (config args).allowUnfreePredicate {{ inherit pname; }})
            {json.dumps(STEAM).replace(",", "")};
          other = (config args).allowUnfreePredicate {{ pname = "nvidia-x11"; }};
        }}; }};
        flake = import {REPO}/flake.nix;
        out = flake.outputs {{ self = out // {{ outPath = {REPO}; }};
                               nixpkgs = {{ lib = lib // {{ inherit nixosSystem; }};
                                 legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ]
                                   (_: pkgs); }}; }};
      in builtins.fromJSON out.checks.aarch64-linux.builtin-gaming.drv
    """
    data = _nix_json(nix_instantiate, expr)
    assert data == {"allowUnfree": False, "steam": [True] * len(STEAM), "other": False}


# --- The VM test's script ---------------------------------------------------------------------


def test_the_vm_test_script_compiles_and_checks_what_the_pid_cannot(
    nix_instantiate: str, nixpkgs_lib: Path
) -> None:
    """nix/vm-test.nix runs only under `nix flake check` on NixOS; here: its Python is valid and
    it looks at what a reload (which keeps the PID) would change."""
    expr = f"""
      let
        lib = import {nixpkgs_lib};
        pkgs = {{
          inherit lib;
          path = "/nix/store/{"1" * 32}-nixpkgs";
          writeText = name: _text: "/nix/store/{"2" * 32}-${{name}}";
          stdenv.hostPlatform.system = "x86_64-linux";
          testers.runNixOSTest = args: args;
        }};
        self = {{ outPath = "{REPO}"; nixosModules.default = {{ }}; }};
      in (import {REPO}/nix/vm-test.nix {{ inherit pkgs self; }}).testScript
    """
    script = _nix_json(nix_instantiate, expr)
    compile(script, "vm-test.nix testScript", "exec")
    assert "readlink -f" in script and "/etc/systemd/system/runtime-modules.service" in script
    assert "find /etc/runtime-modules" in script
    assert "rules reloaded" in script
    assert "systemd-analyze verify" in script
    assert script.count("assert_not_reloaded()") == 3  # defined, then after each switch
