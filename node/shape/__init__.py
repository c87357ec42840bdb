"""Header changes per target: tag coercion and PS3.15 Annex E de-identification.

A target (a [[storage]] or a [[destination]]) may ask for its own view of an
instance: attributes set from templates or deleted (`coerce`), or the Basic
Application Level Confidentiality Profile with keyed, deterministic UID
remapping (`deidentify`). Only the header changes: nothing here reads, decodes
or writes pixels, so the one encode path (node.transcode.rung) applies a
shaping to the data set it already holds, and Pixel Data goes out as it came.

May import: nothing else of the node's (node.config, node.transcode, node.store
and node.forward import it).
"""

from node.shape.shaping import (
    ShapeContext,
    Shaping,
    ShapingFailed,
    ShapingRefused,
    apply_shaping,
)

__all__ = ["ShapeContext", "Shaping", "ShapingFailed", "ShapingRefused", "apply_shaping"]
