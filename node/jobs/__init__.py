"""Stage 4: the durable job queue (SQLite in WAL mode, synchronous=FULL).

Instances, their storage and forward jobs, retries, holds, the stored index and
the reports `queue status`, `status` and the metrics read.

May import: nothing else of the node's.
"""
