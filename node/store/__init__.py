"""Stage 5-6: storage targets. Store workers claim jobs, have worker processes
transcode where a target asks for another syntax, and place each file by its
path template (layout) with an atomic rename (durable).

May import: node.jobs, node.transcode, node.config, node.dicom, node.ingest
(the spool), node.daemon.metrics, node.shape (a target's header changes).
"""
