# Without flakes: imports = [ (import ./path/to/herald/nix).server ];
{
  server = ./server.nix;
  agent = ./agent.nix;
  lib = import ./lib.nix;
  package = ./package.nix;
}
