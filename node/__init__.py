"""dicom-node: a DICOM storage node and router."""

__version__ = "0.1.0"
