"""The five stages as plain functions over frozen dataclasses. No Prefect, SQL or CLI in here."""
