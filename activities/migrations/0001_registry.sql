-- The registry (the source of truth), the outbox that carries its events to Kafka, dead letters
-- for events that could not be published, and processed messages for consumer idempotency.

CREATE TABLE onex_nodes (
    node_id        uuid PRIMARY KEY,
    node_type      text        NOT NULL CHECK (node_type IN ('effect', 'compute', 'reducer', 'orchestrator')),
    node_version   text        NOT NULL,
    service_name   text        NOT NULL,
    address        text        NOT NULL,
    port           integer     NOT NULL CHECK (port BETWEEN 1 AND 65535),
    tags           text[]      NOT NULL DEFAULT '{}',
    endpoints      jsonb       NOT NULL DEFAULT '{}',
    metadata       jsonb       NOT NULL DEFAULT '{}',
    status         text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    row_version    bigint      NOT NULL DEFAULT 1,
    correlation_id uuid,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE onex_outbox (
    id             bigserial PRIMARY KEY,
    event_id       uuid        NOT NULL UNIQUE,
    topic          text        NOT NULL,
    message_key    bytea,
    envelope       jsonb       NOT NULL,
    headers        jsonb       NOT NULL DEFAULT '[]',
    correlation_id uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    attempts       integer     NOT NULL DEFAULT 0,
    last_error     text
);

-- The relay only ever looks for unpublished rows, oldest first.
CREATE INDEX onex_outbox_unpublished ON onex_outbox (id) WHERE published_at IS NULL;

CREATE TABLE onex_dead_letters (
    id             bigserial PRIMARY KEY,
    outbox_id      bigint      NOT NULL UNIQUE,
    event_id       uuid        NOT NULL,
    topic          text        NOT NULL,
    message_key    bytea,
    envelope       jsonb       NOT NULL,
    headers        jsonb       NOT NULL DEFAULT '[]',
    correlation_id uuid,
    attempts       integer     NOT NULL,
    reason         text        NOT NULL,
    created_at     timestamptz NOT NULL,
    dead_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE onex_processed_messages (
    domain         text        NOT NULL,
    message_id     uuid        NOT NULL,
    correlation_id uuid,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, message_id)
);

-- One notification per inserting statement wakes the relays; they also poll every second.
CREATE FUNCTION onex_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('onex_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER onex_outbox_inserted
    AFTER INSERT ON onex_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION onex_outbox_notify();
