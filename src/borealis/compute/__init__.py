"""Compute: the PostgreSQL servers (writer and readers) and how they are set up."""
