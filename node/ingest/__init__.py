"""Stage 1-3: admit an association, receive its instances, make them durable.

The listener and admission (AE allowlist, limits, user identity) decide who may
associate; scp negotiates and hands each C-STORE to intake, which checks the
header, writes the received bytes to the spool with fsync and records the
instance and its jobs in one transaction before the status is returned. route
decides the jobs. pynetdicom_acceptor is the second acceptor onto the same
handlers. The receiver never decodes pixels.

scp also hands Storage Commitment's N-ACTION and N-EVENT-REPORT to
node.commitment.

May import: node.net, node.dicom, node.config, node.jobs, node.store (durable
writes), node.commitment (its handlers), node.daemon.metrics.
"""
