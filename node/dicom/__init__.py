"""DICOM data encoding that every stage shares: reading a received header without
decoding pixels (header) and transfer syntax names (syntaxes).

May import: nothing else of the node's.
"""
