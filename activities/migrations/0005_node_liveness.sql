-- Liveness: the last heartbeat of each node, what it reported, and what the sweep concluded.
--
-- A table of its own, not columns of onex_nodes: heartbeats arrive for every node every 30 s,
-- and writing them into the registry rows would contend with the operations' row locks and
-- disturb their fencing (a compensation compares the whole row). last_seen is the heartbeat's
-- own timestamp (capped at now()): an out-of-order heartbeat never moves it backwards.
-- last_interval_ms is the gap between the last two heartbeats, for the jitter count.
-- liveness is set by the sweep (LivenessSweepWorkflow): healthy, or unhealthy after silence.
-- deregister_requested_at: when the sweep asked for the node's deregistration under the
-- optional silence policy (once per silence; a new heartbeat clears it).

CREATE TABLE onex_node_liveness (
    node_id             uuid        PRIMARY KEY,
    last_seen           timestamptz NOT NULL,
    reported_state      text        NOT NULL,
    active_operations   integer     NOT NULL DEFAULT 0,
    last_interval_ms    bigint      NULL,
    heartbeats          bigint      NOT NULL DEFAULT 1,
    liveness            text        NOT NULL DEFAULT 'healthy' CHECK (liveness IN ('healthy', 'unhealthy')),
    liveness_changed_at timestamptz NOT NULL DEFAULT now(),
    deregister_requested_at timestamptz NULL
);

-- The sweep looks for the silent ones.
CREATE INDEX onex_node_liveness_last_seen ON onex_node_liveness (last_seen);
