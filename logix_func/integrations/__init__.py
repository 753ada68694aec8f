"""Integrations of logix_func with training frameworks (each needs its own extra)."""
