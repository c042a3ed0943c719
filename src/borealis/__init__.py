"""Borealis: Aurora-style PostgreSQL clusters on your own machines."""

__version__ = "0.1.0"
