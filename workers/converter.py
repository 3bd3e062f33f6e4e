"""The project's Temporal data converter: pydantic payloads, failures without stack traces, and
(when ``ONEX_CODEC__ENABLED`` is on) payloads encrypted by :mod:`workers.codec`.

Temporal stores a failure's message and stack trace in the workflow history, which anyone with
UI access can read. Stack traces name files and directories of the machine that raised (and can
quote source lines); messages have been sanitized where they were raised, and are sanitized
again here as a second line of defence. Worker logs keep the full traces for debugging. With
encryption on, the (sanitized) messages also move into the failure's encoded attributes, so the
codec encrypts them with the rest.

:func:`build_data_converter` is the one place that decides which converter a process uses: the
client helpers, the worker, ``onex replay`` and the test fixtures all call it.
:data:`DATA_CONVERTER` is the plaintext converter (the embedded stack's default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from temporalio.api.failure.v1 import Failure
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverter, PayloadConverter

from activities.base import SecretSource
from activities.resilience.sanitize import sanitize_text
from workers.codec import EncryptionCodec, PayloadKeyring, load_keyring
from workers.settings import OnexSettings


class SanitizingFailureConverter(DefaultFailureConverter):
    def to_failure(
        self,
        exception: BaseException,
        payload_converter: PayloadConverter,
        failure: Failure,
    ) -> None:
        super().to_failure(exception, payload_converter, failure)
        for link in _chain(failure):
            link.stack_trace = ""
            link.message = sanitize_text(link.message)


class EncodingFailureConverter(SanitizingFailureConverter):
    """Sanitized, then each message moved into the encoded attributes (which the codec encrypts).

    The SDK's own ``encode_common_attributes`` would encode before the sanitizing pass, so it is
    done here, after it. Decoding is the SDK's: it reads the encoded attributes back.
    """

    def to_failure(
        self,
        exception: BaseException,
        payload_converter: PayloadConverter,
        failure: Failure,
    ) -> None:
        super().to_failure(exception, payload_converter, failure)
        for link in _chain(failure):
            if not link.HasField("encoded_attributes"):
                link.encoded_attributes.CopyFrom(
                    payload_converter.to_payloads([{"message": link.message, "stack_trace": ""}])[0]
                )
                link.message = "Encoded failure"


def _chain(failure: Failure) -> Iterator[Failure]:
    """A failure and its causes, outermost first."""
    link: Failure | None = failure
    while link is not None:
        yield link
        link = link.cause if link.HasField("cause") else None


DATA_CONVERTER: DataConverter = dataclasses.replace(
    pydantic_data_converter, failure_converter_class=SanitizingFailureConverter
)


def encrypted_converter(keyring: PayloadKeyring) -> DataConverter:
    """:data:`DATA_CONVERTER` with payloads (and failure messages) encrypted by ``keyring``."""
    return dataclasses.replace(
        DATA_CONVERTER,
        payload_codec=EncryptionCodec(keyring),
        failure_converter_class=EncodingFailureConverter,
    )


async def build_data_converter(
    settings: OnexSettings, *, secrets: SecretSource | None = None
) -> DataConverter:
    """The converter ``settings`` ask for: encrypted with the keyring of the secret
    ``temporal.payload_key`` (from ``secrets``, or the secret store of ``settings``) when
    ``settings.codec.enabled``, else :data:`DATA_CONVERTER`."""
    if not settings.codec.enabled:
        return DATA_CONVERTER
    return encrypted_converter(await load_keyring(settings, secrets=secrets))
