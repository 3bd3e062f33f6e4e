"""Settings: defaults reach the embedded stack, bad values name their key, secrets stay hidden."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from workers.settings import OnexSettings, SettingsError, load_settings


def test_defaults_point_at_the_embedded_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set, every section addresses the stack that `onex dev up` starts."""
    monkeypatch.chdir("/")  # no .env file in the way
    settings = load_settings()
    assert settings.temporal.target == "127.0.0.1:7233"
    assert settings.temporal.ui_url == "http://127.0.0.1:8233"
    assert settings.postgres.dsn == "postgresql://onex@127.0.0.1:5432/onex"
    assert (settings.postgres.pool_min_size, settings.postgres.pool_max_size) == (2, 10)
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.enable_idempotence is False, "the embedded broker has no idempotence"
    assert not settings.consul.enabled
    assert not settings.vault.enabled, "Vault is opt-in"
    assert not settings.valkey.enabled, "Valkey is opt-in"
    assert (settings.valkey.cache_ttl, settings.valkey.cache_keep) == (5.0, 86_400.0)


def test_nested_environment_variables_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONEX_<SECTION>__<KEY> sets one key of one section."""
    monkeypatch.setenv("ONEX_POSTGRES__PORT", "6543")
    monkeypatch.setenv("ONEX_CONSUL__ADDRESS", "consul.internal:8500")
    settings = load_settings()
    assert settings.postgres.port == 6543
    assert settings.consul.enabled


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "ONEX_POSTGRES__PORT",
            "not-a-port",
            "ONEX_POSTGRES__PORT: Input should be a valid integer",
        ),
        ("ONEX_TEMPORAL__PORT", "70000", "ONEX_TEMPORAL__PORT: Input should be less than or equal"),
        ("ONEX_WORKER__LOG_LEVEL", "loud", "ONEX_WORKER__LOG_LEVEL: Input should be 'debug'"),
        ("ONEX_VALKEY__CACHE_TTL", "0", "ONEX_VALKEY__CACHE_TTL: Input should be greater than 0"),
        ("ONEX_VALKEY__CACHE_KEEP", "1", "ONEX_VALKEY: Value error, cache_keep must be at least"),
    ],
)
def test_an_invalid_value_names_the_key_and_the_expected_form(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    """A bad value fails at start-up with the variable to fix and what it should hold."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert expected in str(raised.value)


def test_a_bad_secret_value_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error for a malformed section never repeats the input, which may hold a secret."""
    monkeypatch.setenv("ONEX_VAULT__TOKEN", "s.super-secret-token")
    monkeypatch.setenv("ONEX_VAULT__UNKNOWN", "s.another-secret")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "super-secret" not in str(raised.value)
    assert "another-secret" not in str(raised.value)


def test_secrets_never_show_in_repr_or_safe_dump() -> None:
    """SecretStr values print as stars and safe_dump only says they are set."""
    settings = OnexSettings.model_validate(
        {"postgres": {"password": "pg-pass-123"}, "vault": {"token": "hvs.tok"}}
    )
    assert isinstance(settings.postgres.password, SecretStr)
    assert "pg-pass-123" not in repr(settings)
    dumped = str(settings.safe_dump())
    assert "pg-pass-123" not in dumped
    assert "hvs.tok" not in dumped
    assert settings.safe_dump()["postgres"]["password"] == "<set>"  # type: ignore[index]


@pytest.mark.parametrize(
    "variable",
    [
        "ONEX_KAFKA__BOOTSTRAP_SERVERS",
        "ONEX_CONSUL__ADDRESS",
        "ONEX_VAULT__ADDRESS",
        "ONEX_POSTGRES__HOST",
        "ONEX_TEMPORAL__HOST",
    ],
)
@pytest.mark.parametrize("value", ["user:Zq9pw@host:9092", "http://user:Zq9pw@host:8500"])
def test_an_address_with_userinfo_is_refused_naming_the_variable_not_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """An address field holding ``user:password@`` is refused at start-up; the error names the
    variable and never the value (it would be printed, logged and shown otherwise)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    message = str(refused.value)
    assert variable in message, f"the refusal must name {variable}: {message!r}"
    assert "Zq9pw" not in message, f"the refusal echoed the credential: {message!r}"
