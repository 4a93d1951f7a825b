# services.herald.server: publish the fleet repository to per-host chroots, served by OpenSSH
# (default) or by herald itself, and run the MQTT broker that announces each release.
{ config, lib, pkgs, utils, ... }:
let
  inherit (lib) mkEnableOption mkIf mkMerge mkOption types;
  cfg = config.services.herald.server;
  herald = import ./lib.nix;
  format = pkgs.formats.toml { };
  schema = builtins.fromJSON (builtins.readFile ./schema/server.json);

  fleet = herald.readFleet cfg.fleetToml;
  hosts = herald.hostNames fleet;
  # Hosts named like a system user or group: their user and group would merge with it.
  reserved = herald.reservedHosts {
    inherit fleet;
    taken = builtins.attrNames config.ids.uids ++ builtins.attrNames config.ids.gids;
  };
  layout = herald.chrootLayout { inherit fleet; state = cfg.stateDir; };

  # server.toml, from the options below (nix/lib.nix); `settings` is merged over them. With
  # publishUnit, serve never publishes: herald-publish does, the only unit with the signing key.
  settings = lib.recursiveUpdate
    (herald.serverSettings cfg // lib.optionalAttrs cfg.publishUnit { publish = false; })
    cfg.settings;
  unknown = herald.unknownKeys schema settings;
  port = listen: lib.toInt (lib.last (lib.splitString ":" listen));
  exe = lib.getExe cfg.package;
  state = cfg.stateDir;

  # What herald-serve may still do when it does not publish (tests/test_privilege.py runs it so):
  # write the rollouts' `current` and the embedded server's uploads (chroot/), its run files, its
  # SFTP host key; with OpenSSH, read the logs the hosts' users uploaded (the page shows them).
  # The signing key lives alone in publisher/private/, hidden whole: a rotation renames files
  # inside it, which would undo a mount over the file itself. A restore moves the old state,
  # key included, into STATE.before-restore/.
  listeners = lib.filter (l: l != "off")
    ([ settings.mqtt settings.sftp settings.http ] ++ lib.optional (settings ? websocket) settings.websocket
      ++ lib.optional (settings ? tls) settings.tls.listen);
  capabilities = lib.optional (cfg.sftp == "openssh" || settings ? tls) "CAP_DAC_READ_SEARCH" # a TLS key may be ACME's
    ++ lib.optional (lib.any (l: port l < 1024) listeners) "CAP_NET_BIND_SERVICE";
  writable = [ "${state}/chroot" "${state}/run" ] ++ lib.optional (cfg.sftp == "embedded") "${state}/sftp";
  confined = {
    Type = "notify"; # ready once the broker listens and every host is announced (herald.serve)
    CapabilityBoundingSet = lib.concatStringsSep " " capabilities; # "": none
    InaccessiblePaths = [ "${state}/publisher/private" "-${state}.before-restore" ];
    ReadWritePaths = writable;
    # Before the namespace is set up ("+": outside it), what it names must exist (a restored
    # state has no run/, a first boot no publisher/private/), and what herald 0.1 left where
    # nothing hides it moves into what is hidden: its key (as publisher.signing.settle_key
    # moves it; two different keys are left for publish to refuse) and the states its restores
    # moved aside. Then publish once serve is ready ("-": a publish not queued fails nothing).
    ExecStartPre = [
      "+${pkgs.coreutils}/bin/mkdir -p ${lib.concatStringsSep " " writable}"
      "+${pkgs.coreutils}/bin/install -d -m 0700 ${state}/publisher/private ${state}.before-restore"
      "+${pkgs.writeShellScript "herald-settle" settle}"
    ];
    ExecStartPost = "-+${pkgs.systemd}/bin/systemctl start --no-block herald-publish.service";
  };
  settle = ''
    for name in signing.key signing.key.new; do
      if [ -e '${state}/publisher/'$name ] && [ ! -e '${state}/publisher/private/'$name ]; then
        ${pkgs.coreutils}/bin/mv -n '${state}/publisher/'$name '${state}/publisher/private/'$name
      fi
    done
    for old in '${state}'.before-restore-*; do
      if [ -d "$old" ]; then ${pkgs.coreutils}/bin/mv -n "$old" '${state}.before-restore/'"''${old##*-}"; fi
    done
  '';

  # Both units' sandbox; serve's `confined` and publish's network narrow it further.
  hardening = {
    ProtectSystem = "strict";
    ProtectHome = "read-only";
    PrivateTmp = true;
    NoNewPrivileges = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectControlGroups = true;
    RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
    LockPersonality = true;
  };

  announce = herald.announceUrls settings;
  publishCommand = utils.escapeSystemdExecArgs ([ exe "publish" "--fleet" cfg.fleet "--state" state ]
    ++ lib.concatMap (url: [ "--broker" url ]) announce
    ++ lib.optionals (settings ? prefix) [ "--prefix" settings.prefix ]);
  network = herald.publishNeedsNetwork { inherit fleet settings; } || cfg.build;
  # Builds go through the daemon (the store is read-only in the sandbox); nix's caches stay in the state.
  buildEnvironment = { NIX_REMOTE = "daemon"; XDG_CACHE_HOME = "${state}/publisher/cache"; };
in
{
  options.services.herald.server = {
    enable = mkEnableOption "the herald server: publisher, MQTT broker and the hosts' chroots";
    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      description = "The herald package.";
    };
    fleet = mkOption {
      type = types.str;
      example = "/srv/fleet";
      description = "The fleet repository's work tree on this machine (fleet.toml, hosts/, common/).";
    };
    fleetToml = mkOption {
      type = types.path;
      description = ''
        fleet.toml, read at evaluation time to create the host users and chroots. Usually a copy
        kept with this machine's configuration, or `"''${fleet-input}/fleet.toml"` from a flake input.
      '';
    };
    stateDir = mkOption { type = types.str; default = "/var/lib/herald"; description = "Releases, chroots, keys."; };
    sftp = mkOption {
      type = types.enum [ "openssh" "embedded" ];
      default = "openssh";
      description = "Who serves the chroots: OpenSSH (users, ChrootDirectory, internal-sftp) or herald itself.";
    };
    embeddedSftpListen = mkOption { type = types.str; default = "0.0.0.0:2222"; description = "With sftp = embedded."; };
    mqtt = {
      listen = mkOption { type = types.str; default = "0.0.0.0:1883"; description = "The embedded broker, or \"off\"."; };
      tls = mkOption {
        type = types.nullOr (types.submodule {
          options = {
            listen = mkOption { type = types.str; example = "0.0.0.0:8883"; };
            cert = mkOption { type = types.str; };
            key = mkOption { type = types.str; };
          };
        });
        default = null;
        description = "An MQTT-over-TLS listener.";
      };
      websocket = mkOption { type = types.nullOr types.str; default = null; description = "A WebSocket listener, HOST:PORT."; };
    };
    http = mkOption { type = types.str; default = "127.0.0.1:8080"; description = "Fleet page and /metrics, or \"off\"."; };
    publishEvery = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "5min";
      description = ''
        Publish again on this systemd interval: the timer starts herald-publish (with publishUnit
        = false, it reloads herald-serve, which publishes). Publishing also happens on start; a
        git hook (deploy/git/post-receive) publishes on push, and must then read the signing key:
        run it as root, or have it `systemctl start herald-publish` (README "The publisher key").
      '';
    };
    publishUnit = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Publish from herald-publish.service, the only unit that reads the signing key (README
        "The publisher key"). herald-serve starts it once it is ready (each time it starts); so
        do publishEvery and `systemctl start herald-publish`. herald-serve (broker, SFTP, page, rollouts) then runs
        with publish = false, no capabilities (CAP_DAC_READ_SEARCH with OpenSSH, to show the
        logs the hosts' users upload, or with mqtt.tls, whose key may belong to ACME's user;
        CAP_NET_BIND_SERVICE for a port below 1024), the key
        absent from its mount namespace (STATE/publisher/private/, and STATE.before-restore/ where
        `herald state restore` moves the state it replaces), and only chroot/, run/ and sftp/ of
        stateDir writable. Keep backup archives (they hold the key) out of its reach too:
        `systemd.services.herald-serve.serviceConfig.InaccessiblePaths`.
        herald-publish has no network but the loopback unless fleet.toml's [publish] runs a
        check or build, or the broker is external. false: herald-serve publishes (on start and
        on reload), as one root process.
      '';
    };
    build = mkOption {
      type = types.bool;
      default = herald.closureHosts fleet != [ ];
      defaultText = "true when fleet.toml has a host with deliver = \"closure\"";
      description = ''
        Build the systems of the hosts with deliver = "closure" (fleet.toml's [publish] system):
        herald-publish then reaches the network (substituters, flake inputs) and builds through
        the Nix daemon, keeping a GC root per kept release in stateDir/publisher/roots/.
      '';
    };
    openFirewall = mkOption { type = types.bool; default = false; description = "Open the SFTP and MQTT ports."; };
    settings = mkOption {
      type = format.type;
      default = { };
      description = "More server.toml settings, merged over the options above (checked against its schema).";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = unknown == [ ];
          message = "services.herald.server.settings: server.toml has no ${lib.concatStringsSep ", " unknown}";
        }
        {
          assertion = hosts != [ ];
          message = "services.herald.server.fleetToml: fleet.toml names no [hosts.<name>]";
        }
        {
          assertion = reserved == [ ];
          message = "services.herald.server.fleetToml: ${lib.concatStringsSep ", " reserved}: system user or group names on NixOS or Debian; each host's own user and group would merge with it: rename the host";
        }
        {
          assertion = cfg.mqtt.listen != "off" || (cfg.mqtt.tls == null && cfg.mqtt.websocket == null);
          message = "services.herald.server.mqtt: tls and websocket are listeners of the embedded broker; mqtt.listen = \"off\" disables it";
        }
        {
          assertion = !(lib.hasPrefix "/tmp" cfg.stateDir) || cfg.sftp == "embedded";
          message = "services.herald.server.stateDir: OpenSSH refuses chroots under /tmp; choose another directory";
        }
      ];

      environment.systemPackages = [ cfg.package ];

      systemd.services.herald-serve = {
        description = if cfg.publishUnit
          then "herald: the broker, SFTP server and fleet page (herald-publish publishes)"
          else "herald: publish the fleet, announce releases, serve the broker";
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" ];
        wants = [ "network-online.target" ];
        path = [ config.nix.package pkgs.git ];
        environment = lib.optionalAttrs (cfg.build && !cfg.publishUnit) buildEnvironment;
        serviceConfig = {
          ExecStart = "${exe} serve --config ${format.generate "server.toml" settings}";
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          Restart = "on-failure";
          RestartSec = 5;
          # A descriptor per connected host, and up to 8 more while it fetches (client/fetch.py
          # PARALLEL): 65536 serves ~7,000 hosts fetching at once; systemd's default soft 1024
          # ran out with ~64 hosts fetching a fleet-wide change.
          LimitNOFILE = 65536;
          ReadWritePaths = [ cfg.stateDir ];
          MemoryDenyWriteExecute = false; # cffi (cryptography) needs it
        } // hardening // lib.optionalAttrs cfg.publishUnit confined;
      };

      systemd.timers.herald-publish = mkIf (cfg.publishEvery != null) {
        wantedBy = [ "timers.target" ];
        timerConfig = { OnUnitActiveSec = cfg.publishEvery; OnBootSec = cfg.publishEvery; };
      };
      systemd.services.herald-publish =
        if cfg.publishUnit then {
          description = "herald: publish the fleet (the only unit that reads the signing key)";
          # Started by herald-serve once it is ready (not by a target: a switch would publish,
          # and wait for it, every time), by the timer and by `systemctl start herald-publish`.
          after = [ "herald-serve.service" "network-online.target" ];
          wants = [ "network-online.target" ];
          path = [ config.nix.package pkgs.git ];
          environment = lib.optionalAttrs cfg.build buildEnvironment;
          serviceConfig = {
            Type = "oneshot";
            ExecStart = publishCommand;
            ReadWritePaths = [ state ];
          } // hardening // lib.optionalAttrs (!network) { IPAddressDeny = "any"; IPAddressAllow = "localhost"; };
        }
        else mkIf (cfg.publishEvery != null) {
          serviceConfig = { Type = "oneshot"; ExecStart = "${pkgs.systemd}/bin/systemctl reload herald-serve.service"; };
        };


      # A host found running a generation this server lacks (a restore from an older backup):
      # serve writes it down, and publishing releases the host again above it.
      systemd.paths.herald-publish = mkIf cfg.publishUnit {
        wantedBy = [ "paths.target" ];
        pathConfig.PathChanged = "${state}/run/reported.json";
      };

      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall (
        lib.optional (cfg.mqtt.listen != "off") (port cfg.mqtt.listen)
        ++ lib.optional (cfg.mqtt.tls != null) (port cfg.mqtt.tls.listen)
        ++ lib.optional (cfg.sftp == "embedded") (port cfg.embeddedSftpListen)
      );
    }

    (mkIf (cfg.sftp == "openssh") {
      # The same users, chroot tree and Match block `herald server provision` makes elsewhere.
      users.groups = lib.genAttrs hosts (_: { });
      users.users = lib.genAttrs hosts (name: {
        isSystemUser = true;
        group = name;
        description = herald.mark;
        home = "/var/empty";
        shell = "${pkgs.shadow}/bin/nologin";
        hashedPassword = "*"; # key login only, also with UsePAM no
      });
      systemd.tmpfiles.rules = herald.tmpfilesRules layout;
      services.openssh = {
        enable = true;
        extraConfig = herald.sshdFragment { inherit fleet; state = cfg.stateDir; };
      };
    })
  ]);
}
