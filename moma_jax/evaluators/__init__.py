"""Evaluators: plug-ins chosen by the config; each ``run(...)`` yields (metric name, value)."""
