# rt.podman: Podman containers, rootless or not, with podman-compose.
#
# dockerCompat (a `docker` command that is podman) is left off: it conflicts with a Docker that
# the base system may already run. Set virtualisation.podman.dockerCompat in a module of your own.
{ lib, pkgs, ... }:
{
  virtualisation.podman = {
    enable = true;
    # Containers on the default network find each other by name.
    defaultNetwork.settings.dns_enabled = lib.mkDefault true;
  };
  environment.systemPackages = [ pkgs.podman-compose ];
}
