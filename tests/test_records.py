"""Records: sealed by a manifest, any later change detected, no secret kept."""

import json
from pathlib import Path

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
    forged = record.path / "notebooks" / "01-preflight.ipynb"
    forged.write_text('{"forged": true}')   # a forger writes the files by hand: the runbooks never would
    manifest = record.manifest()
    manifest["notebooks"][0]["sha256"] = manifest["files"]["notebooks/01-preflight.ipynb"] = records.sha256_of(forged)
    record.manifest_path.write_text(json.dumps(manifest))
    assert record.verify() == []  # consistent with itself: only the seal noted elsewhere tells
    assert record.seal() == records.sha256_of(record.manifest_path) != seal


# -- a sealed record never changes ---------------------------------------------------------------

def sealed_writes(path: Path) -> dict:
    """Every write records.py offers, aimed at `path` (a file of a record, or the record itself)."""
    def open_and_write():
        with records.open_for_writing(path, "ab") as f:
            f.write(b"x")
    return {
        "write_text": lambda: records.write_text(path, "x"),
        "write_bytes": lambda: records.write_bytes(path, b"x"),
        "open_for_writing": open_and_write,
        "create_empty": lambda: records.create_empty(path.with_name("new.dump.partial")),
        "make_folder": lambda: records.make_folder(path.parent / "maintenance"),
        "rename": lambda: records.rename(path, path.with_name("moved")),
        "remove": lambda: records.remove(path),
        "redact_files": lambda: records.redact_files(path.parent, ["PGDMP..."]),
    }


@pytest.mark.parametrize("name", sorted(sealed_writes(Path("x"))))
@pytest.mark.parametrize("where", ["backup/db.dump", "notebooks/01-preflight.ipynb"])
def test_every_write_into_a_sealed_record_is_refused_and_the_record_still_verifies(record, name, where):
    seal = record.seal()
    with pytest.raises(records.SealedRecord, match="is sealed"):
        sealed_writes(record.path / where)[name]()
    assert record.verify() == [] and record.seal() == seal


def test_a_sealed_record_is_never_sealed_again(record):
    seal = record.seal()
    with pytest.raises(records.SealedRecord):
        record.write_manifest(record.manifest())
    assert record.seal() == seal and record.verify() == []


def test_the_runbooks_write_into_records_only_through_the_guarded_writers():
    """Every call that writes a file in runbooks/ is in records.py (the guarded writers), or in a
    module that never writes into a record (named here, with why)."""
    assert write_calls() == ALLOWED_WRITES


# Writes outside records.py, none into a record: the embedded server's cluster (its WAL archive among
# them), service and password files and the sandbox's exports (embedded.py, sandbox.py), a restore's temporary directory
# (restore.py), Jupyter's runtime directory (runner.py), papermill writing the executed notebook
# into the run's new folder (runner.py, after records.check_writable of that path), and an object store's
# private working folders (storage.py: its marker, copies fetched to read, and a record's local copy
# removed once the store holds it sealed).
ALLOWED_WRITES = {
    ("embedded.py", "chmod"), ("embedded.py", "chown"), ("embedded.py", "copytree"), ("embedded.py", "mkdir"),
    ("embedded.py", "open"),
    ("embedded.py", "rename"), ("embedded.py", "rmtree"), ("embedded.py", "touch"), ("embedded.py", "unlink"),
    ("embedded.py", "write_text"), ("sandbox.py", "unlink"), ("sandbox.py", "write_text"),
    ("restore.py", "open"), ("restore.py", "write_text"),
    ("runner.py", "execute_notebook"), ("runner.py", "mkdir"),
    ("storage.py", "mkdir"), ("storage.py", "rmtree"), ("storage.py", "write_text"),
}
WRITING_CALLS = {"write_text", "write_bytes", "mkdir", "makedirs", "unlink", "remove", "rename", "replace", "rmtree",
                 "copytree", "copy", "copyfile", "copy2", "move", "touch", "chmod", "chown", "execute_notebook",
                 "fdopen"}


def write_calls() -> set[tuple[str, str]]:
    """(module, call) of every call that writes a file, outside records.py: open() with a writing mode,
    os./shutil./Path methods that write, nbformat.write, gzip.open, papermill's execute_notebook."""
    import ast

    import runbooks
    found = set()
    for path in sorted(Path(runbooks.__file__).parent.glob("*.py")):
        if path.name == "records.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if name in ("open",) and _writing_mode(node):
                found.add((path.name, "open"))
            elif name == "write" and owner == "nbformat":
                found.add((path.name, "nbformat.write"))
            elif name == "replace" and owner not in ("os",):
                continue   # str.replace
            elif name in WRITING_CALLS and not (name == "remove" and owner == "records"):
                if owner != "records":
                    found.add((path.name, name))
    return found


def _writing_mode(call) -> bool:
    import ast
    modes = [a.value for a in call.args[1:2] if isinstance(a, ast.Constant)] + \
            [k.value.value for k in call.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
    return any(isinstance(m, str) and set(m) & set("wax+") for m in modes) or \
        (getattr(call.func, "value", None) is not None and getattr(call.func.value, "id", "") == "os")


def test_known_secrets_come_from_pgpassword_and_the_pgpass_file(tmp_path, monkeypatch):
    passfile = tmp_path / "pgpass"
    passfile.write_text("# comment\nhost:5432:*:alice:s3cr3t\\:colon\ndb:*:*:bob:tiny\n")
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    monkeypatch.setenv("PGPASSWORD", "from-the-environment")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert records.known_secrets() == ["from-the-environment", "s3cr3t:colon"]


def test_the_object_stores_secret_key_and_token_are_secrets_too_from_the_environment_or_credentials_file(
        tmp_path, monkeypatch):
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = file-secret-key\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-key")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-session-token")
    assert records.known_secrets() == ["env-secret-key", "env-session-token", "file-secret-key"]
    (tmp_path / "record").mkdir()
    (tmp_path / "record" / "run.ipynb").write_text('{"x": "file-secret-key"}')
    assert records.find_secrets(tmp_path / "record", records.known_secrets()) == ["run.ipynb"]


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


# -- the commit a run used ---------------------------------------------------------------------

def git(root: Path, *args: str) -> None:
    import subprocess
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_a_commit_is_clean_when_only_notebooks_executed_in_place_differ_and_dirty_when_a_cell_was_edited(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    (tmp_path / "notebooks").mkdir()
    path = tmp_path / "notebooks" / "00_preflight.ipynb"
    parameters = new_code_cell("target_name = None", metadata={"tags": ["parameters"]})
    nbformat.write(new_notebook(cells=[parameters, new_code_cell("run.check(x)")]), path)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "notebooks")
    assert records.git_facts(tmp_path)["git_dirty"] is False

    nb = nbformat.read(path, as_version=4)   # run by hand: outputs, counts, the target named, saved in place
    nb.cells[0].source = 'target_name = "sandbox"'
    nb.cells[1].outputs = [new_output("stream", text="ok")]
    nb.cells[1].execution_count = 7
    nbformat.write(nb, path)
    facts = records.git_facts(tmp_path)
    assert facts["git_dirty"] is False and facts["git_executed_notebooks"] == ["notebooks/00_preflight.ipynb"]
    assert "(clean; executed in place: 00_preflight)" in records.commit_text(facts)

    nb.cells[1].source = "run.check(y)"   # a cell edited: what ran is not the commit's
    nbformat.write(nb, path)
    facts = records.git_facts(tmp_path)
    assert facts["git_dirty"] is True and "(with uncommitted changes)" in records.commit_text(facts)


def step_writers(folder: Path) -> dict:
    """The steps that keep files in a run's record (those that need no database to reach their write)."""
    from types import SimpleNamespace

    from runbooks import backup, by_hand, connection, later_writes, pages, promotion, snapshot
    target = connection.Target(name="practice", kind="service")
    run = SimpleNamespace(record_dir=folder, run_id=folder.name, target=target, facts={}, operator="dba",
                          notebook="02_phase2_core_schema")
    return {
        "by_hand.start (a notebook joining the run)": lambda: by_hand.start(run),
        "by_hand.finish (its verdict into the journal)": lambda: by_hand.finish(run, "passed"),
        "backup.take_backup (into backup/)": lambda: backup.take_backup(target, folder / "backup", folder.name),
        "snapshot.save_snapshot": lambda: snapshot.save_snapshot({}, folder / "snapshot-after-rollback.json"),
        "later_writes.write_row_state": lambda: later_writes.write_row_state(None, folder / later_writes.ROW_STATE_FILE),
        "promotion.write": lambda: promotion.write(folder, promotion.Decision(production=False, allowed=True, phase_files={}, max_age_days=14)),
        "pages.write_index": lambda: pages.write_index(folder, {"run_id": folder.name, "notebooks": []}),
        "pages.export_notebook": lambda: pages.export_notebook(folder / "notebooks" / "01-preflight.ipynb", ""),
    }


@pytest.mark.parametrize("name", sorted(step_writers(Path("x"))))
def test_every_step_that_keeps_a_file_refuses_a_sealed_record_and_it_still_verifies(record, name):
    seal = record.seal()
    with pytest.raises(records.SealedRecord):
        step_writers(record.path)[name]()
    assert record.verify() == [] and record.seal() == seal
