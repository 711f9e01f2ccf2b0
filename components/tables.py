"""The raw tables the pipeline reads (tickets, customers, customer profiles, articles):
their names and the columns each must have. ingest writes them, validate checks them."""
from __future__ import annotations

# Table -> required columns (more columns are kept; validation decides about them). The
# tickets' gold label columns are the task's answer fields (task.answer), checked by validate.
SCHEMA: dict[str, tuple[str, ...]] = {
    "tickets": ("ticket_id", "customer_id", "created_at", "channel", "subject", "body"),
    "customers": ("customer_id", "signup_at"),
    "customer_profiles": ("customer_id", "event_timestamp", "plan", "tenure_days", "open_tickets_30d"),
    "articles": ("article_id", "title", "body"),
}
TIME_COLUMNS = {"tickets": "created_at", "customers": "signup_at", "customer_profiles": "event_timestamp"}
