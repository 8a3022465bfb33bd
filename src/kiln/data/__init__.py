"""Data: reading tables, column inference, fitted preprocessing, splits."""
