# NixOS VM test (flake check `vm-test`): a virtual NIC is hot-plugged into the VM through the QEMU
# monitor, the udev rules classify it, a rule wants the "lab" runtime module, and the daemon
# switches it on with `nixos-rebuild test`, without restarting itself; unplugged, the module goes
# away again after its linger.
#
# Runtime modules extend nixosConfigurations.<host> of a flake, so the VM first switches into a
# base system built from a flake in /etc/nixos, whose inputs (nixpkgs and this repository) are
# `path:` references to store paths the VM already has. Everything is offline: like nixpkgs'
# nixos-rebuild tests, the VM carries the build dependencies of its own system
# (system.includeBuildDependencies), which covers what the base and the extended system build.
{ pkgs, self }:

let
  inherit (pkgs) lib;

  nixpkgsSource = "${pkgs.path}";
  hotplugMac = "52:54:00:12:34:99";
  # udev's net_id builtin names an interface by its MAC as enx<MAC without colons>.
  hotplugMacName = "enx" + lib.replaceStrings [ ":" ] [ "" ] hotplugMac;

  labModule = pkgs.writeText "lab.nix" ''
    # The runtime module under test: visible in /etc and as a unit.
    { pkgs, ... }:
    {
      environment.etc."lab-module".text = "up";
      systemd.services.lab-marker = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "''${pkgs.coreutils}/bin/true";
        };
      };
    }
  '';

  configuration = pkgs.writeText "configuration.nix" ''
    { lib, modulesPath, ... }:
    {
      imports = [
        ./hardware-configuration.nix
        "''${modulesPath}/testing/test-instrumentation.nix"
      ];
      boot.loader.grub.enable = false;
      documentation.enable = false;
      networking.hostName = "machine";
      nix.settings = {
        experimental-features = [ "nix-command" "flakes" ];
        substituters = lib.mkForce [ ];
      };
      system.stateVersion = lib.trivial.release;

      services.runtimeModules = {
        enable = true;
        modules = [
          { name = "lab"; desc = "The module under test"; imports = [ ./lab.nix ]; }
        ];
        rules = [
          {
            name = "lab-while-hotplugged-nic";
            modules = [ "lab" ];
            settle = "1s";
            linger = "1s";
            when.device = {
              subsystem = "net";
              properties = {
                RUNTIME_MODULES_CLASS = "net";
                RUNTIME_MODULES_NET_BUS = "pci";
                ID_NET_NAME_MAC = "${hotplugMacName}";
              };
            };
          }
        ];
      };
    }
  '';

  flake = pkgs.writeText "flake.nix" ''
    {
      inputs.nixpkgs.url = "path:${nixpkgsSource}";
      inputs.runtime-modules = {
        url = "path:${self}";
        inputs.nixpkgs.follows = "nixpkgs";
      };
      outputs = { self, nixpkgs, runtime-modules }: {
        nixosConfigurations.machine = nixpkgs.lib.nixosSystem {
          system = "${pkgs.stdenv.hostPlatform.system}";
          modules = [
            ./configuration.nix
            runtime-modules.nixosModules.default
            { services.runtimeModules.flake = self; }
          ];
        };
      };
    }
  '';
in
pkgs.testers.runNixOSTest {
  name = "runtime-modules";

  nodes.machine =
    { lib, ... }:
    {
      # The VM's own system carries the package and its build inputs, so that the base system
      # built inside the VM finds them in the store.
      imports = [ self.nixosModules.default ];
      services.runtimeModules = {
        enable = true;
        flakeUrl = "path:/etc/nixos";
        hostName = "machine";
      };

      system.includeBuildDependencies = true;
      system.extraDependencies = [
        nixpkgsSource
        "${self}"
      ];
      nix.settings = {
        substituters = lib.mkForce [ ];
        hashed-mirrors = null;
        connect-timeout = 1;
        experimental-features = [
          "nix-command"
          "flakes"
        ];
      };
      virtualisation = {
        cores = 2;
        memorySize = 4096;
        diskSize = 8192;
      };
    };

  testScript = ''
    machine.start()
    machine.wait_for_unit("multi-user.target")

    machine.succeed("nixos-generate-config")
    machine.copy_from_host("${flake}", "/etc/nixos/flake.nix")
    machine.copy_from_host("${configuration}", "/etc/nixos/configuration.nix")
    machine.copy_from_host("${labModule}", "/etc/nixos/lab.nix")

    # What an extended system must not change. The unit has reloadIfChanged, so a changed unit
    # is reloaded and keeps its PID: the PID alone cannot tell. These are the store paths of the
    # unit file and of everything the module puts in /etc.
    def identity():
        return machine.succeed(
            "for f in /etc/systemd/system/runtime-modules.service"
            " $(find /etc/runtime-modules -mindepth 1 | sort);"
            ' do echo "$f -> $(readlink -f "$f")"; done'
        )

    def assert_not_reloaded():
        # The daemon logs this on SIGHUP, which switch-to-configuration sends to a changed unit.
        machine.fail(
            f"journalctl -u runtime-modules.service --since '{since}' --no-pager"
            " | grep -q 'rules reloaded'"
        )

    with subtest("switch into a base system built from the flake"):
        machine.succeed("nixos-rebuild test --flake /etc/nixos#machine >&2")
        machine.wait_for_unit("runtime-modules.service")
        machine.succeed("runtime-modules list >&2")
        machine.fail("test -e /etc/lab-module")
        daemon_pid = machine.succeed("systemctl show -P MainPID runtime-modules.service").strip()
        base_identity = identity()
        # Reloads count from here on, not during the switch into the base.
        machine.succeed("sleep 1")
        since = machine.succeed("date '+%Y-%m-%d %H:%M:%S'").strip()

    with subtest("the unit NixOS renders verifies without warnings"):
        # --recursive-errors=no: only this unit, not every unit it names.
        verify = machine.succeed(
            "systemd-analyze verify --recursive-errors=no"
            " /etc/systemd/system/runtime-modules.service 2>&1"
        )
        assert verify.strip() == "", f"systemd-analyze verify warns:\n{verify}"

    with subtest("hot-plug a NIC: the udev rules classify it"):
        machine.send_monitor_command("netdev_add user,id=hotplug0")
        machine.send_monitor_command(
            "device_add virtio-net-pci,netdev=hotplug0,id=hotnic0,mac=${hotplugMac}"
        )
        address = machine.wait_until_succeeds("grep -l '${hotplugMac}' /sys/class/net/*/address")
        device = address.strip().removesuffix("/address")
        machine.wait_until_succeeds(f"udevadm info {device} | grep -qx 'E: RUNTIME_MODULES_NET_BUS=pci'")
        machine.succeed(f"udevadm info {device} | grep -qx 'E: RUNTIME_MODULES_CLASS=net'")
        machine.succeed(f"udevadm info {device} | grep -q '^E: TAGS=.*:runtime-modules:'")

    with subtest("the rule brings the lab module up, without restarting the daemon"):
        machine.wait_until_succeeds("test \"$(cat /etc/lab-module)\" = up", timeout=900)
        machine.succeed("systemctl is-active lab-marker.service")
        machine.succeed("runtime-modules status >&2")
        pid_after = machine.succeed("systemctl show -P MainPID runtime-modules.service").strip()
        assert pid_after == daemon_pid, f"the daemon was restarted: {daemon_pid} -> {pid_after}"
        extended_identity = identity()
        assert extended_identity == base_identity, (
            f"the extended system changed the unit or /etc/runtime-modules:\n"
            f"{base_identity}\n->\n{extended_identity}"
        )
        assert_not_reloaded()

    with subtest("unplug it: the module goes away after its linger"):
        machine.send_monitor_command("device_del hotnic0")
        machine.wait_until_fails("test -e /etc/lab-module", timeout=900)
        machine.fail("systemctl is-active lab-marker.service")
        pid_after = machine.succeed("systemctl show -P MainPID runtime-modules.service").strip()
        assert pid_after == daemon_pid, f"the daemon was restarted: {daemon_pid} -> {pid_after}"
        assert identity() == base_identity, "switching back changed the unit or /etc/runtime-modules"
        assert_not_reloaded()
  '';
}
