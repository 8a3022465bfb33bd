"""Storage: the metadata database (SQLAlchemy) and the artifact store (fsspec)."""
