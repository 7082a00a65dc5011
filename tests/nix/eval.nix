# Evaluates nixos-module.nix with the stubs and returns what the tests look at, as JSON data:
#   nix-instantiate --eval --strict --json tests/nix/eval.nix --arg lib 'import <nixpkgs-lib>/lib'
# `modules`: the configuration (default: the sample); `extend`: runtime modules to enable on top,
# passed through internal.moduleImports exactly as the generated flake does; `extraExtension`:
# more modules in that extension (e.g. one that changes pkgs, as an overlay would).
{
  lib,
  modules ? [ ./sample.nix ],
  extend ? [ ],
  extraExtension ? [ ],
  withMarker ? true,
}:

let
  base = lib.evalModules {
    modules = [
      ./stubs.nix
      ../../nixos-module.nix
      { _module.args.pkgs = import ./pkgs.nix { inherit lib; }; }
    ]
    ++ modules;
  };
  cfg = base.config.services.runtimeModules;
  # Without the marker: the module's own imports only (what a naive flake would pass).
  importsOf = name: if withMarker then cfg.internal.moduleImports.${name} else lib.init cfg.internal.moduleImports.${name};
  extended = base.extendModules { modules = lib.concatMap importsOf extend ++ extraExtension; };

  summary =
    c:
    let
      etc = c.environment.etc;
      registry = etc."runtime-modules/modules.json".source or null;
      rules = etc."runtime-modules/rules".source or null;
      # The unchecked folder: the checked one links it.
      rulesDir = if rules != null && rules ? env.rules then rules.env.rules else rules;
    in
    {
      etc = lib.mapAttrs (_: e: e.source) etc;
      registryText = if registry != null then registry.text else null;
      rulesChecked = rules != null && rules ? env.rules;
      rulesCheck = if rules != null && rules ? env.rules then rules.script else null;
      rulesScript = if rulesDir != null then rulesDir.script else null;
      rulesFromOptions =
        if rulesDir != null && rulesDir.env.fromOptions != null then rulesDir.env.fromOptions.text else null;
      hooks = lib.mapAttrs (_: e: e.source) (
        lib.filterAttrs (name: _: lib.hasPrefix "runtime-modules/hooks/" name) etc
      );
      # The script of a hook given as text (null for a path).
      hookTexts = lib.mapAttrs (_: e: e.source.text or null) (
        lib.filterAttrs (name: _: lib.hasPrefix "runtime-modules/hooks/" name) etc
      );
      udevRules = map (p: { inherit (p) destination text; }) c.services.udev.packages;
      service = c.systemd.services.runtime-modules or null;
      udev = c.services.udev.packages;
      tmpfiles = c.systemd.tmpfiles.rules;
      extraDependencies = map toString c.system.extraDependencies;
      groups = c.users.groups;
      systemPackages = c.environment.systemPackages;
      warnings = c.warnings;
      moduleImports = lib.mapAttrs (_: builtins.length) c.services.runtimeModules.internal.moduleImports;
      # Forces the assertions, as building the system would.
      toplevel = c.system.build.toplevel.drvPath;
    };
in
{
  base = summary base.config;
  extended = summary extended.config;
}
