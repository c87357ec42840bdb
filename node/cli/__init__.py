"""The `dicom-node` command line: run, check-config, echo, send, transcode,
queue, status and hash-passcode. Each subcommand parses its arguments and
calls into the stages; none holds stage logic.

May import: every package.
"""
