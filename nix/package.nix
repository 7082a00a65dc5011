# The runtime-modules package: the `runtime-modules` command (CLI and daemon) from pyproject.toml,
# plus the files the NixOS module and hand installs use (udev rules, systemd unit, example hooks).
{
  lib,
  python3Packages,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;
in
python3Packages.buildPythonApplication {
  pname = "runtime-modules";
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the build reads: a change to tests or docs does not rebuild the system.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../runtime_modules
      ../udev
      ../systemd
      ../hooks
    ];
  };

  build-system = [ python3Packages.setuptools ];

  # pyproject.toml's [project] dependencies; tests/test_nixos_module.py keeps the lists in step.
  dependencies = [
    python3Packages.pydantic
    python3Packages.pyudev
    python3Packages.pyroute2
    # python-systemd; nixpkgs renamed its attribute from `systemd` to `systemd-python`.
    (python3Packages.systemd-python or python3Packages.systemd)
  ];

  postInstall = ''
    install -Dm644 udev/90-runtime-modules.rules -t $out/lib/udev/rules.d
    install -Dm644 systemd/runtime-modules.service -t $out/share/runtime-modules/systemd
    mkdir -p $out/share/runtime-modules
    cp -r hooks $out/share/runtime-modules/hooks
  '';

  # The test suite needs root, a running udevd and journald, network namespaces and Nix itself:
  # it runs in CI (scripts/test) and in the NixOS VM test, not in the build sandbox.
  doCheck = false;
  pythonImportsCheck = [ "runtime_modules" ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "runtime-modules";
    platforms = lib.platforms.linux;
  };
}
