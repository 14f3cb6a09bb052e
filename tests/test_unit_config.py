"""Unit tests: DSN parsing, password redaction and ClusterConfig validation."""

from __future__ import annotations

import math

import pytest
from fakes import FakeCluster

from picopyn_actors import Address, ClusterConfig, ConfigError, RoundRobin, open_cluster
from picopyn_actors._dsn import DEFAULT_PORT, parse_dsn, redact
from picopyn_actors._topology import Role, Selector

SECRET = "Xyzzy-Pw-42"


# -- parse_dsn ----------------------------------------------------------------------


def test_parse_dsn_multi_host_with_default_port() -> None:
    dsn = parse_dsn(f"postgresql://admin:{SECRET}@h1:5001,h2,h3:5003/mydb")
    assert dsn.user == "admin"
    assert dsn.password == SECRET
    assert dsn.database == "mydb"
    assert dsn.hosts == (Address("h1", 5001), Address("h2", DEFAULT_PORT), Address("h3", 5003))
    assert DEFAULT_PORT == 4327


def test_parse_dsn_single_host_no_database_no_password() -> None:
    dsn = parse_dsn("postgres://admin@10.0.0.1")
    assert dsn.hosts == (Address("10.0.0.1", 4327),)
    assert dsn.password is None
    assert dsn.database is None
    assert str(dsn) == "postgresql://admin@10.0.0.1:4327"


def test_parse_dsn_ipv6_hosts() -> None:
    dsn = parse_dsn(f"postgresql://admin:{SECRET}@[::1]:5000,[fe80::1],10.0.0.2:7/db")
    assert dsn.hosts == (
        Address("::1", 5000),
        Address("fe80::1", DEFAULT_PORT),
        Address("10.0.0.2", 7),
    )
    assert str(dsn.hosts[0]) == "[::1]:5000"
    assert str(dsn) == "postgresql://admin:***@[::1]:5000,[fe80::1]:4327,10.0.0.2:7/db"


def test_parse_dsn_percent_encoded_credentials_and_params() -> None:
    dsn = parse_dsn("postgresql://ad%40min:p%40ss%2Fw@h1/db?sslmode=require&application_name=x")
    assert dsn.user == "ad@min"
    assert dsn.password == "p@ss/w"
    assert dict(dsn.params) == {"sslmode": "require", "application_name": "x"}
    assert "p@ss" not in str(dsn) and "p@ss" not in repr(dsn)


@pytest.mark.parametrize(
    ("dsn", "fragment"),
    [
        (f"mysql://admin:{SECRET}@h1/db", "postgresql://"),
        (f"postgresql://:{SECRET}@h1/db", "no user"),
        ("postgresql://h1/db", "no user"),
        (f"postgresql://admin:{SECRET}@/db", "no host"),
        (f"postgresql://admin:{SECRET}@h1:0/db", "bad port"),
        (f"postgresql://admin:{SECRET}@h1:65536/db", "bad port"),
        (f"postgresql://admin:{SECRET}@h1:port/db", "bad port"),
        (f"postgresql://admin:{SECRET}@[::1/db", "unterminated"),
        (f"postgresql://admin:{SECRET}@[::1]x/db", "bad address"),
        (f"postgresql://admin:{SECRET}@::1/db", "IPv6"),
        (f"postgresql://admin:{SECRET}@h1,,h2/db", "empty host"),
        (f"postgresql://admin:{SECRET}@h1/db?sslrootcert=x", "unsupported parameter"),
    ],
)
def test_parse_dsn_rejects_bad_dsns_without_leaking_the_password(dsn: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_dsn(dsn)
    message = str(info.value)
    assert fragment in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)


def test_dsn_without_scheme_error_hides_the_password() -> None:
    with pytest.raises(ConfigError, match="postgresql://") as info:
        parse_dsn(f"admin:{SECRET}@h1/db")
    assert SECRET not in str(info.value)


def test_dsn_password_parameter_error_hides_the_password() -> None:
    with pytest.raises(ConfigError, match="unsupported parameter") as info:
        parse_dsn(f"postgresql://admin@h1/db?password={SECRET}")
    assert SECRET not in str(info.value)


def test_parse_dsn_rejects_non_strings() -> None:
    with pytest.raises(ConfigError, match="string"):
        parse_dsn(b"postgresql://admin@h1")  # type: ignore[arg-type]


def test_password_never_in_str_or_repr() -> None:
    dsn = parse_dsn(f"postgresql://admin:{SECRET}@h1,h2/db")
    assert SECRET not in str(dsn)
    assert SECRET not in repr(dsn)
    assert "***" in str(dsn) and "***" in repr(dsn)
    config = ClusterConfig.create(f"postgresql://admin:{SECRET}@h1,h2/db")
    assert SECRET not in repr(config)
    assert SECRET not in str(config)


def test_bad_dsn_error_hides_a_password_containing_at_sign() -> None:
    with pytest.raises(ConfigError) as info:
        parse_dsn("postgresql://admin:top@Secret9@h1:99999/db")
    assert "Secret9" not in str(info.value)


def test_bad_dsn_error_hides_a_password_containing_a_space() -> None:
    with pytest.raises(ConfigError) as info:
        parse_dsn("postgresql://admin:two Words@h1:99999/db")
    assert "Words" not in str(info.value)


def test_redact() -> None:
    assert redact(f"postgresql://admin:{SECRET}@h1/db") == "postgresql://admin:***@h1/db"
    text = f"connect postgres://u:{SECRET}@a:1 and postgresql://v:{SECRET}@b failed"
    redacted = redact(text)
    assert SECRET not in redacted
    assert redacted == "connect postgres://u:***@a:1 and postgresql://v:***@b failed"
    # Nothing to redact: no password, or no URL at all.
    assert redact("postgresql://admin@h1/db") == "postgresql://admin@h1/db"
    assert redact("plain text: a@b") == "plain text: a@b"


def test_address_parse_and_order() -> None:
    assert Address.parse("h:1") == Address("h", 1)
    assert Address.parse(" h ") == Address("h", 4327)
    assert Address.parse("[::1]") == Address("::1", 4327)
    assert Address.parse("h", default_port=9) == Address("h", 9)
    assert sorted([Address("b", 1), Address("a", 2)])[0] == Address("a", 2)
    assert Address.parse("h:") == Address("h", 4327)
    for bad in ("", ":5", "h:-1", "h:1:2"):
        with pytest.raises(ConfigError):
            Address.parse(bad)


# -- ClusterConfig ----------------------------------------------------------------------

DSN = f"postgresql://admin:{SECRET}@h1,h2/db"


def test_config_defaults_and_kwargs_split() -> None:
    config = ClusterConfig.create(
        DSN, connections_per_node=4, timeout=3.0, ssl="require", server_settings={"a": "b"}
    )
    assert config.connections_per_node == 4
    assert config.connect_timeout == 3.0
    assert dict(config.connect_kwargs) == {"ssl": "require", "server_settings": {"a": "b"}}
    assert isinstance(config.strategy, RoundRobin)
    assert config.selector == Selector(tiers=None, role=Role.ANY)
    assert config.dsn.hosts == (Address("h1", 4327), Address("h2", 4327))


def test_config_timeout_does_not_override_connect_timeout() -> None:
    config = ClusterConfig.create(DSN, timeout=3.0, connect_timeout=7.0)
    assert config.connect_timeout == 7.0
    assert "timeout" not in config.connect_kwargs


def test_config_tiers_and_role() -> None:
    assert ClusterConfig.create(DSN, tiers="storage").selector.tiers == frozenset({"storage"})
    assert ClusterConfig.create(DSN, tiers=["a", "b"]).selector.tiers == frozenset({"a", "b"})
    assert ClusterConfig.create(DSN, role="leader").selector.role is Role.LEADER
    assert ClusterConfig.create(DSN, role=Role.REPLICA).selector.role is Role.REPLICA


@pytest.mark.parametrize(
    "option",
    [
        "discovery_interval",
        "health_interval",
        "probe_timeout",
        "connect_timeout",
        "acquire_timeout",
        "backoff_initial",
        "restart_window",
        "quarantine_time",
        "drain_timeout",
    ],
)
@pytest.mark.parametrize("value", [-1.0, 0, math.inf, math.nan, True, "1"])
def test_config_rejects_bad_intervals(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=option):
        ClusterConfig.create(DSN, **{option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("connections_per_node", 0),
        ("connections_per_node", -2),
        ("connections_per_node", 1.5),
        ("connections_per_node", True),
        ("max_restarts", 0),
        ("max_attempts", 0),
        ("events_buffer", 0),
    ],
)
def test_config_rejects_bad_counts(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=option):
        ClusterConfig.create(DSN, **{option: value})


def test_config_rejects_backoff_max_below_initial() -> None:
    with pytest.raises(ConfigError, match="backoff_max"):
        ClusterConfig.create(DSN, backoff_initial=2.0, backoff_max=1.0)


@pytest.mark.parametrize("role", ["master", "", "ANY", None])
def test_config_rejects_bad_role(role: object) -> None:
    with pytest.raises(ConfigError, match="role"):
        ClusterConfig.create(DSN, role=role)  # type: ignore[arg-type]


@pytest.mark.parametrize("tiers", [[], [""], ["ok", ""], [1], ""])
def test_config_rejects_bad_tiers(tiers: object) -> None:
    with pytest.raises(ConfigError, match="tiers"):
        ClusterConfig.create(DSN, tiers=tiers)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["host", "port", "user", "password", "database", "loop"])
def test_config_rejects_reserved_connect_kwargs(key: str) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        ClusterConfig.create(DSN, **{key: SECRET})
    assert SECRET not in str(info.value)


def test_config_rejects_dsn_in_connect_kwargs() -> None:
    with pytest.raises(ConfigError, match="dsn"):
        ClusterConfig(dsn=parse_dsn(DSN), connect_kwargs={"dsn": DSN})


@pytest.mark.parametrize("strategy", [None, 42, "RoundRobin"])
def test_config_rejects_non_callable_strategy(strategy: object) -> None:
    with pytest.raises(ConfigError, match="strategy"):
        ClusterConfig.create(DSN, strategy=strategy)


def test_config_is_frozen() -> None:
    config = ClusterConfig.create(DSN)
    with pytest.raises(AttributeError):
        config.connections_per_node = 5  # type: ignore[misc]


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        ClusterConfig.create(DSN, connections_per_node=0)


async def test_open_cluster_rejects_bad_options_before_any_io() -> None:
    fake = FakeCluster(1)
    with pytest.raises(ConfigError):
        async with open_cluster(fake.dsn(), backend=fake, connections_per_node=0):
            pass  # pragma: no cover
    with pytest.raises(ConfigError):
        async with open_cluster("mysql://x@h", backend=fake):
            pass  # pragma: no cover
    assert fake.total_connects() == 0
