"""Experiment configs (ml_collections ``get_config()`` files), one per experiment/table."""
