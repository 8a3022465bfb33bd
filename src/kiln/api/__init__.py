"""The HTTP API (FastAPI): thin routes over the store and the job queue."""
