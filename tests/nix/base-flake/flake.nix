# The sample's base flake: a folder with a flake.nix, as `self.outPath` of a real flake is (the
# module checks that the flake it is given has one).
{
  outputs = _: { };
}
