"""Storage Commitment Push Model (PS3.4 J), SOP Class 1.2.840.10008.1.20.1, in both roles.

As SCP, for the modalities that send to the node:
- messages: the N-ACTION and N-EVENT-REPORT data sets (the command sets are
  node.net.dimse's);
- requests: an N-ACTION-RQ checked, recorded durably, answered;
- evaluator: when a referenced instance counts as committed (`[commitment] when`);
- reporter: the thread that settles requests and delivers the N-EVENT-REPORT-RQ,
  over the requesting association or a new one, until delivered;
- service: what the acceptor's handlers call, for both roles;
- counters: the metrics.

The SCU role towards destinations with `commitment = true` is the forwarder's
(node.forward.commitment); it uses messages from here.

May import: node.net, node.jobs, node.config.
"""
