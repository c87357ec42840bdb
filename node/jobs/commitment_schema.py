"""The Storage Commitment tables (node.jobs.commitments), listed in database.EXTRA_SCHEMAS."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS commitments (
    id INTEGER PRIMARY KEY,
    direction TEXT NOT NULL,
    transaction_uid TEXT NOT NULL,
    peer TEXT NOT NULL,
    our_ae_title TEXT NOT NULL,
    created_at REAL NOT NULL,
    deadline REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS commitments_by_transaction ON commitments (direction, transaction_uid);
CREATE TABLE IF NOT EXISTS commitment_items (
    commitment_id INTEGER NOT NULL REFERENCES commitments (id),
    position INTEGER NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    reason INTEGER,
    job_id INTEGER,
    PRIMARY KEY (commitment_id, position)
);
CREATE INDEX IF NOT EXISTS commitment_items_by_job ON commitment_items (job_id);
CREATE TABLE IF NOT EXISTS finished_instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS finished_instances_by_age ON finished_instances (finished_at);
"""
