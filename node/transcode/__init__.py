"""Transcoding that never corrupts an image: verified encodes, a fallback ladder, and
codecs isolated in worker processes."""

from node.transcode.ladder import Outcome, transcode_file, verification_mismatches
from node.transcode.pool import TranscodePool
from node.transcode.targets import Target, parse_target

__all__ = [
    "Outcome",
    "Target",
    "TranscodePool",
    "parse_target",
    "transcode_file",
    "verification_mismatches",
]
