"""Stage 5: transcoding that never corrupts an image.

Verified encodes (every lossless output is decoded by an independent decoder
and compared by value), a fallback ladder whose last rung is the instance as
received, and codecs isolated in worker processes, since some abort or
segfault the interpreter.

May import: node.dicom, node.daemon.logs (worker processes set up logging), node.shape
(a target's header changes, made in the same step as its encode).
"""

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
