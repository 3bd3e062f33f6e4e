"""Who is writing: the identity of the run on whose behalf an activity changes a backend.

Compensations are fenced on it (an undo never destroys newer work): each forward write stamps
the row or service with its writer, pre-images are recorded per writer, and an undo changes a
row or service only if its writer is still this one.

* In an activity: ``<workflow id>/<run id>`` of the activity's workflow. A reused correlation
  id or a reset workflow (a new run id) is another writer, so it never sees another run's
  pre-image. (A reset run's undo of a step completed before the reset point is therefore
  reported ``superseded``: it leaves that step's write alone rather than guess.)
* Outside an activity (a handler used directly, as in unit tests): ``correlation:<id>`` of the
  request (or of the task's correlation scope). Pre-images recorded before writers existed are
  keyed the same way (see migration 0004).
* Neither: None. Nothing is recorded and nothing is fenced (the behaviour before pre-images).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Final

from temporalio import activity

from activities.resilience.correlation import current_correlation_id

__all__ = ["CONSUL_META_KEY", "current_writer", "is_ours", "meta_writer", "writer_workflow"]

CONSUL_META_KEY: Final = "onex_writer"
"""The Consul service Meta key that holds the writer (Consul allows ``[A-Za-z0-9_-]`` keys)."""

_CORRELATION_PREFIX: Final = "correlation:"


def current_writer(correlation_id: uuid.UUID | None) -> str | None:
    """The writer identity of the current call (see the module docstring)."""
    if activity.in_activity():
        info = activity.info()
        return f"{info.workflow_id}/{info.workflow_run_id}"
    correlation = correlation_id or current_correlation_id()
    return None if correlation is None else f"{_CORRELATION_PREFIX}{correlation}"


def writer_workflow(writer: str | None) -> str:
    """What a ``superseded`` reason may name of a writer: its workflow id, never more."""
    if not writer:
        return "an unknown writer"
    if writer.startswith(_CORRELATION_PREFIX):
        return writer
    workflow_id, slash, _run_id = writer.rpartition("/")
    return workflow_id if slash else writer


def is_ours(
    written_by: str | None,
    correlation_of_write: str | uuid.UUID | None,
    writer: str | None,
    correlation_id: uuid.UUID | None,
) -> bool:
    """Whether the current state was written by ``writer``.

    State written before writers were recorded (``written_by`` None) is this operation's when
    its correlation id is the request's: the fence those rows had before. Without a writer
    (see :func:`current_writer`) nothing is fenced.
    """
    if writer is None:
        return True
    if written_by is not None:
        return written_by == writer
    return correlation_id is not None and str(correlation_of_write) == str(correlation_id)


def meta_writer(meta: Mapping[str, str]) -> str | None:
    """The writer recorded in a Consul service's Meta, if any."""
    return meta.get(CONSUL_META_KEY)
