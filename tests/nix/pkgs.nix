# A stand-in for nixpkgs' `pkgs`: the few builders nixos-module.nix calls, returning plain
# attribute sets that keep their inputs (so tests can read the generated text) and a fake store
# path that depends on the content (so equal inputs give equal paths, as in Nix).
# `salt` makes every path different, like an overlay that rebuilds everything.
{
  lib,
  salt ? "",
}:

let
  storePath =
    name: content:
    "/nix/store/${
      builtins.substring 0 32 (builtins.hashString "sha256" (salt + name + builtins.toJSON content))
    }-${name}";
  drv =
    name: attrs:
    attrs
    // {
      type = "derivation";
      inherit name;
      outPath = storePath name attrs;
    };
  package =
    name:
    drv name {
      pname = name;
      meta.mainProgram = name;
    };
in
{
  writeText = name: text: drv name { inherit text; };
  writeTextFile =
    {
      name,
      text,
      destination ? "",
      executable ? false,
    }:
    drv name { inherit text destination executable; };
  writeShellScript =
    name: text:
    drv name {
      inherit text;
      executable = true;
    };
  runCommand =
    name: env: script:
    drv name { inherit env script; };
  # nixos-module.nix's default package is `pkgs.callPackage ./nix/package.nix { }`.
  callPackage = _fn: _args: package "runtime-modules";
  gitMinimal = package "git";
  coreutils = package "coreutils";
  podman-compose = package "podman-compose";
}
