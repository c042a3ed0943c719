"""WAL facts: LSN text form, segment arithmetic, timeline history and a record verifier."""
