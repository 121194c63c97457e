"""Adapters for the ports in :mod:`tokenbroker.ports`. Heavy ones are imported lazily."""
