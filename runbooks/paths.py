"""Where the project's files are: the package runs from a clone, beside sql/ and notebooks/."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = PROJECT_ROOT / "sql"
SUPPORT_DIR = SQL_DIR / "support"
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
SHIM_FILE = SUPPORT_DIR / "supabase_shim.sql"
LEGACY_FIXTURE_FILE = SUPPORT_DIR / "legacy_fixture.sql"

# The three phases, in order: (version, file).
PHASES = (
    ("000", SQL_DIR / "000_core_functions.sql"),
    ("001", SQL_DIR / "001_core_schema.sql"),
    ("002", SQL_DIR / "002_production_enhancements.sql"),
)
