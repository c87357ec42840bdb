"""The running node: builds the stages from the config and runs them (server),
signals, reload and shutdown (lifecycle), extra receiver processes
(receivers), systemd notification (notify), journald logging (logs) and the
Prometheus endpoint (metrics).

May import: every stage package and node.config.
"""
