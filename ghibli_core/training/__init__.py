"""Trainers. Each trainer is a function taking a JSON-able config dataclass."""
