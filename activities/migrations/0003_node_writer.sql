-- The writer of each registry row: the run (<workflow id>/<run id>) whose operation changed it
-- last, set by postgres.upsert_node and postgres.deactivate_node, and put back with the rest of
-- the row by postgres.restore_node. A compensation changes the row only while its writer is
-- still the compensating run (an undo never destroys newer work). NULL for rows written before
-- this migration: for those the row's correlation_id is the fence.

ALTER TABLE onex_nodes ADD COLUMN written_by text NULL;
