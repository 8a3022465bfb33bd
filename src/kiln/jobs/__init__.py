"""Jobs: a durable queue in the metadata database and the workers that run it."""
