"""The client helpers users import to start and watch operations.

::

    from workers.client import connect
    from workers.settings import load_settings

    client = await connect(load_settings())
"""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import TLSConfig

from workers.interceptors import CorrelationInterceptor
from workers.settings import OnexSettings


async def connect(settings: OnexSettings) -> Client:
    """A Temporal client with the project's data converter and correlation interceptor.

    Workers built from this client inherit the interceptor, so correlation ids flow from the
    client through workflows into activity logs.
    """
    temporal = settings.temporal
    api_key = temporal.api_key.get_secret_value() if temporal.api_key else None
    return await Client.connect(
        temporal.target,
        namespace=temporal.namespace,
        data_converter=pydantic_data_converter,
        interceptors=[CorrelationInterceptor()],
        api_key=api_key,
        tls=TLSConfig() if temporal.tls or api_key else False,
    )
