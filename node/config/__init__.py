"""The configuration, parsed once from TOML into frozen, typed dataclasses.

model.py holds the dataclasses, the one source of truth for every key (type,
default, bounds); schema.py is the reader their fields drive; render.py prints
the effective config (`check-config`) by the same fields.

Errors name the file and the dotted key. Values that another stage knows how
to check (path templates, passcode hashes, transfer syntax targets) are checked
here with that stage's parser, so a bad config stops the node at start.

May import: node.dicom, node.transcode.targets, node.store.layout,
node.ingest.identity, node.shape (coercion templates, attribute names, Annex E options).
"""
