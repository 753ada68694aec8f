"""Integrations with training frameworks; each module imports its framework on its own."""
