"""Stage 7: forwarding. One durable queue and worker threads per destination,
retries with backoff and holds (forwarder), durable completions off the
sending threads (completions) and transcoded copies made once per syntax
(derived); Storage Commitment towards destinations with commitment = true,
where a job is done only once the report says committed (commitment);
DICOMweb destinations by STOW-RS: the request body and the answer
without I/O (stow), the HTTP sender a worker uses (dicomweb).

May import: node.net, node.jobs, node.transcode, node.config, node.dicom,
node.ingest (the spool), node.daemon.metrics, node.shape (a destination's header
changes), node.commitment (its messages and counters).
"""
