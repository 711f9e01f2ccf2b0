"""Feast definitions for the support-triage model: customers' profiles over time, and the
help-center articles with their embeddings, indexed for vector search."""
import os
from datetime import timedelta

import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Array, Float32, Int64, String

OFFLINE = os.environ.get("LLMOPS_FEAST_OFFLINE", os.path.join(os.path.dirname(__file__), "..", ".llmops",
                                                               "feast", "support-triage", "offline"))

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING,
                  description="A Tessera customer account")
article = Entity(name="article", join_keys=["article_id"], value_type=ValueType.STRING,
                 description="A help-center article")

customer_profile = FeatureView(
    name="customer_profile",
    entities=[customer],
    ttl=timedelta(days=365),  # a snapshot older than this counts as unknown
    schema=[
        Field(name="plan", dtype=String),
        Field(name="tenure_days", dtype=Int64),
        Field(name="open_tickets_30d", dtype=Int64),
        Field(name="seats", dtype=Int64),
    ],
    source=FileSource(name="customer_profiles", path=os.path.join(OFFLINE, "customer_profiles.parquet"),
                      timestamp_field="event_timestamp"),
    description="The customer's plan, tenure, open tickets and seats, snapshotted every ~2 weeks",
)



@on_demand_feature_view(
    sources=[customer_profile],
    schema=[Field(name="new_customer", dtype=String), Field(name="busy_account", dtype=String),
            Field(name="account_weight", dtype=String)],
    description="Support-policy flags, computed from the profile at read time (online and offline alike): "
                "new customer = tenure under 30 days; busy account = 3 or more tickets open in 30 days; "
                "account weight = the policy's priority adjustment for the account (free plan -1, enterprise "
                "+1, +1 for a new customer, +1 for a busy account), signed, 'unknown' without a profile",
)
def customer_flags(profile: pd.DataFrame) -> pd.DataFrame:
    def flag(condition: pd.Series, known: pd.Series) -> pd.Series:
        return condition.map({True: "yes", False: "no"}).where(known, "unknown")

    tenure, open_tickets, plan = profile["tenure_days"], profile["open_tickets_30d"], profile["plan"]
    known = tenure.notna() & open_tickets.notna() & plan.notna()
    weight = (plan.map({"free": -1, "enterprise": 1}).fillna(0) + (tenure < 30).astype(int)
              + (open_tickets >= 3).astype(int))
    return pd.DataFrame({"new_customer": flag(tenure < 30, tenure.notna()),
                         "busy_account": flag(open_tickets >= 3, open_tickets.notna()),
                         "account_weight": weight.map(lambda w: f"{int(w):+d}").where(known, "unknown")})


article_embeddings = FeatureView(
    name="article_embeddings",
    entities=[article],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="title", dtype=String),
        Field(name="text_sha256", dtype=String),
        Field(name="embedding", dtype=Array(Float32), vector_index=True, vector_search_metric="COSINE"),
    ],
    source=FileSource(name="article_embeddings", path=os.path.join(OFFLINE, "article_embeddings.parquet"),
                      timestamp_field="event_timestamp"),
    description="Article title and all-MiniLM-L6-v2 embedding (384 dims) of title + body",
)

triage = FeatureService(name="triage", features=[customer_profile, customer_flags],
                        description="What the triage model reads about a customer")
