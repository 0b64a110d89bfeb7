"""``kiln.config``: defaults, YAML file, overrides, and clear errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kiln.config import (
    MAX_UPLOAD_BYTES,
    Config,
    ConfigError,
    default_data_dir,
    load_config,
    qemu_missing,
    resolve_engine,
    split_listen,
)


def test_defaults() -> None:
    c = load_config()
    assert c.listen == "127.0.0.1:8080" and (c.host, c.port) == ("127.0.0.1", 8080)
    assert (c.engine, c.accel, c.image, c.templates) == ("auto", "auto", "minimal", True)
    assert c.data_dir == default_data_dir()
    assert (c.thermal.hot_to_warm_s, c.thermal.warm_to_cold_s, c.thermal.tick_s) == (
        30.0,
        1800.0,
        10.0,
    )
    assert c.publish_domain == "localhost"
    assert c.max_upload_bytes == MAX_UPLOAD_BYTES == 100 * 1024 * 1024
    assert c.db_path == c.data_dir / "kiln.db"
    assert c.store is None and c.store_target == str(c.data_dir / "kiln.db")
    assert not c.store_is_shared
    assert c.secret_key_path == c.data_dir / "secret.key"
    assert c.admin_key_path == c.data_dir / "admin-api-key"


def test_store_and_secret_key(tmp_path: Path) -> None:
    path = tmp_path / "kiln.yaml"
    path.write_text(
        "store: postgresql://kiln:pw@db.internal:5432/kiln?sslmode=require\n"
        "secret_key: /etc/kiln/secret.key\n"
    )
    c = load_config(path)
    assert c.store_target == "postgresql://kiln:pw@db.internal:5432/kiln?sslmode=require"
    assert c.store_is_shared
    assert c.secret_key_path == Path("/etc/kiln/secret.key")
    c = load_config(None, {"store": "~/kiln.sqlite", "data_dir": str(tmp_path)})
    assert c.store_target == str(Path("~/kiln.sqlite").expanduser())
    assert not c.store_is_shared


def test_cluster_settings(tmp_path: Path) -> None:
    path = tmp_path / "kiln.yaml"
    path.write_text(
        "store: postgresql://kiln@db:5432/kiln\n"
        "listen: 0.0.0.0:8080\n"
        "cluster:\n  node: node-a\n  advertise: http://10.0.0.5:8080/\n"
        "  secret_file: /etc/kiln/cluster-secret\n  lease_s: 4\n  shared_dir: /mnt/kiln\n"
    )
    c = load_config(path)
    assert (c.node_name, c.node_address) == ("node-a", "http://10.0.0.5:8080")
    assert c.cluster_secret_path == Path("/etc/kiln/cluster-secret")
    assert (c.cluster.lease_s, c.cluster.shared_dir) == (4.0, Path("/mnt/kiln"))
    # Defaults: the host's name; the listen address when others can reach it; a wildcard
    # or loopback one needs advertise, said in one line.
    c = load_config(None, {"data_dir": str(tmp_path), "listen": "10.1.2.3:9000"})
    assert c.node_name == socket.gethostname()
    assert c.node_address == "http://10.1.2.3:9000"
    assert c.cluster_secret_path == tmp_path / "cluster-secret"
    with pytest.raises(ConfigError, match=r"cluster\.advertise: other nodes cannot reach"):
        _ = load_config(None, {"listen": "127.0.0.1:8080"}).node_address


def test_default_data_dir_for_non_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_data_dir() == tmp_path / ".local" / "share" / "kiln"
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_data_dir() == Path("/var/lib/kiln")


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "kiln.yaml"
    path.write_text(
        "data_dir: ~/kiln-data\n"
        "listen: 0.0.0.0:9000\n"
        "accel: tcg\n"
        "network:\n  bridge: kb0\n  subnet: 10.213.9.0/24\n  netns: kiln-ns\n  nat: false\n"
        "thermal:\n  hot_to_warm_s: 5\n"
        "publish_domain: sandboxes.example.com\n"
        "templates: false\n"
        "guest_aslr: 'on'\n"
    )
    c = load_config(path, {"listen": "127.0.0.1:0", "thermal.tick_s": "2.5", "image": None})
    assert c.data_dir == Path("~/kiln-data").expanduser()
    assert c.listen == "127.0.0.1:0"  # the override wins
    assert c.accel == "tcg"
    assert (c.network.bridge, c.network.subnet, c.network.netns, c.network.nat) == (
        "kb0",
        "10.213.9.0/24",
        "kiln-ns",
        False,
    )
    assert (c.thermal.hot_to_warm_s, c.thermal.tick_s) == (5.0, 2.5)
    assert c.image == "minimal"  # a None override means "not given"
    assert c.publish_domain == "sandboxes.example.com"
    assert c.templates is False and c.guest_aslr == "on"
    assert c.url == "http://127.0.0.1:0"
    assert load_config(None, {"listen": "0.0.0.0:80"}).url == "http://127.0.0.1:80"


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config(data_dir=load_config().data_dir)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("listen: 8080\n", "listen"),
        ("listen: host:port\n", "listen"),
        ("listen: h:70000\n", "out of range"),
        ("engine: docker-swarm\n", "engine"),
        ("accel: fast\n", "accel"),
        ("guest_aslr: maybe\n", "guest_aslr"),
        ("bogus: 1\n", "unknown configuration key 'bogus'"),
        ("network: {subnet: 10.0.0.0/16}\n", "network"),
        ("network: {subnet: 8.8.8.0/24}\n", "private"),
        ("network: {colour: red}\n", "network.colour"),
        ("network: [1]\n", "network"),
        ("thermal: {tick_s: fast}\n", "thermal.tick_s"),
        ("thermal: {tick_s: 0}\n", "thermal.tick_s"),
        ("thermal: {idle: 1}\n", "thermal.idle"),
        ("pool: {size: -1}\n", "pool.size"),
        ("pool: {size: two}\n", "pool.size"),
        ("pool: {memory_mb: -5}\n", "pool.memory_mb"),
        ("pool: {shapes: 3}\n", "pool.shapes: expected a list"),
        ("pool: {shapes: [1]}\n", r"pool.shapes\[0\]: expected a mapping"),
        ("pool: {shapes: [{cpus: 0}]}\n", r"pool.shapes\[0\].cpus"),
        ("pool: {shapes: [{memory_mb: 64}]}\n", r"pool.shapes\[0\].memory_mb"),
        ("pool: {shapes: [{cpus: 2, size: -1}]}\n", r"pool.shapes\[0\].size"),
        ("pool: {shapes: [{cpus: 2, ram: 1}]}\n", r"pool.shapes\[0\].ram"),
        ("pool: {shapes: [{cpus: 2, image: ../x}]}\n", r"pool.shapes\[0\].image"),
        ("pool: {shapes: [{}]}\n", "default shape"),
        ("pool: {shapes: [{cpus: 2}, {cpus: 2, image: minimal}]}\n", "listed twice"),
        ("pool: 2\n", "pool"),
        ("max_upload_bytes: 0\n", "max_upload_bytes"),
        ("max_upload_bytes: yes\n", "max_upload_bytes"),
        ("image: ../x\n", "image"),
        ("store: ''\n", "store: empty"),
        ("store: mysql://h/kiln\n", "store: unsupported URL scheme 'mysql'"),
        ("store: postgresql://h:5432\n", "store: .* must name a database"),
        ("store: postgresql://h:port/kiln\n", "store: .* invalid port"),
        ("store: [a]\n", "store: expected a string"),
        ("secret_key: 3\n", "secret_key: expected a path"),
        ("cluster: {lease_s: 0}\n", "cluster.lease_s: must be positive"),
        ("cluster: {node: 'a b'}\n", "cluster.node"),
        ("cluster: {advertise: '10.0.0.1:8080'}\n", "cluster.advertise: expected http"),
        ("cluster: {peers: []}\n", "cluster.peers"),
        ("cluster: 3\n", "cluster: expected a mapping"),
        ("- a list\n", "mapping"),
        ("listen: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value).strip() or "YAML" in str(info.value)


def test_pool_settings(tmp_path: Path) -> None:
    assert (load_config(None).pool.size, load_config(None).pool.memory_mb) == (2, 2048)
    path = tmp_path / "kiln.yaml"
    path.write_text("pool: {size: 0, memory_mb: 512}\n")
    c = load_config(path)
    assert (c.pool.size, c.pool.memory_mb) == (0, 512)
    assert load_config(path, {"pool.size": "3"}).pool.size == 3
    assert c.pool.shapes == ()
    path.write_text("image: base\npool: {shapes: [{cpus: 2, memory_mb: 1024, size: 1}]}\n")
    (shape,) = load_config(path).pool_shapes()
    assert (shape.image, shape.cpus, shape.memory_mb, shape.size) == ("base", 2, 1024, 1)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_split_listen_ipv6() -> None:
    assert split_listen("[::1]:8080") == ("::1", 8080)
    assert Config(listen="[::1]:8080").url == "http://[::1]:8080"


def test_resolve_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert qemu_missing() is not None and "qemu-system-x86_64" in qemu_missing()  # type: ignore[operator]
    assert resolve_engine(load_config()) == "qemu"  # auto keeps today's default
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert qemu_missing() is None
    assert resolve_engine(load_config()) == "qemu"
    assert resolve_engine(load_config(None, {"engine": "docker"})) == "docker"


def test_docker_settings(tmp_path: Path) -> None:
    config = load_config(None, {"data_dir": str(tmp_path), "docker.runtime": "runsc"})
    assert config.docker.runtime == "runsc"
    assert config.docker_root == tmp_path / "docker"
    net = config.docker_network()
    assert (net.bridge, net.subnet) == ("kilnd0", "10.213.1.0/24")
    assert net.netns == config.network.netns
    with pytest.raises(ConfigError, match=r"docker\.runtime: must be one of runc, runsc"):
        load_config(None, {"docker.runtime": "kata"})
    with pytest.raises(ConfigError, match="docker"):
        load_config(None, {"docker.subnet": "not-a-subnet"})
    with pytest.raises(ConfigError, match=r"unknown configuration key 'docker\.bridges'"):
        load_config(None, {"docker.bridges": "x"})
