"""ingest: from the generator, from local files, from S3 (a real S3 server on localhost),
and clear errors for malformed files."""
from __future__ import annotations

import json

import boto3
import pandas as pd
import pytest

from components import generate
from components.base import StageError, StageIO, file_sha256
from components.ingest import FilesSource, GenerateSource, IngestSpec, read_tables, run


def _write_jsonl(data, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in data.TABLES:
        getattr(data, name).to_json(folder / f"{name}.jsonl", orient="records", lines=True, date_format="iso")


def test_generate_source_writes_the_four_tables(tmp_path):
    cfg = IngestSpec(source=GenerateSource(n_tickets=120, n_customers=20, seed=2))
    result = run(cfg, StageIO(pipeline="t", out_dir=tmp_path))
    assert set(result.outputs) == {"tickets", "customers", "customer_profiles", "articles"}
    assert result.report.rows["tickets"] == 120 and result.report.rows["articles"] == 40
    assert result.report.tickets_sha256 == file_sha256(result.outputs["tickets"])
    assert len(pd.read_parquet(result.outputs["tickets"])) == 120


def test_files_source_reads_jsonl_like_the_generator_wrote_it(tmp_path, demo_small):
    _write_jsonl(demo_small, tmp_path / "raw")
    result = run(IngestSpec(source=FilesSource(uri=str(tmp_path / "raw"))), StageIO(pipeline="t", out_dir=tmp_path / "o"))
    tickets = pd.read_parquet(result.outputs["tickets"])
    assert list(tickets.ticket_id) == list(demo_small.tickets.ticket_id)
    assert (tickets.created_at == demo_small.tickets.created_at).all()


def test_s3_source(tmp_path, demo_small, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="support")
    paths = demo_small.write(tmp_path / "local")
    for name, path in paths.items():
        s3.upload_file(str(path), "support", f"2026-11/{name}.parquet")
    s3.put_object(Bucket="support", Key="2026-11/archive/old.parquet", Body=b"ignored: a subfolder")
    tables = read_tables("s3://support/2026-11", s3_endpoint)
    assert len(tables["tickets"]) == 300 and len(tables["articles"]) == 40
    with pytest.raises(StageError, match="no files under s3://support/nothing-here"):
        read_tables("s3://support/nothing-here", s3_endpoint)


@pytest.fixture
def raw(tmp_path, demo_small):
    folder = tmp_path / "raw"
    _write_jsonl(demo_small, folder)
    return folder


def test_bad_json_line_names_file_and_line(raw):
    lines = (raw / "tickets.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-1]  # drop the closing brace
    (raw / "tickets.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=r"tickets.jsonl:7: invalid JSON"):
        read_tables(str(raw))


def test_wrong_encoding_names_file_and_line(raw):
    with open(raw / "articles.jsonl", "ab") as fh:
        fh.write(json.dumps({"article_id": "KB-1", "title": "x", "body": "y"}).encode("latin-1") + b"\n")
        fh.write('{"article_id": "KB-2", "title": "café", "body": "y"}\n'.encode("latin-1"))
    with pytest.raises(StageError, match=r"articles.jsonl:42: not valid UTF-8"):
        read_tables(str(raw))


def test_missing_column(raw):
    df = pd.read_json(raw / "customers.jsonl", lines=True).drop(columns=["signup_at"])
    df.to_json(raw / "customers.jsonl", orient="records", lines=True)
    with pytest.raises(StageError, match=r"customers.jsonl: missing column\(s\) signup_at"):
        read_tables(str(raw))


def test_empty_file(raw):
    (raw / "customer_profiles.jsonl").write_text("")
    with pytest.raises(StageError, match="customer_profiles.jsonl: file has no rows"):
        read_tables(str(raw))


def test_missing_table(raw):
    (raw / "articles.jsonl").unlink()
    with pytest.raises(StageError, match="missing table 'articles'"):
        read_tables(str(raw))


def test_unparseable_timestamp(raw):
    lines = (raw / "tickets.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    row["created_at"] = "last tuesday"
    lines[3] = json.dumps(row)
    (raw / "tickets.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=r"row 4: column created_at: cannot parse 'last tuesday'"):
        read_tables(str(raw))


def test_missing_folder(tmp_path):
    with pytest.raises(StageError, match="folder .* does not exist"):
        read_tables(str(tmp_path / "nope"))


def test_mixed_types_in_a_column(raw):
    lines = (raw / "tickets.jsonl").read_text().splitlines()
    row = json.loads(lines[4])
    row["subject"] = 12345
    lines[4] = json.dumps(row)
    (raw / "tickets.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=r"tickets.jsonl: row 5: column subject: int value 12345 in a column of str"):
        read_tables(str(raw))


def _traffic(folder, n: int = 4):
    """A labelled-traffic folder as `llmops data from-traffic` writes it: tickets and origin."""
    tickets = generate.generate(n_tickets=n, n_customers=60, seed=3, shift="language").tickets
    tickets["ticket_id"] = [f"triage-{i:032x}" for i in range(n)]
    folder.mkdir(parents=True)
    tickets.to_parquet(folder / "tickets.parquet", index=False)
    pd.DataFrame({"ticket_id": tickets.ticket_id, "model": ["triage/1"] * (n - 1) + ["triage/2"]}).to_parquet(
        folder / "origin.parquet", index=False)
    return tickets


def test_extra_tables_are_added_beside_the_source_and_their_origin_counted(tmp_path):
    traffic = _traffic(tmp_path / "data" / "traffic")
    cfg = IngestSpec(source=GenerateSource(n_tickets=300, n_customers=60, seed=3), extra=["data/traffic"])
    result = run(cfg, StageIO(pipeline="t", out_dir=tmp_path / "o", root=tmp_path))
    tickets = pd.read_parquet(result.outputs["tickets"])
    assert len(tickets) == 304 and list(tickets.ticket_id[300:]) == list(traffic.ticket_id)
    assert list(tickets.body[300:]) == list(traffic.body) and (tickets.language[300:] == "es").all()
    assert result.report.rows == {"tickets": 304, "customers": 60, "customer_profiles": result.report.rows[
        "customer_profiles"], "articles": 40}
    assert result.report.tickets_by_origin == {"source": 300, "data/traffic": 4}
    [origin] = result.report.extra
    assert origin.uri == "data/traffic" and origin.rows == {"tickets": 4} and origin.dvc_md5 is None
    assert origin.sha256 == {"tickets": file_sha256(tmp_path / "data" / "traffic" / "tickets.parquet")}
    assert origin.models == {"triage/1": 3, "triage/2": 1}
    assert "| data/traffic | tickets 4 | sha256 " in result.summary


def test_extra_folders_that_are_missing_empty_or_listed_twice_are_named(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(StageError, match=r"ingest.extra: data/traffic: folder .*data/traffic does not exist"):
        run(IngestSpec(extra=["data/traffic"]), StageIO(pipeline="t", out_dir=tmp_path / "o", root=tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="holds none of the tables tickets, customers, customer_profiles, articles"):
        run(IngestSpec(extra=["empty"]), StageIO(pipeline="t", out_dir=tmp_path / "o", root=tmp_path))
    with pytest.raises(ValidationError, match="listed twice: data/traffic"):
        IngestSpec(extra=["data/traffic", "data/traffic"])
