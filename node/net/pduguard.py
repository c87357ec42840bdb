"""Receive-side limits on what a peer may make the node read for one PDU or one message.

A hostile or broken peer could claim gigabytes in one PDU header or send a
dataset that never ends. The Upper Layer codec (node.net.ul) checks every PDU
header against pdu_limit before reading its body, node.net.association the
running size of each dataset, and the association is aborted when:
- a P-DATA-TF PDU is longer than the maximum PDU length we advertised
  (node.max_pdu; PS3.8 D.1), or any other PDU is over 1 MiB;
- the dataset fragments of one message exceed twice limits.max_instance_size.
Between the limit and twice the limit, the instance is received and refused
with 0xA700 by intake, which tells an honest sender why.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.net.pdu import P_DATA_TF

OTHER_PDU_LIMIT = 1024 * 1024
# Peers round differently around the advertised maximum; a little slack costs nothing.
PDU_SLACK = 1024


class ReceiveLimitExceeded(Exception):
    """The peer sent more than the node accepts; the connection is dropped."""


@dataclass
class ReceiveLimits:
    max_pdu: int = 0  # node.max_pdu: 0 is unlimited
    max_instance_size: int = 0  # limits.max_instance_size: 0 is unlimited

    def pdu_limit(self, pdu_type: int) -> int:
        if pdu_type != P_DATA_TF:
            return OTHER_PDU_LIMIT
        if self.max_pdu:
            return self.max_pdu + PDU_SLACK
        return self.message_limit()

    def message_limit(self) -> int:
        return 2 * self.max_instance_size if self.max_instance_size else 0
