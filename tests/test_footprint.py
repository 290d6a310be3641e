"""Every record says what the app felt and the WAL and disk each phase used (runbooks/footprint.py).

A real phase notebook runs through the runner while a real app session waits on its locks; the record
(footprint/, manifest.json, index.html, the executed notebook) must say so. Waits are observed, never timed.
"""

from __future__ import annotations

import json
import threading

from runbooks import footprint, runner
from runhelpers import PHASE_TWO_WAITING_SQL, executed_notebook, hold_phase_two, notebook_text
from sqlhelpers import wait_until, waiting_backend

# the impact sampler has read the database since the app's wait began: it has seen the wait
SAMPLED_SINCE_SQL = """select 1 from pg_stat_activity s, pg_locks l
                        where s.application_name = 'runbook impact' and s.state = 'idle'
                          and l.pid = %s and not l.granted and s.query_start > l.waitstart"""


def test_a_phase_run_records_the_app_session_that_waited_on_it_and_the_wal_it_wrote(make_db, tmp_path):
    db = make_db("legacy@1")
    blocker = hold_phase_two(db)
    outcome: dict = {}
    plan = threading.Thread(target=lambda: outcome.setdefault("run", runner.run_plan(
        "deploy", ("phase2",), db.target, records_root=tmp_path, parameters={"lock_timeout": "10min"},
        progress=lambda *_: None)))
    plan.start()
    app = db.connect(application_name="the app", autocommit=True)
    reading = threading.Thread(target=lambda: app.cursor().execute("select count(*) from public.organizations"))
    try:
        wait_until(lambda: db.query(PHASE_TWO_WAITING_SQL, (blocker.get_backend_pid(),)), "phase 2 waiting",
                   stopped=lambda: None if plan.is_alive() else "the run ended")
        reading.start()
        app_pid = waiting_backend(db, "the app")
        wait_until(lambda: db.query(SAMPLED_SINCE_SQL, (app_pid,)), "the impact sampler reading during the app's wait")
        blocker.rollback()
        plan.join()
        reading.join()
    finally:
        blocker.close()
        app.close()
    run = outcome["run"]
    assert run.verdict == "passed", run.error
    manifest = json.loads(run.record.manifest_path.read_text())
    measured = manifest["footprint"]["001"]
    assert measured["impact"]["sessions_waited"] == 1
    assert measured["impact"]["longest"]["application"] == "the app"
    assert measured["resources"]["wal_bytes"] > 0 and measured["resources"]["replicas"] == 0
    assert (run.record.path / footprint.FOLDER / "phase-001.json").is_file()
    assert manifest["files"].get(f"{footprint.FOLDER}/phase-001.json"), "the footprint is hashed with the record"
    index = (run.record.path / "index.html").read_text()
    assert 'id="runbook-impact"' in index and "1 session waited, none cancelled" in index
    assert 'id="runbook-resources"' in index and "no replica streaming" in index
    text = notebook_text(executed_notebook(run))
    assert "what the app felt" in text and "the app" in text
