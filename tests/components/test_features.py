"""features and the feature store: Feast apply/materialize in a copy of the repo (public
API, definitions imported afresh), point-in-time features, retrieval quality on the demo
data, and identical prompts for training and serving."""
from __future__ import annotations

import bisect
import collections
import shutil
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from components import features, featurestore, generate
from components.base import StageError
from components.featurestore import (Embedder, FeaturesSpec, LocalOnline, Retriever, online_context, online_features,
                                     open_store)
from components.splits import read_examples
from components.task import TaskSpec
from llmops.spec import load_spec
from tests.conftest import REPO, build_features_and_prepare

SPEC = load_spec(REPO / "pipelines.yaml", env={})


@pytest.fixture(scope="module")
def demo():
    return generate.generate()  # the default demo data: 2,000 tickets


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo):
    root = tmp_path_factory.mktemp("features")
    f_result, p_result, io = build_features_and_prepare(root, demo)
    store = open_store(io.feature_repo, io.state_dir, io.pipeline)
    embedder = Embedder("all-minilm-l6-v2", dict(SPEC.models), io.state_dir)
    return {"root": root, "io": io, "store": store, "embedder": embedder, "features": f_result, "prepare": p_result,
            "demo": demo}


def as_of(profiles: pd.DataFrame, customer_id: str, when: pd.Timestamp) -> dict:
    """Reference point-in-time lookup: the latest snapshot at or before ``when``."""
    snaps = profiles[profiles.customer_id == customer_id].sort_values("event_timestamp")
    i = bisect.bisect_right(list(snaps.event_timestamp), when) - 1
    return snaps.iloc[i].to_dict()


def test_apply_registers_the_definitions(built):
    store = built["store"]
    assert {fv.name for fv in store.list_feature_views()} == {"customer_profile", "article_embeddings"}
    assert [v.name for v in store.list_on_demand_feature_views()] == ["customer_flags"]
    assert {e.name for e in store.list_entities()} >= {"customer", "article"}
    assert [fs.name for fs in store.list_feature_services()] == ["triage"]
    assert built["features"].metrics == {"n_profiles": len(built["demo"].customer_profiles),
                                         "n_customers": built["demo"].customers.customer_id.nunique(),
                                         "n_articles": len(built["demo"].articles),
                                         "articles_embedded": len(built["demo"].articles), "articles_reused": 0}
    service, names = featurestore.feature_service(store, "triage")
    assert names == ["plan", "tenure_days", "open_tickets_30d", "seats", "new_customer", "busy_account",
                     "account_weight"]
    with pytest.raises(StageError, match="no feature service 'nope' in the Feast registry \\(services: triage\\)"):
        featurestore.feature_service(store, "nope")


def test_training_profiles_are_point_in_time(built, demo):
    examples = {e["ticket_id"]: e for s in ("train", "validation", "test")
                for e in read_examples(built["root"] / "prepare" / f"{s}.jsonl")}
    profiles = demo.customer_profiles
    latest = profiles.sort_values("event_timestamp").groupby("customer_id").tail(1).set_index("customer_id")
    checked = changed = 0
    flags = collections.Counter()
    for t in demo.tickets.itertuples():
        snap = as_of(profiles, t.customer_id, t.created_at)
        user = examples[t.ticket_id]["messages"][1]["content"]
        # the on-demand policy weight is computed from that same snapshot (free -1, enterprise +1,
        # +1 under 30 days of tenure, +1 with 3 or more tickets open)
        new, busy = snap["tenure_days"] < 30, snap["open_tickets_30d"] >= 3
        weight = {"free": -1, "enterprise": 1}.get(snap["plan"], 0) + new + busy
        assert f"| plan: {snap['plan']} | account weight: {weight:+d}\n" in user
        flags[new, busy] += 1
        checked += 1
        if latest.plan[t.customer_id] != snap["plan"]:  # the plan changed after this ticket
            assert f"| plan: {latest.plan[t.customer_id]} |" not in user
            changed += 1
    assert checked == 2000 and changed > 100
    assert len(flags) == 4 and min(flags.values()) > 20  # every combination occurs


@pytest.mark.parametrize(("query", "article"), [
    ("I was charged twice this month for Tessera Inbox, please refund the duplicate", "KB-105"),
    ("Password reset e-mail never arrives, I cannot log in to the iOS app", "KB-204"),
    ("How do I export all records from Tessera Boards to a CSV file?", "KB-702"),
    ("Please cancel our Tessera API subscription and close the account", "KB-803"),
    ("The desktop sync client takes minutes to load, everything times out", "KB-401"),
])
def test_retrieval_finds_the_article_for_unambiguous_queries(built, query, article):
    top = Retriever(LocalOnline(built["store"]), built["embedder"], top_k=3).search([query])[0]
    assert top[0]["article_id"] == article
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]


def test_recall_at_3_on_the_demo_data(built):
    recall = built["prepare"].report.retrieval_recall
    assert recall["all"] >= 0.99 and set(recall) == {"all", "train", "validation", "test"}


def test_retrieval_ranking_matches_brute_force_cosine(built):
    table = pd.read_parquet(built["root"] / "features" / "article_embeddings.parquet")
    vectors = np.stack(table.embedding.values)
    queries = ["refund for the android app", "dashboards are slow", "connect Salesforce to the shared inbox"]
    found = Retriever(LocalOnline(built["store"]), built["embedder"], top_k=5).search(queries)
    for q, hits in zip(built["embedder"].encode(queries), found):
        exact = table.article_id.values[np.argsort(-(vectors @ q))[:5]]
        assert [h["article_id"] for h in hits] == list(exact)
        np.testing.assert_allclose([h["score"] for h in hits], np.sort(vectors @ q)[::-1][:5], atol=1e-3)


def test_training_and_serving_build_the_same_prompt(built, demo, tmp_path):
    """Materialize the online store up to a ticket's time; the serving path must then
    produce exactly the prompt that training used for that ticket."""
    io = built["io"]
    example = read_examples(built["root"] / "prepare" / "test.jsonl")[7]
    ticket = demo.tickets.set_index("ticket_id").loc[example["ticket_id"]]
    state = tmp_path / "state"
    shutil.copytree(featurestore.feast_state(io.state_dir, io.pipeline) / "offline",
                    featurestore.feast_state(state, io.pipeline) / "offline")
    store = open_store(io.feature_repo, state, io.pipeline, require_registry=False)
    online = LocalOnline(store)
    online.apply(io.feature_repo)
    start = datetime(2020, 1, 1, tzinfo=timezone.utc)
    online.materialize(start, datetime.now(timezone.utc), views=["article_embeddings"])
    online.materialize(start, ticket.created_at.to_pydatetime(), views=["customer_profile"])
    retriever = Retriever(online, built["embedder"], top_k=3)
    context = online_context(store, online, retriever, FeaturesSpec(), TaskSpec(),
                             {"ticket_id": example["ticket_id"], **ticket.to_dict()})
    assert context["messages"] == example["messages"][:2]
    assert [a["article_id"] for a in context["articles"]] == example["retrieved"]


def test_unknown_customer(built):
    online = LocalOnline(built["store"])
    profile = online_features(built["store"], online, FeaturesSpec(), "CUST-9999")
    assert profile == {"plan": None, "tenure_days": None, "open_tickets_30d": None, "seats": None,
                       "new_customer": "unknown", "busy_account": "unknown", "account_weight": "unknown"}
    with pytest.raises(StageError, match="unknown customer_id 'CUST-9999': no features in the online store"):
        online_features(built["store"], online, FeaturesSpec(unknown_customer="error"), "CUST-9999")
    context = online_context(built["store"], online, Retriever(online, built["embedder"], 3), FeaturesSpec(),
                             TaskSpec(), {"customer_id": "CUST-9999", "channel": "chat",
                                          "subject": "Refund", "body": "charged twice for Tessera Sync"})
    assert "| plan: unknown | account weight: unknown\n" in context["messages"][1]["content"]


def test_a_second_apply_in_the_same_process_uses_its_own_sources(built, tmp_path):
    io = built["io"]
    store = open_store(io.feature_repo, tmp_path / "other-state", "t", require_registry=False)
    featurestore.apply_here(store, io.feature_repo)
    other = store.registry.get_data_source("customer_profiles", store.project)
    assert other.path.startswith(str(tmp_path / "other-state"))
    mine = built["store"].registry.get_data_source("customer_profiles", built["store"].project, allow_cache=False)
    assert mine.path.startswith(str(io.state_dir))


def test_missing_registry_says_what_to_run(built, tmp_path):
    with pytest.raises(StageError, match="no Feast registry in .*; run `llmops features apply`"):
        open_store(built["io"].feature_repo, tmp_path / "empty", "t")


def test_embedding_skips_unchanged_articles(built, demo, tmp_path):
    cache = tmp_path / "cache.parquet"
    stamp = pd.Timestamp("2026-10-01", tz="UTC")
    first, embedded, reused = features.embed_articles(demo.articles, built["embedder"], cache, stamp)
    assert (embedded, reused) == (40, 0)
    changed = demo.articles.copy()
    changed.loc[5, "body"] += " Updated for the new billing portal."
    second, embedded, reused = features.embed_articles(changed, built["embedder"], cache, stamp)
    assert (embedded, reused) == (1, 39)
    assert not np.allclose(first.embedding[5], second.embedding[5])
    np.testing.assert_array_equal(np.stack(first.embedding.drop(5)), np.stack(second.embedding.drop(5)))
    assert np.allclose(np.linalg.norm(np.stack(second.embedding), axis=1), 1.0, atol=1e-5)


def test_a_feature_server_refuses_a_store_another_process_has_open(built):
    """Milvus Lite's lock: with the store open here (as in a running features or prepare
    stage), the feature server exits and says what holds the store and what to do."""
    from components import featureserver

    io = built["io"]
    LocalOnline(built["store"]).read([{"customer_id": "CUST-0001"}], features=["customer_profile:plan"])
    with pytest.raises(featurestore.FeatureStoreUnavailable,
                       match=r"online_store.db is open in another process \(a pipeline run's features or prepare "
                             r"stage, or `llmops features materialize`\); start the feature server when it has "
                             "finished"):
        featureserver.start(io.feature_repo, io.state_dir, io.pipeline, timeout_s=120)
    assert featureserver.running(io.state_dir, io.pipeline) is None
