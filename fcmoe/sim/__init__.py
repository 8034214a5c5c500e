"""The in-process simulation engine."""
