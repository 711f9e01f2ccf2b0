"""Prefect flows: orchestration only (what runs, in what order, with which retries)."""
