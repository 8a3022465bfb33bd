"""The ``kiln`` command line: thin adapters over the library (parse, call, render)."""
