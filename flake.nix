{
  description = "herald: keep a fleet of NixOS machines on the configuration kept in git";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: rec {
        herald = pkgs.callPackage ./nix/package.nix { };
        default = herald;
      });

      # `nix run <herald flake> -- enrol ...` or `-- agent --once --config agent.toml`
      apps = forAll (pkgs: {
        default = { type = "app"; program = "${self.packages.${pkgs.system}.herald}/bin/herald"; };
      });

      nixosModules = {
        server = ./nix/server.nix;
        agent = ./nix/agent.nix;
      };

      lib = import ./nix/lib.nix;

      checks = forAll (pkgs: {
        fleet = pkgs.testers.runNixOSTest (import ./nix/tests/fleet.nix { inherit self; });
      });
    };
}
