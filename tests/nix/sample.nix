# A sample configuration of services.runtimeModules, as a user would write it.
{ ... }:
{
  networking.hostName = "laptop";
  boot.kernelModules = [ "kvm-amd" ];

  services.runtimeModules = {
    enable = true;
    flake = {
      outPath = toString ./base-flake;
      narHash = "sha256-Q0s6KkG8c1TqKcI3Qe2K2Y2m1hC8b0a5G9G2d2a2b2c=";
    };
    builtinModules.enable = true;
    modules = [
      {
        name = "lab";
        desc = "Lab VPN and tools";
        imports = [ ./lab.nix ];
      }
      {
        name = "office";
        desc = "Printing";
        imports = [ { services.printing.enable = true; } ];
      }
    ];
    rules = [
      {
        name = "gaming-on-nvidia-gpu";
        description = "Steam while an NVIDIA GPU is present";
        modules = [ "rt.gaming" ];
        settle = "2s";
        when.device = {
          subsystem = "pci";
          properties.RUNTIME_MODULES_GPU_VENDOR = "nvidia";
        };
      }
      {
        name = "virtualization-when-docked";
        modules = [ "rt.virtualization" ];
        linger = 120;
        when.any = [
          { device.properties.RUNTIME_MODULES_CLASS = "thunderbolt-peripheral"; }
          {
            device.properties = {
              RUNTIME_MODULES_CLASS = "net";
              RUNTIME_MODULES_NET_BUS = "usb";
            };
          }
        ];
      }
    ];
    ruleFiles = [ ./sample-rules.toml ];
    hooks.preApply."10-guard" = ''
      echo "about to apply: $RUNTIME_MODULES_AFTER"
    '';
    hooks.postApply."50-notify" = "/run/current-system/sw/bin/true";
    controlGroup = "wheel";
    logLevel = "debug";
    settle = 0.5;
    linger = 45;
  };
}
