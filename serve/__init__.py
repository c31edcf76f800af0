"""Ray Serve application: encoder deployments, fusion ingress, REST API and metrics (see README)."""
