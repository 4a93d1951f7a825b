# A stand-in for what the NixOS modules take from nixpkgs (the few lib functions and packages
# they use, option defaults, mkIf and mkMerge), in builtins only, so that tests/test_nix.py can
# evaluate nix/server.nix and nix/agent.nix where there is no nixpkgs. It is not the module
# system: no types are checked and an undeclared option is not caught. It returns the module's
# `config`, with mkIf and mkMerge resolved as NixOS resolves them (attribute sets merged, lists
# concatenated, equal values kept).
#
# A file pkgs.formats.toml generates is named "/nix/store/<hash>-<name>#<its value as JSON>", and
# a script of pkgs.writeShellScript "/nix/store/<hash>-<name>#<its text>", so that a test can
# read back the server.toml a unit's ExecStart names, and run a unit's script.
{ module, values, config ? { } }: # config: replaces parts of `machine` below
let
  b = builtins;
  kind = v: if b.isAttrs v then v._type or null else null;
  absent = { _type = "absent"; };
  package = name: {
    type = "derivation";
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta.mainProgram = name;
  };

  types =
    let t = name: { inherit name; };
    in {
      str = t "str"; bool = t "bool"; path = t "path"; package = t "package"; port = t "port";
      enum = _: t "enum"; nullOr = _: t "nullOr"; listOf = _: t "listOf";
      nonEmptyListOf = _: t "nonEmptyListOf"; attrsOf = _: t "attrsOf";
      either = _: _: t "either"; submodule = _: t "submodule";
    };

  lib = rec {
    inherit types;
    inherit (b) filter any concatMap concatStringsSep;
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: mkOption { type = types.bool; default = false; description = "Whether to enable ${name}."; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    optionalAttrs = c: attrs: if c then attrs else { };
    genAttrs = names: f: b.listToAttrs (map (name: { inherit name; value = f name; }) names);
    hasPrefix = prefix: s: b.substring 0 (b.stringLength prefix) s == prefix;
    last = xs: b.elemAt xs (b.length xs - 1);
    splitString = sep: s: b.filter b.isString (b.split sep s); # the modules split on ":" only
    toInt = s: if b.match "[0-9]+" s != null then b.fromJSON s else b.throw "toInt: ${s}";
    recursiveUpdate = lhs: rhs:
      lhs // b.mapAttrs
        (name: value:
          if b.isAttrs value && lhs ? ${name} && b.isAttrs lhs.${name} && kind value == null
          then recursiveUpdate lhs.${name} value else value)
        rhs;
    escapeShellArg = arg: "'${b.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
    escapeShellArgs = args: b.concatStringsSep " " (map escapeShellArg args);
    getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram}";
  };

  pkgs = {
    callPackage = _: _: package "herald";
    formats.toml = _: {
      type = types.attrsOf null;
      generate = name: value: "/nix/store/00000000000000000000000000000000-${name}#${b.toJSON value}";
    };
    writeText = name: _: "/nix/store/00000000000000000000000000000000-${name}";
    writeShellScript = name: text: "/nix/store/00000000000000000000000000000000-${name}#${text}";
  } // b.listToAttrs (map (name: { inherit name; value = package name; })
    [ "git" "coreutils" "systemd" "shadow" "libnotify" ]);

  # What else of the machine's configuration the modules read.
  machine = {
    ids = { uids = { root = 0; nobody = 65534; sshd = 999; }; gids = { root = 0; wheel = 1; }; };
    nix.package = package "nix";
    systemd.package = package "systemd";
    networking.hostName = "alpha";
    system.build.nixos-rebuild = package "nixos-rebuild";
  };

  defaults = options:
    if kind options == "option" then options.default or (b.throw "an option with no default was read")
    else b.mapAttrs (_: defaults) options;

  merge = left: right:
    if kind left == "absent" then right
    else if kind right == "absent" then left
    else if b.isAttrs left && b.isAttrs right && !(left ? outPath)
    then left // b.mapAttrs (name: value: if left ? ${name} then merge left.${name} value else value) right
    else if b.isList left && b.isList right then left ++ right
    else if left == right then left
    else b.throw "conflicting definitions: ${b.toJSON left} and ${b.toJSON right}";

  resolve = value:
    if kind value == "if" then (if value.condition then resolve value.content else absent)
    else if kind value == "merge" then b.foldl' merge absent (map resolve value.contents)
    else if b.isAttrs value && !(value ? outPath) then
      let resolved = b.mapAttrs (_: resolve) value;
      in b.removeAttrs resolved (b.filter (name: kind resolved.${name} == "absent") (b.attrNames resolved))
    else value;

  # nixpkgs' nixos/lib/utils.nix: JSON strings with systemd's specifiers escaped.
  utils.escapeSystemdExecArgs = args:
    b.concatStringsSep " " (map (arg: b.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (b.toJSON (toString arg))) args);

  evaluated = import module { inherit lib pkgs utils; config = full; };
  full = lib.recursiveUpdate (machine // config) (lib.recursiveUpdate (defaults evaluated.options) values);
in
resolve evaluated.config
