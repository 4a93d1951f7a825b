{ ... }:
{
  imports = [
    ./hardware-configuration.nix
    ./common/base.nix
    ./common/users.nix
  ];
  networking.hostName = "beta";
  environment.etc."motd".source = ./files/etc/motd;
}
