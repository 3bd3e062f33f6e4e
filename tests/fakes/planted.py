"""Every credential the tests plant, in one place.

The fakes and fixtures are given these values (the Consul agent's ACL token, the Kafka SASL
password, the password of the PostgreSQL login that requires one, the Vault token, the AppRole
secret ID), and the suite-wide secret check (``pytest_sessionfinish`` in tests/conftest.py)
fails the run when one of them, or a value the Vault fake served, appears in anything the suite
captured: log records, stdout, stderr, failure reports. A test that plants a credential takes it
from here, so that the check covers it.

Each value is long and random-looking, so that it never occurs in ordinary text by chance.
"""

from __future__ import annotations

from typing import Final

CONSUL_TOKEN: Final = "planted-consul-token-5d2e91c4a7"
SASL_PASSWORD: Final = "planted-sasl-password-3f9d81b6e2"
POSTGRES_PASSWORD: Final = "planted-pg-password-7a4c20e9d1"
VAULT_TOKEN: Final = "hvs.planted-vault-token-9b13d4e8f0a2"
APPROLE_SECRET_ID: Final = "planted-approle-secret-id-41c8e9d2"

POSTGRES_USER: Final = "onex_password_login"
"""The PostgreSQL login that must give :data:`POSTGRES_PASSWORD` (the embedded server trusts
every other login on loopback): see the ``password_login`` fixture."""

PLANTED: Final = frozenset(
    {CONSUL_TOKEN, SASL_PASSWORD, POSTGRES_PASSWORD, VAULT_TOKEN, APPROLE_SECRET_ID}
)
"""What the suite-wide secret check looks for, besides the values the Vault fake served."""
