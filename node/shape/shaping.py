"""A target's view of an instance: de-identification, then coercion, on one data set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.shape.coerce import Coercion
from node.shape.deidentify import Deidentification
from node.shape.errors import ShapingFailed, ShapingRefused

__all__ = ["ShapeContext", "Shaping", "ShapingFailed", "ShapingRefused", "apply_shaping"]


@dataclass(frozen=True)
class ShapeContext:
    """What templates may use besides the instance: its association."""

    calling_ae_title: str = ""
    called_ae_title: str = ""

    def fields(self) -> dict[str, str]:
        return {"CallingAETitle": self.calling_ae_title, "CalledAETitle": self.called_ae_title}


@dataclass(frozen=True)
class Shaping:
    """Picklable: worker processes get it with the rung they run."""

    coercion: Coercion | None = None
    deidentification: Deidentification | None = None

    def describe(self) -> str:
        """For the log line of each instance: which profile and which coercion applied."""
        parts = [
            part.describe() for part in (self.deidentification, self.coercion) if part is not None
        ]
        return "; ".join(p for p in parts if p)

    @property
    def key(self) -> str:
        """Names this view in derived file names: equal shapings share one file. The UID
        key enters only as a digest of a digest, so the name reveals nothing of it."""
        text = repr((self.coercion, self.deidentification and self.deidentification.options))
        secret = self.deidentification.secret if self.deidentification else b""
        text += hashlib.sha256(secret).hexdigest()
        if self.deidentification is not None:
            text += repr(self.deidentification.keep)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def apply_shaping(ds: Dataset, shaping: Shaping, context: ShapeContext) -> None:
    """Change ds's header for one target; raises ShapingRefused or ShapingFailed.

    De-identification comes first, so a coercion's templates see de-identified values
    and no template can put an original identifier back into a de-identified copy.
    """
    if shaping.deidentification is not None:
        shaping.deidentification.apply(ds)
    if shaping.coercion is not None:
        shaping.coercion.apply(ds, context.fields())
