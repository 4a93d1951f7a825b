{ ... }:
{
  imports = [
    ./hardware-configuration.nix
    ./common/base.nix
    ./common/users.nix
  ];
  networking.hostName = "alpha";
  environment.etc."motd".source = ./files/etc/motd;
}
