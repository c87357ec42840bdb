"""The status page: a read-only web page served by the node itself, and the JSON API under
/api/ that it renders (and that scripts can use). `dicom-node status --json` and
/api/status come from one function (status).

Modules: the HTTP server in a thread of the node (server), the WSGI application's
routes (app), the token, sessions and CSRF (auth), requests, responses and the security
headers (wsgi), the data as JSON-ready dicts (overview),
HTML (pages) and SVG charts drawn on the server (charts), what the page reads of the
running node (view: the NodeView protocol, implemented by node.daemon.webview), and
the in-memory history fed by node.daemon.metrics: per-minute traffic (traffic), recent
associations and delivery delays (activity).

May import: node.config, node.jobs. Never node.daemon: the daemon hands it a NodeView.
"""
