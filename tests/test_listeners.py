"""The embedded broker's optional listeners: MQTT over TLS and over WebSocket (server.toml)."""

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import HERALD, Fleet, Proc, Serve, herald, make_agent, wait_until

from protocol.topics import ADMIN_USER


def self_signed(where: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herald test broker")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = where / "broker.crt", where / "broker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_serve(fleet: Fleet, state: Path, logs: Path, tmp_path: Path):
    cert, key = self_signed(tmp_path)
    config = tmp_path / "server.toml"
    config.write_text(
        f"""\
fleet = "{fleet.root}"
state = "{state}"
mqtt = "127.0.0.1:0"
sftp = "127.0.0.1:0"
websocket = "127.0.0.1:0"

[tls]
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
"""
    )
    proc = Proc("serve", [*HERALD, "serve", "--config", str(config)], logs / "serve.log")
    run_file = state / "run" / "serve.json"
    info = wait_until(lambda: json.loads(run_file.read_text()) if run_file.exists() else None, "serve up")
    yield Serve(proc, state, info["mqtt"], info["sftp_port"], info["sftp_host_key"]), info, cert
    proc.stop()


def test_an_agent_over_tls_converges_and_hears_announcements(tls_serve, fleet: Fleet, tmp_path: Path):
    serve, info, cert = tls_serve
    agent = make_agent(fleet, "alpha", serve, tmp_path, broker=info["mqtts"])
    agent.config.write_text(
        agent.config.read_text().replace("keepalive = 5\n", f'keepalive = 5\nca = "{cert}"\n')
    )
    agent.start()
    try:
        wait_until(lambda: agent.deployed() == 1, "alpha at generation 1")
        wait_until(lambda: "connected to broker mqtts://" in agent.proc.output(), "alpha connected over TLS")
        fleet.edit("alpha", "files/etc/motd", "over TLS\n")
        done = herald(
            "publish", "--fleet", str(fleet.root), "--state", str(serve.state), "--broker", serve.mqtt
        )
        assert done.returncode == 0, done.stderr
        wait_until(lambda: agent.deployed() == 2, "alpha at generation 2 (poll is 1h: only MQTT brings it)")
    finally:
        agent.stop()


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_serve):
    serve, info, _ = tls_serve
    port = int(info["mqtts"].rsplit(":", 1)[1])
    secret = (serve.state / "broker" / f"{ADMIN_USER}.secret").read_text().strip()

    async def attempt():
        async with aiomqtt.Client(
            "127.0.0.1", port, username=ADMIN_USER, password=secret, tls_context=ssl.create_default_context()
        ):
            pass

    with pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(attempt())


def test_the_websocket_listener_authenticates_and_serves_retained_messages(tls_serve):
    serve, info, _ = tls_serve
    port = int(info["websocket"].rsplit(":", 1)[1])
    secret = (serve.state / "broker" / f"{ADMIN_USER}.secret").read_text().strip()

    async def read_desired() -> list[str]:
        seen: list[str] = []
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            username=ADMIN_USER,
            password=secret,
            transport="websockets",
            websocket_path="/",
        ) as client:
            await client.subscribe("herald/+/desired", qos=1)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    seen.append(str(message.topic))
                    if len(seen) == 3:
                        break
        return sorted(seen)

    assert asyncio.run(read_desired()) == [f"herald/{h}/desired" for h in ("alpha", "beta", "gamma")]

    async def anonymous():
        async with aiomqtt.Client("127.0.0.1", port, transport="websockets", websocket_path="/"):
            pass

    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(anonymous())
