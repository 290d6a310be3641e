"""Where records live: a local folder, or an object store every run worker reaches (`s3://bucket/prefix`).

`--records` and the fleet's records setting take either. A local folder is what it always was. For an
object store a run writes its record locally as before (a private working folder), seals it, and then
publishes it: every file, `manifest.json` last and only if no record of that run id is there yet (a
conditional put: a sealed record is never overwritten), so a reader never sees a record without its
manifest. Once the store holds every file at its size the local copy is removed (the backup in it is a
full copy of the database); if publishing fails the local copy stays and the error names it.

Reading works the same on both: `list_records`, `open(run_id)` (a record whose `manifest()`, `seal()` and
`verify()` read the store: each file is re-hashed as it streams, nothing is kept on disk) and `fetch(run_id)`
(a local copy, for what needs files: a rollback's backup, a verification's baseline). So `records
list/show/verify`, promotion evidence and rollback read a record written by a run on another worker.

The client is boto3 (papermill's own S3 I/O uses it too), configured only by the AWS SDK's own means:
credentials from the environment, `~/.aws` or the instance's role, the endpoint of an S3-compatible server
from `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`). No key is ever a setting of the project. `pip install
-e '.[s3]'` brings it; without it an `s3://` location is refused naming the extra.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import mimetypes
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlparse

from . import records

SCHEMES = ("s3",)                    # what an object-store location may be, besides a local folder
LOCATION_FILE = ".records-location"  # in a working folder: the location its records are published to
WEB_ENV = "RUNBOOK_RECORDS_WEB"      # optional: the https address the store's records are served at (pages)


class StorageError(records.RecordError):
    """A records location that cannot be used as given (refused before anything runs: exit 2)."""


class PublishError(Exception):
    """A sealed record could not be published to its location; its local copy is kept (exit 1)."""


def is_url(value) -> bool:
    return "://" in str(value)


def argument(text: str):
    """`--records` as given: a Path for a folder, the URL itself for an object store."""
    return text if is_url(text) else Path(text)


def location(value) -> "LocalFolder | ObjectStore":
    """The records location a --records value or setting names."""
    if isinstance(value, (LocalFolder, ObjectStore)):
        return value
    text = str(value)
    if not is_url(text):
        return LocalFolder(Path(text))
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return LocalFolder(Path(parsed.path))
    if parsed.scheme not in SCHEMES or not parsed.netloc:
        raise StorageError(f"records location {text!r}: use a local folder or an object store URL like "
                           "s3://bucket/prefix (" + ", ".join(f"{s}://" for s in SCHEMES) + ")")
    return ObjectStore(bucket=parsed.netloc, prefix=parsed.path.strip("/"))


def home_of(record_dir) -> "str | Path":
    """Where a run's records are published: the location its working folder names, else the folder
    holding the record (the preflight's promotion check looks there for staging evidence)."""
    root = Path(record_dir).parent
    marker = root / LOCATION_FILE
    return marker.read_text().strip() if marker.is_file() else root


# -- a local folder --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalFolder:
    """Records in a folder of this machine (or a shared file system mounted on every worker)."""

    path: Path
    remote = False

    def __str__(self) -> str:
        return str(self.path)

    def check(self) -> None:
        """A local folder is checked by the command that names it (cli.check_records_folder)."""

    def workdir(self) -> Path:
        return self.path

    def publish(self, record: records.Record, progress=print) -> records.Record:
        return record

    def list_records(self) -> list[dict]:
        return records.list_records(self.path)

    def open(self, run_id: str) -> records.Record:
        return records.Record.open(self.path, run_id)

    def fetch(self, run_id: str, skip: tuple[str, ...] = ()) -> Path:
        """The folder holding the record (here: this one; whoever reads it says when it is missing)."""
        return self.path

    def latest_with_snapshot(self, target: dict) -> Path | None:
        return records.latest_with_snapshot(self.path, target)

    def record_url(self, run_id: str) -> str:
        return str((self.path / run_id).resolve())

    def page_url(self, run_id: str) -> str:
        return (self.path / run_id / records.INDEX_FILE).resolve().as_uri()


# -- an object store -----------------------------------------------------------------------------

def _client():
    try:
        import boto3
    except ImportError:
        raise StorageError("records in an object store need boto3: pip install -e '.[s3]'") from None
    return boto3.client("s3")


@dataclass
class ObjectStore:
    """Records under s3://bucket/prefix/<run id>/ in an S3-compatible object store."""

    bucket: str
    prefix: str
    remote = True
    _client: object = field(default=None, repr=False)
    _workdir: Path | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def client(self):
        if self._client is None:
            self._client = _client()
        return self._client

    def key(self, run_id: str, name: str = "") -> str:
        return "/".join(part for part in (self.prefix, run_id, name) if part)

    def check(self) -> None:
        """The bucket can be reached with the SDK's credentials (else refused, exit 2, before anything runs)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"records location {self}: cannot reach the bucket ({exc})") from None

    def workdir(self) -> Path:
        """A private local folder where runs write their records before publishing them here."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="runbook-records-"))   # mode 0700: dumps inside
            (self._workdir / LOCATION_FILE).write_text(str(self) + "\n")
            atexit.register(_remove_if_empty, self._workdir)
        return self._workdir

    def list_records(self) -> list[dict]:
        """Every published record (one with its manifest), oldest first."""
        rows = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key("") + "/" if self.prefix else "", Delimiter="/")
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                run_id = common["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                if records.RUN_ID_PATTERN.match(run_id):
                    record = RemoteRecord.at(self, run_id)
                    if record.exists():
                        rows.append(records.headline(run_id, record.manifest()))
        return sorted(rows, key=lambda row: row["run_id"])

    def open(self, run_id: str) -> "RemoteRecord":
        record = RemoteRecord.at(self, records.check_run_id(run_id))
        if not record.exists():
            raise records.RecordError(f"no record {run_id} in {self} (no {records.MANIFEST})")
        return record

    def objects(self, run_id: str) -> dict[str, int]:
        """Every object of a record: name in the record -> size."""
        found = {}
        start = self.key(run_id) + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            found.update({item["Key"][len(start):]: item["Size"] for item in page.get("Contents", [])})
        return found

    def fetch(self, run_id: str, skip: tuple[str, ...] = ()) -> Path:
        """A local copy of a record (less the files under `skip`), in a private folder removed at exit;
        the folder that holds it is returned, as a records root."""
        self.open(run_id)
        root = Path(tempfile.mkdtemp(prefix="runbook-fetched-"))
        atexit.register(shutil.rmtree, root, True)
        for name in self.objects(run_id):
            if not any(name.startswith(prefix) for prefix in skip):
                local = root / run_id / name
                local.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, self.key(run_id, name), str(local))
        return root

    def latest_with_snapshot(self, target: dict) -> Path | None:
        """A local copy (without its backup) of the newest record of `target` that holds a snapshot."""
        wanted = {k: target.get(k) for k in ("kind", "name")}
        for row in reversed(self.list_records()):
            manifest = self.open(row["run_id"]).manifest()
            same = {k: (manifest.get("target") or {}).get(k) for k in ("kind", "name")} == wanted
            if same and records.SNAPSHOT_FILE in (manifest.get("files") or {}):
                return self.fetch(row["run_id"], skip=(records.BACKUP_DIR + "/",)) / row["run_id"]
        return None

    def record_url(self, run_id: str) -> str:
        return f"{self}/{run_id}/"

    def page_url(self, run_id: str) -> str:
        """The record's index.html over https: at $RUNBOOK_RECORDS_WEB when set, else the object's URL."""
        web = os.environ.get(WEB_ENV)
        if web:
            return f"{web.rstrip('/')}/{run_id}/{records.INDEX_FILE}"
        return f"{self.client.meta.endpoint_url.rstrip('/')}/{self.bucket}/{quote(self.key(run_id, records.INDEX_FILE))}"

    def publish(self, record: records.Record, progress=print) -> "RemoteRecord":
        """Upload a sealed record, its manifest last and only if none is there; then drop the local copy."""
        try:
            self._upload(record)
        except Exception as exc:   # network, credentials, a record of that run id already there
            raise PublishError(f"record {record.run_id} is sealed at {record.path} but was not published to "
                               f"{self}: {exc}. It is kept there; nothing of it was lost") from None
        shutil.rmtree(record.path)
        progress(f"record published: {self.record_url(record.run_id)} (seal unchanged)")
        return self.open(record.run_id)

    def _upload(self, record: records.Record) -> None:
        local = {str(p.relative_to(record.path)): p for p in sorted(record.path.rglob("*")) if p.is_file()}
        manifest = local.pop(records.MANIFEST)
        if RemoteRecord.at(self, record.run_id).exists():
            raise PublishError(f"a sealed record {record.run_id} is there already")
        for name, path in local.items():
            self._put(record.run_id, name, path)
        self._put(record.run_id, records.MANIFEST, manifest, only_new=True)
        there = self.objects(record.run_id)
        wrong = [name for name, path in {**local, records.MANIFEST: manifest}.items()
                 if there.get(name) != path.stat().st_size]
        if wrong:
            raise PublishError("the store does not hold " + ", ".join(wrong) + " as written")

    def _put(self, run_id: str, name: str, path: Path, only_new: bool = False) -> None:
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        extra = {"ContentType": kind, **({"IfNoneMatch": "*"} if only_new else {})}
        with open(path, "rb") as body:
            self.client.put_object(Bucket=self.bucket, Key=self.key(run_id, name), Body=body, **extra)


def _remove_if_empty(folder: Path) -> None:
    """A working folder goes at exit once every record in it was published (only its marker is left)."""
    if folder.is_dir() and [p.name for p in folder.iterdir()] == [LOCATION_FILE]:
        shutil.rmtree(folder, ignore_errors=True)


class RemoteRecord(records.Record):
    """A published record read from the store: its manifest, seal and verification, as a local record's."""

    store: ObjectStore
    _manifest_bytes: bytes | None = None

    @classmethod
    def at(cls, store: ObjectStore, run_id: str) -> "RemoteRecord":
        record = cls(Path(tempfile.gettempdir()) / "not-local", run_id)   # no local folder: path is a placeholder
        record.store = store
        return record

    def _read(self, name: str) -> bytes:
        return self.store.client.get_object(Bucket=self.store.bucket, Key=self.store.key(self.run_id, name))["Body"].read()

    def exists(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.store.client.head_object(Bucket=self.store.bucket, Key=self.store.key(self.run_id, records.MANIFEST))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    @property
    def sealed(self) -> bool:
        """A published record is sealed: its manifest is in the store (never written again)."""
        return self.exists()

    def manifest_bytes(self) -> bytes:
        if self._manifest_bytes is None:
            self._manifest_bytes = self._read(records.MANIFEST)
        return self._manifest_bytes

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_bytes())
        except json.JSONDecodeError as exc:
            raise records.RecordError(f"{self.store.record_url(self.run_id)}{records.MANIFEST}: not valid JSON ({exc})") from None

    def seal(self) -> str:
        return hashlib.sha256(self.manifest_bytes()).hexdigest()

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every object of the record, hashed as it streams (nothing written to disk)."""
        hashes = {}
        for name in sorted(self.store.objects(self.run_id)):
            if name != records.MANIFEST and not name.endswith(".tmp"):
                digest = hashlib.sha256()
                body = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store.key(self.run_id, name))["Body"]
                for block in iter(lambda: body.read(1 << 20), b""):
                    digest.update(block)
                hashes[name] = digest.hexdigest()
        return hashes
