"""The DICOM Upper Layer (PS3.8) and DIMSE (PS3.7) as the node speaks them.

PDU and command set codecs (pdu, dimse), the acceptor that runs one
association per thread (association), the forwarding requestor (storelink),
pynetdicom fixes for `dicom-node send` (requestor), TLS contexts (tls) and the
receive limits (pduguard). No stage logic: what to do with a message belongs
to the handlers the acceptor is given.

May import: node.dicom, node.config; today also node.ingest (the spool's file
meta reader and the arriving-dataset buffer), which the layout issue moves here.
"""
