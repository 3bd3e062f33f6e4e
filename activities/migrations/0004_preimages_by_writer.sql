-- Pre-images keyed by writer (<workflow id>/<run id>) instead of correlation id.
--
-- A correlation id can be reused (--correlation-id) and a reset workflow keeps it: keyed by it,
-- a later run found an earlier run's pre-image and its compensation restored a stale row. A
-- writer names one run. Records made before this migration were keyed by correlation id: they
-- keep it as their writer ('correlation:<id>', the writer of a handler used outside an
-- activity), so nothing already recorded is lost. correlation_id stays, for information.

ALTER TABLE onex_node_preimages ADD COLUMN writer text NULL;

UPDATE onex_node_preimages SET writer = 'correlation:' || correlation_id::text;

ALTER TABLE onex_node_preimages ALTER COLUMN writer SET NOT NULL;
ALTER TABLE onex_node_preimages DROP CONSTRAINT onex_node_preimages_pkey;
ALTER TABLE onex_node_preimages ALTER COLUMN correlation_id DROP NOT NULL;
ALTER TABLE onex_node_preimages ADD PRIMARY KEY (node_id, writer, operation);
