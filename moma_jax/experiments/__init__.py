"""Experiments built on the trainer: the shipped tiny teachers and the small-scale replication."""
