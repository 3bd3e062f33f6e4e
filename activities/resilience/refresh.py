"""Refresh a refused credential once, and try the call once more.

Credentials rotate and caches go stale: when a dependency refuses the credential a call was
made with, the one remedy worth trying inside the same attempt is to fetch a fresh one (from the
secret store, or by logging in again) and make the call again. Only once: a second refusal means
the new credential is wrong too, and that failure propagates for the boundary to classify
(Temporal does the retrying). PostgreSQL (a refused password), Consul (a refused ACL token) and
Vault (a refused token, replaced by an AppRole login) all go through :func:`refresh_once`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

logger = structlog.get_logger("onex.credentials")


async def refresh_once(
    attempt: Callable[[], Awaitable[T]],
    *,
    refused: type[BaseException] | tuple[type[BaseException], ...],
    refresh: Callable[[], Awaitable[object]] | None,
    event: str,
    **log_context: Any,
) -> T:
    """``await attempt()``; when it raises ``refused`` and there is a ``refresh``, await it,
    log ``event`` (a warning, with ``log_context`` and the refusal's type) and attempt again.

    ``refresh`` None means nothing can be refreshed (no secret store, an injected client): the
    refusal propagates as it is. The second attempt's failure, whatever it is, propagates too,
    not chained to the first (it is the one that matters).
    """
    try:
        return await attempt()
    except refused as exc:
        if refresh is None:
            raise
        logger.warning(event, error_type=type(exc).__name__, **log_context)
    await refresh()
    return await attempt()
