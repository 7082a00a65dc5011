# rt.virtualization: libvirt/QEMU virtual machines, managed with virt-manager.
#
# KVM itself is kernel-level and must be in the base system: the kvm-intel or kvm-amd module
# (hardware-configuration.nix usually lists it in boot.kernelModules) and any kernel parameters
# such as intel_iommu=on. Users who manage VMs belong to the "libvirtd" group; add them in the
# base (users.users.<name>.extraGroups) or in a module of your own next to this one.
{ lib, ... }:
{
  virtualisation.libvirtd.enable = true;
  programs.virt-manager.enable = lib.mkDefault true;
}
