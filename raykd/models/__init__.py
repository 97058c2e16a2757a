"""Ranking models (teachers and students). Nothing in this package knows about Ray."""
