# A stub base system for the runtime-modules tests (tests/fixtures/applier.py copies it to a
# temporary folder next to a base.json). It has what the generated flake uses of a NixOS system:
# `config.services.runtimeModules.internal.moduleImports` (one import per module, a marker
# carrying the module's name) and an `extendModules` whose result records, in
# `config.runtimeModulesStub.arrived`, exactly which imports reached it; `baseVersion` tells
# which copy of the base was evaluated (the pinning test changes it).
{
  description = "Stub base system for the runtime-modules tests";

  outputs = { self }:
    let
      spec = builtins.fromJSON (builtins.readFile ./base.json);
      moduleImports = builtins.listToAttrs (map
        (name: {
          inherit name;
          value = [{ runtimeModulesStub.marker = name; }];
        })
        spec.modules);
      system = arrived: {
        config = {
          services.runtimeModules.internal.moduleImports = moduleImports;
          runtimeModulesStub.arrived = arrived;
          runtimeModulesStub.baseVersion = spec.version or 1;
        };
        extendModules = { modules ? [ ], ... }: system (arrived ++ modules);
      };
    in
    {
      nixosConfigurations.${spec.host} = system [ ];
    };
}
