"""Executors a worker hands training runs to (:class:`kiln.train.executor.Executor`):
Ray Train on a Ray cluster (:mod:`kiln.jobs.executors.ray`)."""
