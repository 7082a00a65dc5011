# A sample runtime module: a lab VPN that needs a kernel module (kernel-level: reported in the
# registry's kernel_changes) and a package.
{ pkgs, ... }:
{
  boot.kernelModules = [ "wireguard" ];
  environment.systemPackages = [ pkgs.gitMinimal ];
  networking.wireguard.enable = true;
}
