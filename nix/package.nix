# herald as a Nix package, built from pyproject.toml.
{ lib, python3Packages, fetchPypi }:
let
  project = (builtins.fromTOML (builtins.readFile ../pyproject.toml)).project;
  py = python3Packages;
  # herald patches amqtt's internals (broker/fixes.py) as reviewed for this exact release, so it is
  # built here as its own package: nixpkgs' amqtt recipe is a 2022 snapshot (poetry-core, a
  # `transitions = "^0.8.0"` line 0.12.1 no longer has, none of its new dependencies). 0.12.1
  # builds with hatchling (hatch-vcs and uv-dynamic-versioning are listed, but the version in its
  # pyproject.toml is static) and needs what its METADATA's Requires-Dist says.
  amqtt = py.buildPythonPackage rec {
    pname = "amqtt";
    version = "0.12.1";
    pyproject = true;
    src = fetchPypi {
      inherit pname version;
      hash = "sha256-cRLM4y+bnT8kq7H2DGBGlZCc1qMfieeeQwWFMm6+l9g=";
    };
    build-system = with py; [ hatchling hatch-vcs ] ++ lib.optional (py ? uv-dynamic-versioning) py.uv-dynamic-versioning;
    dependencies = with py; [
      dacite
      psutil # the $SYS plugin
      pwdlib
      argon2-cffi # pwdlib[argon2]
      pyyaml
      transitions
      typer # amqtt's own command-line tools only
      typing-extensions
      websockets
    ];
    # amqtt pins websockets==15.0.1 but uses only websockets.asyncio (there since 13.0); typer
    # and psutil serve its CLI tools and $SYS plugin, whose APIs it uses are older than its pins.
    pythonRelaxDeps = [ "websockets" "typer" "psutil" ];
    pythonImportsCheck = [ "amqtt.broker" ];
    doCheck = false; # herald's own tests run the broker, with the regressions it works around
    meta = {
      description = "MQTT client and broker (the release herald's embedded broker is written against)";
      homepage = "https://github.com/Yakifo/amqtt";
      license = lib.licenses.mit;
    };
  };
in
py.buildPythonApplication {
  pname = project.name;
  inherit (project) version;
  pyproject = true;
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let base = baseNameOf path;
      in !(builtins.elem base [ ".venv" ".git" "tests" "bench" ".mypy_cache" ".ruff_cache" ".pytest_cache" ]);
  };
  build-system = [ py.hatchling ];
  dependencies = with py; [
    paho-mqtt aiomqtt asyncssh msgspec loguru rich cryptography zstandard
    # the server extra: herald serve
    amqtt aiohttp prometheus-client
  ];
  # nixpkgs' versions of the other libraries differ from pyproject.toml's pins.
  pythonRelaxDeps = true;
  doCheck = false; # herald's tests need sshd, Mosquitto and root: they run in herald's CI
  meta = {
    description = project.description;
    license = lib.licenses.mit;
    mainProgram = "herald";
    platforms = lib.platforms.linux;
  };
}
