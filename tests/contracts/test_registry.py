"""Node requests refuse what must never be stored or shown: credentials in URLs or metadata."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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
