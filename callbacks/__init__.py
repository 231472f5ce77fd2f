"""Tracker integrations for trainer_lib, one module per tracker; each imports its tracker lazily."""
