-- Pre-images of the forward registry operations, recorded once per operation.
--
-- Temporal retries a forward step after a lost reply, so a step may run again after its first
-- attempt committed. The first attempt of postgres.upsert_node / postgres.deactivate_node
-- records the row as it was before (previous, NULL when there was no row) in the same
-- transaction as its write; a repeat with the same correlation id reports that stored row
-- instead of the one its own first attempt wrote, so the compensation restores the true
-- pre-image. Rows are removed by PostgresHandler.cleanup_preimages(ttl_seconds).

CREATE TABLE onex_node_preimages (
    node_id        uuid        NOT NULL,
    correlation_id uuid        NOT NULL,
    operation      text        NOT NULL,
    previous       jsonb       NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, correlation_id, operation)
);

-- The cleanup deletes by age.
CREATE INDEX onex_node_preimages_created_at ON onex_node_preimages (created_at);
