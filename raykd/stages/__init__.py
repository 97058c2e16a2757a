"""Pipeline stages: each a function of a config dataclass that writes its parts, then a manifest."""
