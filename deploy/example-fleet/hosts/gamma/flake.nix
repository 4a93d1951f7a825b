{
  description = "gamma: a host configured as a flake";
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";
  outputs = { self, nixpkgs }: {
    nixosConfigurations.gamma = nixpkgs.lib.nixosSystem {
      system = "x86_64-linux";
      modules = [
        ./hardware-configuration.nix
        ./common/base.nix
        ./common/users.nix
        { networking.hostName = "gamma"; }
      ];
    };
  };
}
