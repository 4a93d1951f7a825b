# A server and two hosts: a change published reaches both; a host offline during a publish
# catches up; with the broker stopped, the timer converges the fleet. Needs Nix with nixpkgs:
#     nix flake check    (or: nix build .#checks.x86_64-linux.fleet)
{ self }:
{ pkgs, lib, ... }:
let
  keys = ./keys;
  key = name: lib.removeSuffix "\n" (builtins.readFile "${keys}/${name}.pub");
  fleetToml = pkgs.writeText "fleet.toml" ''
    [hosts.alpha]
    ssh_key = "${key "alpha"}"

    [hosts.beta]
    ssh_key = "${key "beta"}"
  '';
  fleetRepo = pkgs.runCommand "fleet" { } ''
    mkdir -p $out/common $out/hosts/alpha $out/hosts/beta
    cp ${fleetToml} $out/fleet.toml
    echo '{ ... }: { time.timeZone = "UTC"; }' > $out/common/base.nix
    for host in alpha beta; do
      ln -s ../../common $out/hosts/$host/common
      echo "{ ... }: { imports = [ ./common/base.nix ]; networking.hostName = \"$host\"; }" \
        > $out/hosts/$host/configuration.nix
    done
  '';
  agent = name: { ... }: {
    imports = [ self.nixosModules.agent ];
    environment.etc."herald/id_ed25519" = { source = "${keys}/${name}"; mode = "0600"; };
    services.herald.agent = {
      enable = true;
      host = name;
      server = { address = "server"; hostKey = key "server"; };
      brokerUrl = "mqtt://server:1883";
      poll = "10s";
      localPage = false;
      # The VM cannot build a NixOS system offline: a stand-in records what it was asked.
      settings.rebuild = {
        command = [ "${pkgs.bash}/bin/sh" "-c" "echo {operation} {dir} >> /var/lib/herald/rebuilt" ];
        rollback = [ "${pkgs.coreutils}/bin/true" ];
      };
    };
  };
in
{
  # The nixpkgs the test ran against, in its name (`nix flake check` and the build log show it):
  # herald's modules and package were written against the one flake.nix pins.
  name = "herald-fleet-nixpkgs-${lib.version}";
  nodes = {
    server = { ... }: {
      imports = [ self.nixosModules.server ];
      environment.etc."ssh/herald_test_host_key" = { source = "${keys}/server"; mode = "0600"; };
      services.openssh.hostKeys = [ { path = "/etc/ssh/herald_test_host_key"; type = "ed25519"; } ];
      services.herald.server = {
        enable = true;
        fleet = "/srv/fleet";
        inherit fleetToml;
        openFirewall = true;
      };
      networking.firewall.allowedTCPPorts = [ 22 ];
      systemd.services.herald-serve.preStart = ''
        if [ ! -d /srv/fleet ]; then cp -rL --no-preserve=mode ${fleetRepo} /srv/fleet; fi
      '';
      systemd.services.herald-serve.serviceConfig.ReadWritePaths = [ "/srv" ];
    };
    alpha = agent "alpha";
    beta = agent "beta";
  };

  testScript = ''
    start_all()
    server.wait_for_unit("herald-serve.service")
    server.wait_for_open_port(22)
    server.wait_for_open_port(1883)
    for host in (alpha, beta):
        host.wait_for_unit("herald-agent.service")
        host.wait_until_succeeds("grep -q 'switch /var/lib/herald/trees/1' /var/lib/herald/rebuilt", timeout=120)

    with subtest("a change published reaches both hosts"):
        server.succeed("echo '# a change' >> /srv/fleet/common/base.nix && systemctl reload herald-serve")
        for host in (alpha, beta):
            host.wait_until_succeeds("grep -q trees/2 /var/lib/herald/rebuilt", timeout=60)

    with subtest("a host offline during a publish catches up"):
        beta.succeed("systemctl stop herald-agent")
        server.succeed("echo '# for beta' >> /srv/fleet/hosts/beta/configuration.nix && systemctl reload herald-serve")
        alpha.sleep(5)
        beta.fail("grep -q trees/3 /var/lib/herald/rebuilt")
        beta.succeed("systemctl start herald-agent")
        beta.wait_until_succeeds("grep -q trees/3 /var/lib/herald/rebuilt", timeout=60)

    with subtest("with the broker stopped, the timer converges the fleet"):
        server.succeed("systemctl stop herald-serve")
        server.succeed("echo '# no broker' >> /srv/fleet/common/base.nix")
        server.succeed("herald publish --fleet /srv/fleet --state /var/lib/herald")
        alpha.wait_until_succeeds("grep -q trees/3 /var/lib/herald/rebuilt", timeout=60)
        beta.wait_until_succeeds("grep -q trees/4 /var/lib/herald/rebuilt", timeout=60)
  '';
}
