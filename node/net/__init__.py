"""The DICOM Upper Layer (PS3.8) and DIMSE (PS3.7) as the node speaks them.

One sans-I/O Upper Layer codec (ul: PDU framing, PDV and message assembly),
shared by both ends; PDU bodies (pdu) and command sets (dimse); the acceptor that
runs one association per thread (association); the requestor for forwarding,
`dicom-node send` and `echo` (storelink); TLS contexts (tls) and the receive
limits (pduguard). No stage logic: what to do with a message belongs
to the handlers the acceptor is given.

May import: node.dicom, node.config; today also node.ingest (the spool's file
meta reader and the arriving-dataset buffer), which the layout issue moves here.
"""
