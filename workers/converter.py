"""The project's Temporal data converter: pydantic payloads, failures without stack traces.

Temporal stores a failure's message and stack trace in the workflow history, which anyone with
UI access can read. Stack traces name files and directories of the machine that raised (and can
quote source lines); messages have been sanitized where they were raised, and are sanitized
again here as a second line of defence. Worker logs keep the full traces for debugging.
"""

from __future__ import annotations

import dataclasses

from temporalio.api.failure.v1 import Failure
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverter, PayloadConverter

from activities.resilience.sanitize import sanitize_text


class SanitizingFailureConverter(DefaultFailureConverter):
    def to_failure(
        self,
        exception: BaseException,
        payload_converter: PayloadConverter,
        failure: Failure,
    ) -> None:
        super().to_failure(exception, payload_converter, failure)
        link: Failure | None = failure
        while link is not None:
            link.stack_trace = ""
            link.message = sanitize_text(link.message)
            link = link.cause if link.HasField("cause") else None


DATA_CONVERTER: DataConverter = dataclasses.replace(
    pydantic_data_converter, failure_converter_class=SanitizingFailureConverter
)
