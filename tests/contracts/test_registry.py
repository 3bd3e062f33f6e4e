"""Node requests refuse what must never be stored or shown: credentials in URLs or metadata."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from contracts.registry import DeregisterNodeRequest
from tests.builders import register_request


def test_a_health_url_with_credentials_is_refused() -> None:
    """The health URL goes to Consul, the registry and the workflow history: no userinfo."""
    with pytest.raises(ValidationError, match="must not carry credentials"):
        register_request(endpoints={"health": "http://admin:s3cret@10.0.0.7:8080/health"})


@pytest.mark.parametrize("key", ["db_password", "api-key", "auth", "SESSION_ID", "token"])
def test_secret_like_metadata_keys_are_refused(key: str) -> None:
    """Metadata is public; a key naming a credential is refused with the reason."""
    with pytest.raises(ValidationError, match="looks like a credential"):
        register_request(metadata={key: "x"})


@pytest.mark.parametrize("key", ["team", "author", "region", "keyspace"])
def test_ordinary_metadata_keys_are_kept(key: str) -> None:
    """Words that merely contain short markers (author, keyspace) are fine."""
    assert register_request(metadata={key: "x"}).metadata == {key: "x"}


def test_a_bad_version_says_what_a_version_looks_like() -> None:
    """node_version must be semantic, and the message shows an example."""
    with pytest.raises(ValidationError, match=r"not a semantic version such as 1\.4\.2"):
        register_request(node_version="one")


SECRET = "Zq8vN3kP2mX7wR4t"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"metadata": {"pwd": SECRET}}, "metadata key 'pwd'"),
        ({"metadata": {"conn": f"postgresql://u:{SECRET}@db"}}, "metadata key 'conn'"),
        ({"metadata": {"note": f"pwd={SECRET}"}}, "metadata key 'note'"),
        ({"tags": ("blue", f"token={SECRET}")}, "tag 2"),
        ({"address": f"user:{SECRET}@10.0.0.9"}, "address"),
        (
            {"endpoints": {"health": f"http://10.0.0.7/health?access_token={SECRET}"}},
            "access_token",
        ),
    ],
)
def test_a_credential_in_a_request_field_is_refused_without_echoing_it(
    changes: dict[str, Any], field: str
) -> None:
    """Free-text fields reach Consul, the registry, Kafka and the Temporal history: a
    credential in one is refused, the message names the field and the rule, never the value."""
    with pytest.raises(ValidationError) as refused:
        register_request(**changes)
    messages = " ".join(e["msg"] for e in refused.value.errors(include_input=False))
    assert field in messages
    assert SECRET not in messages


def test_a_credential_in_the_deregister_reason_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        DeregisterNodeRequest(
            node_id=uuid.uuid4(), node_type="effect", reason=f"rotated password={SECRET}"
        )
    messages = " ".join(e["msg"] for e in refused.value.errors(include_input=False))
    assert "the reason" in messages
    assert SECRET not in messages


def test_ordinary_request_fields_pass() -> None:
    """Precision: addresses, tags, metadata and reasons users really write are accepted."""
    request = register_request(
        tags=("blue", "eu-west-1", "v2"),
        metadata={"team": "payments", "owner": "ops@example.com", "build": "4f9a2c1"},
    )
    assert request.metadata["team"] == "payments"
    DeregisterNodeRequest(node_id=uuid.uuid4(), node_type="effect", reason="decommissioned")
