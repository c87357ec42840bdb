"""The configuration, parsed once from TOML into frozen, typed dataclasses.

Errors name the file and the dotted key. Values that another stage knows how
to check (path templates, passcode hashes, transfer syntax targets) are checked
here with that stage's parser, so a bad config stops the node at start.

May import: node.dicom, node.transcode.targets, node.store.layout,
node.ingest.identity.
"""
