# herald as a Nix package, built from pyproject.toml.
{ lib, python3Packages, fetchPypi }:
let
  project = (builtins.fromTOML (builtins.readFile ../pyproject.toml)).project;
  py = python3Packages;
  # herald patches amqtt's internals (broker/fixes.py) as reviewed for this exact release.
  amqtt = py.amqtt.overridePythonAttrs (old: rec {
    version = "0.12.1";
    src = fetchPypi {
      pname = "amqtt";
      inherit version;
      hash = "sha256-cRLM4y+bnT8kq7H2DGBGlZCc1qMfieeeQwWFMm6+l9g=";
    };
    doCheck = false;
  });
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
