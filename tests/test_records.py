"""Records: sealed by a manifest, any later change detected, no secret kept."""

import json

import pytest

from runbooks import records


@pytest.fixture
def record(tmp_path):
    record = records.Record.create(tmp_path, records.new_run_id())
    (record.path / "notebooks" / "01-preflight.ipynb").write_text("{}")
    (record.path / "backup").mkdir()
    (record.path / "backup" / "db.dump").write_bytes(b"PGDMP...")
    record.write_manifest({"run_id": record.run_id, "notebooks": [
        {"name": "preflight", "file": "notebooks/01-preflight.ipynb",
         "sha256": records.sha256_of(record.path / "notebooks" / "01-preflight.ipynb")}]})
    return record


def test_run_ids_sort_by_time_and_are_unique():
    ids = {records.new_run_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(records.RUN_ID_PATTERN.match(i) for i in ids)
    with pytest.raises(records.RecordError, match="not a run id"):
        records.check_run_id("../../etc")


def test_an_untouched_record_verifies(record):
    assert record.verify() == []


@pytest.mark.parametrize("tamper, problem", [
    (lambda p: (p / "notebooks" / "01-preflight.ipynb").write_text('{"x": 1}'), "altered: notebooks/01-preflight.ipynb"),
    (lambda p: (p / "backup" / "db.dump").unlink(), "missing: backup/db.dump"),
    (lambda p: (p / "notebooks" / "extra.html").write_text("<p>"), "not in manifest: notebooks/extra.html"),
])
def test_any_change_to_a_record_file_is_detected(record, tamper, problem):
    tamper(record.path)
    assert problem in "\n".join(record.verify())


def test_a_manifest_edited_to_match_a_tampered_file_disagrees_with_itself(record):
    notebook = record.path / "notebooks" / "01-preflight.ipynb"
    notebook.write_text('{"forged": true}')
    manifest = json.loads(record.manifest_path.read_text())
    manifest["files"]["notebooks/01-preflight.ipynb"] = records.sha256_of(notebook)
    record.manifest_path.write_text(json.dumps(manifest))
    assert any("disagrees with itself" in p for p in record.verify())


def test_a_record_rewritten_with_a_fresh_manifest_verifies_but_its_seal_changes(record):
    seal = record.seal()
    (record.path / "notebooks" / "01-preflight.ipynb").write_text('{"forged": true}')
    manifest = record.manifest()
    manifest["notebooks"][0]["sha256"] = records.sha256_of(record.path / "notebooks" / "01-preflight.ipynb")
    record.write_manifest(manifest)
    assert record.verify() == []  # consistent with itself: only the seal noted elsewhere tells
    assert record.seal() == records.sha256_of(record.manifest_path) != seal


def test_known_secrets_come_from_pgpassword_and_the_pgpass_file(tmp_path, monkeypatch):
    passfile = tmp_path / "pgpass"
    passfile.write_text("# comment\nhost:5432:*:alice:s3cr3t\\:colon\ndb:*:*:bob:tiny\n")
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    monkeypatch.setenv("PGPASSWORD", "from-the-environment")
    assert records.known_secrets() == ["from-the-environment", "s3cr3t:colon"]


def test_secrets_are_found_by_file_name_only(tmp_path):
    (tmp_path / "a.html").write_text("nothing here")
    (tmp_path / "b.ipynb").write_text('{"x": "hunter2-long"}')
    assert records.find_secrets(tmp_path, ["hunter2-long"]) == ["b.ipynb"]


def test_a_secret_is_redacted_from_every_file_as_typed_or_escaped_for_json_and_html(tmp_path):
    secret = 'pa"ss<&>word-42'
    (tmp_path / "plain.log").write_text(f"connected with {secret}\n")
    (tmp_path / "nb.ipynb").write_text(json.dumps({"text": secret}))
    (tmp_path / "nb.html").write_text("<pre>pa&quot;ss&lt;&amp;&gt;word-42</pre>")
    (tmp_path / "clean.txt").write_text("nothing here")
    assert records.redact_files(tmp_path, [secret]) == ["nb.html", "nb.ipynb", "plain.log"]
    assert records.find_secrets(tmp_path, [secret]) == []
    assert json.loads((tmp_path / "nb.ipynb").read_text()) == {"text": "[REDACTED]"}
    assert (tmp_path / "nb.html").read_text() == "<pre>[REDACTED]</pre>"


def test_a_secret_in_manifest_data_is_redacted_in_text_and_a_number_that_holds_it_is_replaced_whole():
    manifest = {"parameters": {"approver": "Dana s3cret-123456", "max_transaction_seconds": 123456789,
                               "take_backup": True},
                "notebooks": [{"error": "s3cret-123456 seen"}], "plan": ("preflight",)}
    assert records.redact_data(manifest, ["s3cret-123456", "23456789"]) == {
        "parameters": {"approver": "Dana [REDACTED]", "max_transaction_seconds": "[REDACTED]", "take_backup": True},
        "notebooks": [{"error": "[REDACTED] seen"}], "plan": ("preflight",)}
