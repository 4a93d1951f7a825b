from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import Broker, start_broker
from helpers import Agent, Fleet, Serve, Watcher, make_agent, start_serve
from hypothesis import HealthCheck, settings
from openssh import remove_host_users, start_sshd

# A loaded 2-core CI machine makes generation slow now and then; slowness is not what these test.
settings.register_profile("herald", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("herald")


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.create(tmp_path)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def serve(fleet: Fleet, state: Path, logs: Path) -> Iterator[Serve]:
    """`herald serve` on ephemeral loopback ports, embedded broker and SFTP."""
    server = start_serve(fleet, state, logs)
    yield server
    server.stop()


@pytest.fixture
def watcher(serve: Serve, state: Path) -> Iterator[Watcher]:
    client = Watcher(serve.mqtt, state)
    yield client
    client.close()


@pytest.fixture
def agents(fleet: Fleet, serve: Serve, tmp_path: Path) -> Iterator[dict[str, Agent]]:
    """One running agent per host of the example fleet, its rebuild a recording stand-in."""
    started = {host: make_agent(fleet, host, serve, tmp_path).start() for host in fleet.hosts}
    yield started
    for agent in started.values():
        agent.stop()


@pytest.fixture(params=["embedded", "openssh"])
def sftp_server(request, fleet: Fleet, state: Path, logs: Path, tmp_path: Path) -> Iterator[Serve]:
    """The same tests against the embedded SFTP server and a real OpenSSH sshd with chroots."""
    if request.param == "embedded":
        server = start_serve(fleet, state, logs)
        yield server
        server.stop()
        return
    sshd = start_sshd(fleet, state, tmp_path, logs)
    yield sshd.serve()
    sshd.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request, fleet: Fleet, state: Path, logs: Path, tmp_path: Path) -> Iterator[Broker]:
    """The same tests against the embedded broker and a real Mosquitto from `herald broker export`."""
    made = start_broker(request.param, fleet, state, logs, tmp_path)
    yield made
    made.stop()


@pytest.fixture(scope="session", autouse=True)
def _remove_provisioned_users() -> Iterator[None]:
    """Tests that provision OpenSSH chroots create the example fleet's host users: remove them."""
    yield
    remove_host_users(["alpha", "beta", "gamma", "delta"])
