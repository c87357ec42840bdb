"""Stage 4: the durable job queue (SQLite in WAL mode, synchronous=FULL).

- model: received instances, job specs, jobs, kinds and states;
- interface: the JobQueue, QueueReports and QueueOperations protocols, the seam
  where another backend (PostgreSQL) plugs in;
- database: SQLite connections, schema and group commit;
- jobqueue: the worker-facing API (intake, claim, complete, retry, holds, the
  stored index);
- reports: operations and the one job report behind `queue status`, `status`
  and the metrics;
- retry: the one retry schedule of store and forward jobs;
- commitments (tables in commitment_schema): Storage Commitment requests
  received and sent, and the history of finished instances;
- groups: series and study groups (membership recorded with the instance,
  dispatch, group claims, late arrivals as new versions);
- rows: the job row as the SELECTs read it;
- batches: one thread that handles what has piled up as one batch (the
  durable commits of forward deliveries and placed store jobs).
- postgres, postgres_schema, postgres_reports, postgres_groups: the same on
  PostgreSQL, shared by the nodes of a cluster (pool, SKIP LOCKED claims, leases,
  versioned migrations);
- backends: which backend a node opens ([queue] backend).

May import: nothing else of the node's.
"""
