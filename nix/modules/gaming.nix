# rt.gaming: Steam, Gamescope and GameMode.
#
# Steam is unfree: allow it in the base system, e.g.
#   nixpkgs.config.allowUnfreePredicate = pkg: builtins.elem (lib.getName pkg) [
#     "steam" "steam-unwrapped" "steam-original" "steam-run"
#   ];
# (build-time validation of the module reports it otherwise). Nothing here is kernel-level: the
# GPU driver belongs to the base system, since `nixos-rebuild test` cannot load a new one.
{ lib, ... }:
{
  programs.steam = {
    enable = true;
    gamescopeSession.enable = lib.mkDefault true;
  };
  programs.gamescope.enable = lib.mkDefault true;
  programs.gamemode.enable = lib.mkDefault true;
}
