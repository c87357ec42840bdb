"""The running node: builds the stages from the config and runs them (server),
signals, reload and shutdown (lifecycle), extra receiver processes
(receivers), systemd notification (notify), journald logging (logs), the
Prometheus endpoint and the counters the status page keeps (metrics), and the
status page's view of the running node (webview).

May import: every stage package, node.config and node.web.
"""
