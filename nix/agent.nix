# services.herald.agent: keep this host on the release the herald server publishes for it.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkEnableOption mkIf mkOption types;
  cfg = config.services.herald.agent;
  herald = import ./lib.nix;
  format = pkgs.formats.toml { };
  schema = builtins.fromJSON (builtins.readFile ./schema/agent.json);

  # agent.toml, from the options below (nix/lib.nix); `settings` is merged over them. After a
  # deployment that changed agent.toml or the package, the agent asks systemd to restart it, so
  # that the unit's new ExecStart (the new package) runs: the switch itself does not restart it.
  restart = { restart.command = [ "${config.systemd.package}/bin/systemctl" "--no-block" "restart" "herald-agent.service" ]; };
  settings = lib.recursiveUpdate (lib.recursiveUpdate (herald.agentSettings cfg) restart) cfg.settings;
  unknown = herald.unknownKeys schema settings;
  knownHosts = pkgs.writeText "herald-known-hosts"
    "[${cfg.server.address}]:${toString cfg.server.port} ${cfg.server.hostKey}\n";
in
{
  options.services.herald.agent = {
    enable = mkEnableOption "the herald agent, which keeps this host on its published release";
    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      description = "The herald package.";
    };
    host = mkOption {
      type = types.str;
      default = config.networking.hostName;
      description = "This host's name in fleet.toml (and its SSH user on the server).";
    };
    server = {
      address = mkOption { type = types.str; description = "The herald server's address (SFTP)."; };
      port = mkOption { type = types.port; default = 22; description = "Its SSH port."; };
      hostKey = mkOption {
        type = types.str;
        example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA...";
        description = "The server's SSH host key, pinned: an unknown or changed key is refused.";
      };
    };
    sshKeyFile = mkOption {
      type = types.path;
      default = "/etc/herald/id_ed25519";
      description = "This host's SSH key; its public half is the host's ssh_key in fleet.toml.";
    };
    brokerUrl = mkOption {
      type = types.nullOr (types.either types.str (types.nonEmptyListOf types.str));
      default = null;
      example = "mqtts://herald.example.org:8883";
      description = "The MQTT broker, or a list of a cluster's nodes; without one the timer alone keeps the host converging.";
    };
    poll = mkOption { type = types.str; default = "15m"; description = "How often to check (each host at its own offset)."; };
    deliver = mkOption {
      type = types.nullOr (types.enum [ "source" "closure" ]);
      default = null;
      description = ''
        Which releases this host applies: null, what each release carries (fleet.toml's
        deliver for this host decides); "closure", only systems the publisher built (the host
        never evaluates: a small machine; nixos-rebuild and git leave the unit's path);
        "source", only configurations it builds itself (a host the server cannot build for).
      '';
    };
    operation = mkOption {
      type = types.nullOr (types.enum [ "switch" "boot" "test" ]);
      default = null;
      description = "switch, boot or test; null takes the host's operation from fleet.toml.";
    };
    confirmWindow = mkOption {
      type = types.str;
      default = "60s";
      description = "After a switch, the time to reach the server again (and pass the health command) before rolling back.";
    };
    healthCommand = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "systemctl" "is-system-running" "--wait" ];
      description = "A command that must exit 0 after a switch, or the switch is rolled back.";
    };
    localPage = mkOption {
      type = types.bool;
      default = true;
      description = "Serve the page with an Update now button on 127.0.0.1:9999.";
    };
    postpone = {
      onBattery = mkOption {
        type = types.bool;
        default = false;
        description = "Postpone a new generation while on battery; it runs once on mains (or when forced).";
      };
      onMetered = mkOption {
        type = types.bool;
        default = false;
        description = "Postpone a new generation while NetworkManager calls the connection metered.";
      };
    };
    reboot.window = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "02:00-04:00";
      description = ''
        Local time in which the agent may reboot by itself when the next boot runs another
        kernel, initrd or kernel modules than the booted one. Null: it only reports
        needs_reboot (in `herald status` and on the local page).
      '';
    };
    notify.enable = mkEnableOption ''
      desktop notifications (notify-send, through each logged-in user's session bus) when an
      update is applied, fails or is rolled back, and when a reboot is needed'';
    backups = {
      enable = mkEnableOption "restic backups to this host's backups/ directory on the herald server";
      paths = mkOption { type = types.listOf types.str; default = [ "/home" ]; description = "What to back up."; };
      passwordFile = mkOption { type = types.str; description = "restic's repository password file."; };
      timerConfig = mkOption {
        type = types.attrsOf types.str;
        default = { OnCalendar = "daily"; RandomizedDelaySec = "1h"; };
        description = "When to back up.";
      };
    };
    settings = mkOption {
      type = format.type;
      default = { };
      description = "More agent.toml settings, merged over the options above (checked against agent.toml's schema).";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = unknown == [ ];
        message = "services.herald.agent.settings: agent.toml has no ${lib.concatStringsSep ", " unknown}; see nix/schema/agent.json";
      }
      {
        assertion = builtins.match "(ssh-[a-z0-9-]+|ecdsa-[a-z0-9-]+) [A-Za-z0-9+/=]+.*" cfg.server.hostKey != null;
        message = "services.herald.agent.server.hostKey must be the server's SSH host key ('ssh-ed25519 AAAA...'); `herald serve` prints it, or run `herald enrol`";
      }
    ];

    environment.etc."herald/agent.toml".source = format.generate "agent.toml" settings;
    environment.systemPackages = [ cfg.package ];

    systemd.services.herald-agent = {
      description = "herald agent: keep this host on its configuration";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      # The agent runs the switch that would restart it: it must survive it. It restarts itself
      # afterwards, once the switch is confirmed, if agent.toml or the package changed.
      restartIfChanged = false;
      path = [ config.nix.package ]
        ++ lib.optionals (cfg.deliver != "closure") [ config.system.build.nixos-rebuild pkgs.git ]
        ++ lib.optional cfg.notify.enable pkgs.libnotify;
      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} agent --config /etc/herald/agent.toml";
        Restart = "always";
        RestartSec = 10;
        StateDirectory = "herald";
        StateDirectoryMode = "0700";
        KillMode = "process";
      };
    };

    services.restic.backups = mkIf cfg.backups.enable {
      herald = {
        repository = "sftp:${cfg.host}@${cfg.server.address}:/backups";
        inherit (cfg.backups) paths passwordFile timerConfig;
        initialize = true;
        extraOptions = [
          "sftp.command='ssh ${cfg.host}@${cfg.server.address} -p ${toString cfg.server.port} -i ${toString cfg.sshKeyFile} -o UserKnownHostsFile=${knownHosts} -s sftp'"
        ];
      };
    };
  };
}
