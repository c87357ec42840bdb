"""The PostgreSQL queue's schema, as versioned migrations applied at start.

Each migration has an id that never changes once released ("0001-core", or a feature's
own, e.g. "groups-0001"); `schema_migrations` records which ones a database has. At start
every node applies the missing ones, in list order, inside one transaction that holds an
advisory lock, so several nodes starting at once apply each migration exactly once.

The tables mirror the SQLite ones (node.jobs.database) plus what a cluster needs:
- `instances.node` and `jobs.node`: the node whose spool holds the file (only it can read
  it, unless [queue] shared_spool says every node can);
- `jobs.claimed_by` and `jobs.lease_until`: who runs a job and until when the claim holds;
  the claimer renews its leases while it lives, and any node returns expired ones to the
  queue (a node killed with SIGKILL leaves its jobs to expire);
- `nodes`: each node's last heartbeat, for `queue status`.
Times are seconds since the epoch (double precision), as in SQLite, read from each node's
clock: a cluster's nodes keep their clocks in step with NTP.

The completion functions lock the instance row first: two nodes finishing the last two
jobs of one instance at once must not both see the other's job still open (SQLite
serialises writers; PostgreSQL does not), or the instance would never be deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

CORE = """
CREATE TABLE instances (
    id BIGSERIAL PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    called_ae_title TEXT NOT NULL,
    spool_path TEXT NOT NULL,
    size BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    node TEXT NOT NULL
);
CREATE INDEX instances_by_uid ON instances (sop_instance_uid);
CREATE INDEX instances_by_node ON instances (node);
CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    instance_id BIGINT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error TEXT,
    result TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    node TEXT NOT NULL,
    claimed_by TEXT,
    lease_until DOUBLE PRECISION
);
CREATE INDEX jobs_ready ON jobs (state, kind, node, next_attempt_at);
CREATE INDEX jobs_by_instance ON jobs (instance_id);
CREATE INDEX jobs_leased ON jobs (claimed_by) WHERE state = 'running';
CREATE TABLE stored (
    storage TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    stored_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (storage, sop_instance_uid)
);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);

-- Mark a job done; delete its instance once no job of it is open. Returns the open count.
CREATE FUNCTION dn_complete_job(p_job BIGINT, p_result TEXT, p_now DOUBLE PRECISION)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    v_instance BIGINT;
    v_open INTEGER;
BEGIN
    SELECT instance_id INTO v_instance FROM jobs WHERE id = p_job;
    IF v_instance IS NULL THEN
        RETURN 0;  -- purged meanwhile: nothing left to keep the spool file for
    END IF;
    PERFORM 1 FROM instances WHERE id = v_instance FOR UPDATE;
    UPDATE jobs SET state = 'done', result = p_result, last_error = NULL, updated_at = p_now,
        claimed_by = NULL, lease_until = NULL
    WHERE id = p_job;
    SELECT COUNT(*) INTO v_open FROM jobs WHERE instance_id = v_instance AND state <> 'done';
    IF v_open = 0 THEN
        DELETE FROM instances WHERE id = v_instance;  -- its jobs go with it (ON DELETE CASCADE)
    END IF;
    RETURN v_open;
END $$;

-- dn_complete_job for a store job, recording where the instance is in the same transaction.
CREATE FUNCTION dn_complete_stored(
    p_job BIGINT, p_storage TEXT, p_uid TEXT, p_path TEXT, p_syntax TEXT, p_now DOUBLE PRECISION
) RETURNS INTEGER LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stored (storage, sop_instance_uid, path, transfer_syntax, stored_at)
    VALUES (p_storage, p_uid, p_path, p_syntax, p_now)
    ON CONFLICT (storage, sop_instance_uid) DO UPDATE
        SET path = EXCLUDED.path, transfer_syntax = EXCLUDED.transfer_syntax,
            stored_at = EXCLUDED.stored_at;
    RETURN dn_complete_job(p_job, p_path, p_now);
END $$;

-- A node's heartbeat: renew the leases of the jobs it runs, and return every expired lease
-- (of any node) to the queue. Returns how many expired jobs were made pending again.
CREATE FUNCTION dn_heartbeat(p_node TEXT, p_now DOUBLE PRECISION, p_lease DOUBLE PRECISION)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    v_expired INTEGER;
BEGIN
    INSERT INTO nodes (name, started_at, heartbeat_at) VALUES (p_node, p_now, p_now)
    ON CONFLICT (name) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at;
    UPDATE jobs SET lease_until = p_now + p_lease
    WHERE claimed_by = p_node AND state = 'running';
    UPDATE jobs SET state = 'pending', claimed_by = NULL, lease_until = NULL, updated_at = p_now
    WHERE state = 'running' AND lease_until < p_now;
    GET DIAGNOSTICS v_expired = ROW_COUNT;
    RETURN v_expired;
END $$;
"""

# Series and study groups (node.jobs.groups' tables, node.jobs.postgres_groups' rules).
GROUPS = """
CREATE TABLE job_groups (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    level TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    route TEXT NOT NULL,
    state TEXT NOT NULL,
    members INTEGER NOT NULL,
    stable_after DOUBLE PRECISION NOT NULL,
    force_after DOUBLE PRECISION NOT NULL,
    expected_instances INTEGER NOT NULL,
    required_series TEXT NOT NULL,
    first_arrival_at DOUBLE PRECISION NOT NULL,
    last_arrival_at DOUBLE PRECISION NOT NULL,
    dispatched_at DOUBLE PRECISION,
    delivered_at DOUBLE PRECISION,
    reason TEXT NOT NULL,
    UNIQUE (kind, target, level, study_instance_uid, series_instance_uid, version)
);
CREATE INDEX job_groups_by_state ON job_groups (state, kind, target);
CREATE TABLE job_group_members (
    group_id BIGINT NOT NULL REFERENCES job_groups (id),
    job_id BIGINT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    series_number BIGINT,
    instance_number BIGINT,
    series_description TEXT NOT NULL,
    arrived_at DOUBLE PRECISION NOT NULL,
    done_at DOUBLE PRECISION,
    PRIMARY KEY (group_id, job_id)
);
CREATE INDEX job_group_members_by_job ON job_group_members (job_id);
CREATE TABLE job_group_totals (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
-- Both counters exist from the start: two nodes' first increments never race to insert.
INSERT INTO job_group_totals (name, value) VALUES ('late_arrivals', 0), ('dispatched', 0);
-- node.jobs.groups inserts grouped jobs without a node: the recording transaction sets it.
ALTER TABLE jobs ALTER COLUMN node SET DEFAULT current_setting('dicom_node.node');

CREATE OR REPLACE FUNCTION dn_complete_job(p_job BIGINT, p_result TEXT, p_now DOUBLE PRECISION)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    v_instance BIGINT;
    v_open INTEGER;
BEGIN
    SELECT instance_id INTO v_instance FROM jobs WHERE id = p_job;
    IF v_instance IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM instances WHERE id = v_instance FOR UPDATE;
    UPDATE jobs SET state = 'done', result = p_result, last_error = NULL, updated_at = p_now,
        claimed_by = NULL, lease_until = NULL
    WHERE id = p_job;
    UPDATE job_group_members SET done_at = p_now WHERE job_id = p_job AND done_at IS NULL;
    SELECT COUNT(*) INTO v_open FROM jobs WHERE instance_id = v_instance AND state <> 'done';
    IF v_open = 0 THEN
        DELETE FROM instances WHERE id = v_instance;
    END IF;
    RETURN v_open;
END $$;

-- An expired lease on a member of a dispatched group makes it WAITING again: its group is
-- claimed (and sent) as a group again. Other expired jobs are pending again.
CREATE OR REPLACE FUNCTION dn_heartbeat(p_node TEXT, p_now DOUBLE PRECISION, p_lease DOUBLE PRECISION)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    v_grouped INTEGER;
    v_expired INTEGER;
BEGIN
    INSERT INTO nodes (name, started_at, heartbeat_at) VALUES (p_node, p_now, p_now)
    ON CONFLICT (name) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at;
    UPDATE jobs SET lease_until = p_now + p_lease
    WHERE claimed_by = p_node AND state = 'running';
    UPDATE jobs SET state = 'waiting', claimed_by = NULL, lease_until = NULL, updated_at = p_now
    WHERE state = 'running' AND lease_until < p_now AND id IN (
        SELECT m.job_id FROM job_group_members m JOIN job_groups g ON g.id = m.group_id
        WHERE g.state = 'dispatched' AND g.kind = 'forward' AND m.done_at IS NULL);
    GET DIAGNOSTICS v_grouped = ROW_COUNT;
    UPDATE jobs SET state = 'pending', claimed_by = NULL, lease_until = NULL, updated_at = p_now
    WHERE state = 'running' AND lease_until < p_now;
    GET DIAGNOSTICS v_expired = ROW_COUNT;
    RETURN v_grouped + v_expired;
END $$;
"""

# Storage Commitment records (node.jobs.commitments' tables) and the finished-instance
# history, written by dn_complete_job when the connection says keep_finished.
COMMITMENT = """
CREATE TABLE commitments (
    id BIGSERIAL PRIMARY KEY,
    direction TEXT NOT NULL,
    transaction_uid TEXT NOT NULL,
    peer TEXT NOT NULL,
    our_ae_title TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error TEXT,
    updated_at DOUBLE PRECISION NOT NULL,
    -- The node that recorded it (node.jobs.commitments' INSERT leaves it to the default).
    node TEXT NOT NULL DEFAULT current_setting('dicom_node.node')
);
CREATE INDEX commitments_by_transaction ON commitments (direction, transaction_uid);
CREATE TABLE commitment_items (
    commitment_id BIGINT NOT NULL REFERENCES commitments (id),
    position INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    reason INTEGER,
    job_id BIGINT,
    PRIMARY KEY (commitment_id, position)
);
CREATE INDEX commitment_items_by_job ON commitment_items (job_id);
CREATE TABLE finished_instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    finished_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX finished_instances_by_age ON finished_instances (finished_at);

CREATE OR REPLACE FUNCTION dn_complete_job(p_job BIGINT, p_result TEXT, p_now DOUBLE PRECISION)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    v_instance BIGINT;
    v_open INTEGER;
BEGIN
    SELECT instance_id INTO v_instance FROM jobs WHERE id = p_job;
    IF v_instance IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM instances WHERE id = v_instance FOR UPDATE;
    UPDATE jobs SET state = 'done', result = p_result, last_error = NULL, updated_at = p_now,
        claimed_by = NULL, lease_until = NULL
    WHERE id = p_job;
    UPDATE job_group_members SET done_at = p_now WHERE job_id = p_job AND done_at IS NULL;
    SELECT COUNT(*) INTO v_open FROM jobs WHERE instance_id = v_instance AND state <> 'done';
    IF v_open = 0 THEN
        IF current_setting('dicom_node.keep_finished', true) = 'on' THEN
            INSERT INTO finished_instances (sop_instance_uid, sop_class_uid, finished_at)
            SELECT sop_instance_uid, sop_class_uid, p_now FROM instances WHERE id = v_instance
            ON CONFLICT (sop_instance_uid) DO UPDATE
                SET sop_class_uid = EXCLUDED.sop_class_uid, finished_at = EXCLUDED.finished_at;
        END IF;
        DELETE FROM instances WHERE id = v_instance;
    END IF;
    RETURN v_open;
END $$;
"""

# The header values intake reads for the storage layouts (ReceivedInstance.header_values).
HEADER_VALUES = """
ALTER TABLE instances ADD COLUMN IF NOT EXISTS header_values TEXT NOT NULL DEFAULT '';
"""

# (id, what it does, SQL). Append only; never edit a released one.
MIGRATIONS: list[tuple[str, str, str]] = [
    ("0001-core", "instances, jobs, the stored index, nodes, completion functions", CORE),
    ("0002-groups", "series and study groups; completion and heartbeat know them", GROUPS),
    ("0003-commitment", "Storage Commitment records and finished instances", COMMITMENT),
    ("0004-header-values", "instances.header_values", HEADER_VALUES),
]

# Features that need tables of their own append (id, description, SQL) here, as they add
# their CREATE TABLE IF NOT EXISTS text to node.jobs.database.EXTRA_SCHEMAS for SQLite.
EXTRA_MIGRATIONS: list[tuple[str, str, str]] = []

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    id TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def all_migrations() -> Sequence[tuple[str, str, str]]:
    return [*MIGRATIONS, *EXTRA_MIGRATIONS]
