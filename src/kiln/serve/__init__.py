"""Serving: a bundle behind a backend, dynamic batching, deployments with routes."""
