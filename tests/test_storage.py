"""Records in an object store: published once sealed, read back (list, show, verify) as from a folder.

Against moto's S3 server on 127.0.0.1 (tests/object_store.py), through the package's boto3 client and
the `runbook records` commands. Runs that publish their records (through Dagster, on two workers) are
in tests/test_fleet.py. Skipped where boto3 or moto's server is not installed (`pip install -e .[fleet]`).
"""

import pytest

pytest.importorskip("boto3", reason="the s3 extra is not installed (pip install -e .[s3])")
pytest.importorskip("moto", reason="moto's S3 server is not installed (pip install -e .[fleet])")

import object_store  # noqa: E402  (after the skips)

from runbooks import records, storage  # noqa: E402
from runhelpers import runbook  # noqa: E402


@pytest.fixture(scope="module")
def endpoint():
    with object_store.s3_server() as address:
        yield address


@pytest.fixture
def sealed(tmp_path):
    """A sealed record on disk, as a run leaves it before publishing."""
    record = records.Record.create(tmp_path / "work", records.new_run_id())
    (record.path / "notebooks" / "01-preflight.ipynb").write_text("{}")
    (record.path / "backup").mkdir()
    (record.path / "backup" / "db.dump").write_bytes(b"PGDMP..." * 1000)
    record.write_manifest({"run_id": record.run_id, "command": "deploy", "target": {"kind": "target", "name": "stg"},
                           "verdict": "passed", "started_at": records.utc_now(), "notebooks": [
                               {"name": "preflight", "file": "notebooks/01-preflight.ipynb", "status": "passed",
                                "sha256": records.sha256_of(record.path / "notebooks" / "01-preflight.ipynb")}]})
    return record


def url(name: str) -> str:
    return f"s3://{object_store.BUCKET}/{name}"


def test_a_published_record_lists_shows_and_verifies_as_it_did_on_disk(endpoint, sealed, capsys):
    seal, where = sealed.seal(), url("published")
    published = storage.location(where).publish(sealed, progress=lambda *_: None)
    assert not sealed.path.exists()   # the local copy goes once the store holds every file
    assert published.seal() == seal and published.verify() == []
    assert runbook("records", "list", "--records", where) == 0
    assert sealed.run_id in capsys.readouterr().out
    assert runbook("records", "show", sealed.run_id, "--records", where) == 0
    assert f"run {sealed.run_id}: deploy" in capsys.readouterr().out
    assert runbook("records", "verify", sealed.run_id, "--records", where) == 0
    out = capsys.readouterr().out
    assert "intact: every file matches the manifest" in out and seal in out
    head = object_store.client().head_object(Bucket=object_store.BUCKET, Key=f"published/{sealed.run_id}/index.html")
    assert head["ContentType"] == "text/html"


@pytest.mark.parametrize("change, problem", [
    (lambda s3, key: s3.put_object(Bucket=object_store.BUCKET, Key=key + "notebooks/01-preflight.ipynb", Body=b"{1}"),
     "altered: notebooks/01-preflight.ipynb"),
    (lambda s3, key: s3.delete_object(Bucket=object_store.BUCKET, Key=key + "backup/db.dump"), "missing: backup/db.dump"),
    (lambda s3, key: s3.put_object(Bucket=object_store.BUCKET, Key=key + "notebooks/extra.html", Body=b"<p>"),
     "not in manifest: notebooks/extra.html"),
])
def test_any_change_to_a_published_record_is_found_by_records_verify(endpoint, sealed, capsys, change, problem):
    where = url("changed")
    storage.location(where).publish(sealed, progress=lambda *_: None)
    change(object_store.client(), f"changed/{sealed.run_id}/")
    assert runbook("records", "verify", sealed.run_id, "--records", where) == 1
    assert problem in capsys.readouterr().out


def test_a_published_record_is_never_overwritten_and_a_refused_publish_keeps_the_local_copy(endpoint, sealed, tmp_path):
    where = url("once")
    first = storage.location(where).publish(sealed, progress=lambda *_: None)
    seal = first.seal()
    again = records.Record.create(tmp_path / "again", sealed.run_id)   # another record under the same run id
    again.write_manifest({"run_id": sealed.run_id, "verdict": "failed"})
    with pytest.raises(storage.PublishError, match="a sealed record .* is there already.*It is kept there"):
        storage.location(where).publish(again, progress=lambda *_: None)
    assert again.manifest_path.is_file() and storage.location(where).open(sealed.run_id).seal() == seal


def test_a_records_location_that_cannot_be_used_is_refused_with_exit_2(endpoint, capsys):
    assert runbook("records", "list", "--records", "gs://bucket/records") == 2
    assert "use a local folder or an object store URL like s3://bucket/prefix" in capsys.readouterr().err
    assert runbook("records", "list", "--records", "s3://no-such-bucket/records") == 2
    assert "s3://no-such-bucket/records: cannot reach the bucket" in capsys.readouterr().err


def test_a_records_page_is_linked_at_the_stores_address_or_where_the_records_are_served(endpoint, monkeypatch):
    store = storage.location(url("pages"))
    run_id = records.new_run_id()
    assert store.page_url(run_id) == f"{endpoint}/{object_store.BUCKET}/pages/{run_id}/index.html"
    monkeypatch.setenv(storage.WEB_ENV, "https://records.example.internal/truthsource/")
    assert store.page_url(run_id) == f"https://records.example.internal/truthsource/{run_id}/index.html"
