"""The resilience layer every backend handler goes through.

* :mod:`.sanitize` — what may be shown of a message, a mapping, a DSN;
* :mod:`.classify` — native exceptions (asyncpg, aiokafka, aiohttp, consul, hvac, OSError) to
  the error tree of :mod:`contracts.errors`, retryable or not;
* :mod:`.breaker` — circuit breakers, their one guarded call (``guard``), and their registry;
* :mod:`.refresh` — a refused credential refreshed once, and the call tried once more;
* :mod:`.boundary` — the activity boundary: log context, breaker, timing, failure mapping;
* :mod:`.correlation` — the correlation id of the current request.
"""
