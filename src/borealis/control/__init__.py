"""The control plane: state in SQLite, supervision of every process, the local API."""
