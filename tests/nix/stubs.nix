# Stand-ins for the NixOS options that nixos-module.nix sets or reads, so that it evaluates with
# nixpkgs' lib.evalModules alone. Everything not declared here is accepted as freeform data; the
# options that several modules define (lists, attribute sets) are declared so that they merge.
{ config, lib, ... }:

let
  inherit (lib) mkOption types;
  list = mkOption {
    type = types.listOf types.raw;
    default = [ ];
  };
  attrs = mkOption {
    type = types.attrsOf (types.attrsOf types.raw);
    default = { };
  };
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
in
{
  config._module.freeformType = types.lazyAttrsOf types.anything;

  options = {
    assertions = list;
    warnings = list;
    environment.systemPackages = list;
    environment.etc = attrs;
    services.udev.packages = list;
    systemd.tmpfiles.rules = list;
    system.extraDependencies = list;
    systemd.services = attrs;
    users.groups = attrs;
    networking.hostName = mkOption {
      type = types.str;
      default = "nixos";
    };
    nix.package = mkOption { type = types.raw; };
    system.build = mkOption {
      type = types.lazyAttrsOf types.raw;
      default = { };
    };
    # The kernel-level options the module compares between the base and an extended system.
    boot.kernelModules = list;
    boot.kernelParams = list;
    boot.extraModulePackages = list;
    boot.blacklistedKernelModules = list;
    boot.extraModprobeConfig = mkOption {
      type = types.lines;
      default = "";
    };
  };

  config = {
    # nixpkgs' nixos/modules/system/boot/systemd.nix warns about these units on every build; the
    # tests assert that the module's configuration produces no warnings.
    warnings = lib.concatLists (
      lib.mapAttrsToList (
        name: service:
        lib.optional ((service.reloadIfChanged or false) && (service.reloadTriggers or [ ]) != [ ])
          "Service '${name}.service' has both 'reloadIfChanged' and 'reloadTriggers' set. This is probably not what you want, because 'reloadTriggers' behave the same whay as 'restartTriggers' if 'reloadIfChanged' is set."
      ) config.systemd.services
    );
    nix.package = {
      type = "derivation";
      name = "nix";
      outPath = "/nix/store/00000000000000000000000000000000-nix";
    };
    system.build = {
      nixos-rebuild = {
        type = "derivation";
        name = "nixos-rebuild";
        outPath = "/nix/store/00000000000000000000000000000000-nixos-rebuild";
      };
      # Like NixOS: the system cannot be built while an assertion fails.
      toplevel.drvPath =
        if failed == [ ] then
          "/nix/store/${builtins.hashString "sha256" (builtins.toJSON config.environment.etc)}-toplevel.drv"
        else
          throw "Failed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failed}";
    };
  };
}
