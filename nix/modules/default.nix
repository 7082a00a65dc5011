# The built-in runtime modules, offered as rt.<name> when
# services.runtimeModules.builtinModules.enable is set. Each is an ordinary NixOS module that the
# base system does not import: enabling it at runtime adds it with extendModules.
{
  gaming = {
    desc = "Steam, Gamescope and GameMode";
    imports = [ ./gaming.nix ];
  };
  virtualization = {
    desc = "libvirt/QEMU virtual machines with virt-manager";
    imports = [ ./virtualization.nix ];
  };
  podman = {
    desc = "Podman containers with podman-compose";
    imports = [ ./podman.nix ];
  };
}
