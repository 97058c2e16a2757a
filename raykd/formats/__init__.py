"""On-disk formats: Arrow schemas, readers of the raw files users have, and the text store contract.

Nothing in this package knows about Ray."""
