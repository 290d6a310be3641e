"""squawk over phase files: findings shown with their lines, the no-transaction tail understood."""

import textwrap

from runbooks import lint
from runbooks.paths import PHASES


def write(tmp_path, sql):
    path = tmp_path / "100_lint.sql"
    path.write_text(textwrap.dedent(sql).lstrip())
    return path


def test_a_blocking_index_build_is_a_warning_with_its_line(tmp_path):
    check = lint.lint_check(write(tmp_path, """
        select 1;
        create index if not exists orders_customer_idx on orders (customer_id);
    """), 18)
    assert check.status == "warning"
    assert [(f["line"], f["rule"]) for f in check.rows] == [(2, "require-concurrent-index-creation")]


def test_a_concurrent_build_marked_to_run_after_the_commit_is_not_flagged(tmp_path):
    check = lint.lint_check(write(tmp_path, """
        create table if not exists t (id bigint primary key, x bigint);
        -- runbook: no-transaction
        create index concurrently if not exists t_x_idx on t (x);
    """), 18)
    assert "ban-concurrent-index-creation-in-transaction" not in [f["rule"] for f in check.rows]


def test_the_shipped_phase_files_are_lint_clean():
    for _, path in PHASES:
        check = lint.lint_check(path, 15)
        assert check.status == "ok", (path.name, check.rows)
