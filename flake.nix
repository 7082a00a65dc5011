{
  description = "runtime-modules: switch NixOS modules on and off at runtime, by hand or by rules";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # The daemon follows udev and netlink: Linux only.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
      });

      overlays.default = final: _prev: {
        runtime-modules = final.callPackage ./nix/package.nix { };
      };

      # The module builds the package with the system's own nixpkgs (see its `package` option).
      nixosModules = {
        default = ./nixos-module.nix;
        # The reference project's name for the same module.
        runtimeModules = ./nixos-module.nix;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (ps: [
              ps.pydantic
              ps.pyudev
              ps.pyroute2
              (ps.systemd-python or ps.systemd)
              ps.pytest
              ps.pytest-mock
              ps.pytest-timeout
              ps.hypothesis
              ps.mypy
              ps.pygobject3
            ]))
            pkgs.ruff
            pkgs.umockdev
            pkgs.iproute2
            pkgs.nix
          ];
          # The NixOS module tests evaluate it with nixpkgs' lib (tests/fixtures/system.py).
          NIXPKGS_LIB = "${nixpkgs}/lib";
          GI_TYPELIB_PATH = "${pkgs.umockdev.out}/lib/girepository-1.0";
        };
      });

      checks = forAllSystems (
        pkgs:
        {
          package = self.packages.${pkgs.system}.default;
        }
        # A virtual NIC is hot-plugged into a VM and a runtime module comes up. x86 only: the
        # test plugs a PCI device into QEMU's i440fx bus, which aarch64's "virt" machine lacks.
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
          vm-test = import ./nix/vm-test.nix { inherit pkgs self; };
        }
        # Each built-in module evaluates on top of a minimal system (evaluated, not built: the
        # closure of rt.gaming alone is gigabytes).
        // lib.mapAttrs' (
          name: m:
          let
            system = nixpkgs.lib.nixosSystem {
              inherit (pkgs) system;
              modules = m.imports ++ [
                {
                  boot.loader.grub.enable = false;
                  fileSystems."/" = {
                    device = "/dev/null";
                    fsType = "ext4";
                  };
                  system.stateVersion = lib.trivial.release;
                  # What README.md and docs/nixos.md tell users to allow, no more: with
                  # allowUnfree the check would pass where their build fails.
                  nixpkgs.config.allowUnfreePredicate =
                    pkg:
                    builtins.elem (lib.getName pkg) [
                      "steam"
                      "steam-unwrapped"
                      "steam-original"
                      "steam-run"
                    ];
                }
              ];
            };
          in
          lib.nameValuePair "builtin-${name}" (
            pkgs.runCommand "runtime-modules-builtin-${name}" {
              drv = builtins.unsafeDiscardStringContext system.config.system.build.toplevel.drvPath;
            } ''echo "$drv" > $out''
          )
        ) (import ./nix/modules)
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
