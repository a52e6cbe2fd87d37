"""Prefect flows: compose the stages; pass ids, paths and keys, never live models or images."""
