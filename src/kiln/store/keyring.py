"""The keys of encryption at rest: the master key, per-project data keys, rotation.

Each project has one random 256-bit *data key* (table ``data_keys``), and the platform
has one more (``project_id`` NULL) for objects outside any project. Data keys are
stored only wrapped (AES-256-GCM, bound to their row's owner) by the *master key*:
``KILN_MASTER_KEY`` (base64 of 32 bytes) or ``$KILN_HOME/master.key`` (mode 0600),
created at the first start of a fresh platform, and never over existing data keys.
:func:`open_keyring` unwraps the platform key at start, so a missing or wrong master
key is an :class:`EncryptionError` then. A project's data key is made in the same
transaction that inserts the project (a flush hook), so no write ever waits for a
database lock; lookups read through an autocommit connection of their own.
:func:`rotate_master_key` re-wraps the data keys; the data itself is untouched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import create_engine, event, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from kiln.errors import ConflictError, EncryptionError, NotFoundError, SpecError
from kiln.settings import Settings
from kiln.store.db import Database
from kiln.store.tables import DataKey, Project, utcnow

log = logging.getLogger("kiln.crypto")

NONCE = 12
KEY_BYTES = 32
ENV = "KILN_MASTER_KEY"


# --- the master key ---------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class MasterKey:
    """The key that wraps every data key; ``source`` says where it came from (for messages)."""

    secret: bytes
    source: str

    @property
    def id(self) -> str:
        """A fingerprint (32 hex characters) that names the key without revealing it."""
        return hashlib.sha256(b"kiln master key id\0" + self.secret).hexdigest()[:32]

    def encoded(self) -> str:
        return base64.b64encode(self.secret).decode()

    def __repr__(self) -> str:
        return f"MasterKey(id={self.id!r}, source={self.source!r})"


def new_master_key(source: str) -> MasterKey:
    return MasterKey(secrets.token_bytes(KEY_BYTES), source)


def parse_master_key(text: str, source: str) -> MasterKey:
    """Decode base64 of exactly 32 bytes, or raise :class:`EncryptionError` naming ``source``."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise EncryptionError(
            f"{source} is not a master key: it must be base64 of 32 random bytes "
            "(make one with: openssl rand -base64 32)",
            field=ENV,
        )
    return MasterKey(raw, source)


def master_key_file(settings: Settings) -> Path:
    return settings.home_dir / "master.key"


def load_master_key(settings: Settings, *, create: bool) -> MasterKey:
    """``KILN_MASTER_KEY`` if set, else the key file; with ``create``, a new key file.

    Only a fresh platform (no data keys yet) may create one: see :func:`open_keyring`.
    """
    if settings.master_key is not None:
        return parse_master_key(settings.master_key.get_secret_value(), ENV)
    path = master_key_file(settings)
    if path.is_file():
        return parse_master_key(path.read_text(), str(path))
    if not create:
        raise EncryptionError(
            f"no master key: set {ENV} or copy the platform's key file to {path} "
            "(the data keys in the database are wrapped by it)",
            field=ENV,
        )
    key = new_master_key(str(path))
    if not write_secret(path, key.encoded()):  # another process made it first: use theirs
        return parse_master_key(path.read_text(), str(path))
    log.info("created the master key %s (mode 0600); back it up", path)
    return key


def write_secret(path: Path, text: str, *, replace: bool = False) -> bool:
    """Write ``text`` to ``path`` created 0600 (never widened), atomically.

    Without ``replace`` an existing file is kept and False returned (first writer wins).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic and refuses to overwrite
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


# --- data keys ----------------------------------------------------------------------------


def _wrap_ad(project_id: int | None) -> bytes:
    # a wrapped key is bound to its row's owner: it cannot be copied to another project
    owner = "platform" if project_id is None else f"project:{project_id}"
    return b"kiln data key\0" + owner.encode()


def wrap(master: MasterKey, data_key: bytes, project_id: int | None) -> str:
    nonce = secrets.token_bytes(NONCE)
    sealed = AESGCM(master.secret).encrypt(nonce, data_key, _wrap_ad(project_id))
    return base64.b64encode(nonce + sealed).decode()


def unwrap(master: MasterKey, wrapped: str, project_id: int | None) -> bytes:
    raw = base64.b64decode(wrapped)
    try:
        return AESGCM(master.secret).decrypt(raw[:NONCE], raw[NONCE:], _wrap_ad(project_id))
    except InvalidTag:
        raise EncryptionError(
            f"the master key from {master.source} does not unwrap the data keys: "
            f"it is not the key the platform was started with (set {ENV} or restore "
            "the original master.key)",
            field=ENV,
        ) from None


class _DataKeyRow(TypedDict):
    """The columns of a new :class:`DataKey` row."""

    project_id: int | None
    wrapped: str
    master_key_id: str


def _new_row(master: MasterKey, project_id: int | None) -> _DataKeyRow:
    data_key = secrets.token_bytes(KEY_BYTES)
    return {
        "project_id": project_id,
        "wrapped": wrap(master, data_key, project_id),
        "master_key_id": master.id,
    }


class Keyring:
    """Unwrapped data keys by row id, and which row encrypts which project's objects.

    Lookups after start read through a connection of their own in autocommit mode, so
    they never wait on (or take) a lock held by the caller's transaction.
    """

    def __init__(self, db: Database, master: MasterKey, platform_id: int) -> None:
        self.master = master
        self.platform_id = platform_id
        self._reader = create_engine(
            db.url,
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,  # lookups are rare (cache misses): nothing to dispose
            **({"connect_args": {"timeout": 30}} if db.is_sqlite else {}),
        )
        self._keys: dict[int, AESGCM] = {}
        self._projects: dict[str, int] = {}
        self._lock = threading.Lock()

    def cipher(self, key_id: int) -> AESGCM:
        """The data key of row ``key_id`` (raises :class:`EncryptionError` if unknown)."""
        with self._lock:
            found = self._keys.get(key_id)
        if found is not None:
            return found
        with self._reader.connect() as conn:
            row = conn.execute(
                select(DataKey.project_id, DataKey.wrapped).where(DataKey.id == key_id)
            ).first()
        if row is None:
            raise EncryptionError(f"unknown data key {key_id}: the object is from another platform")
        aead = AESGCM(unwrap(self.master, row.wrapped, row.project_id))
        with self._lock:
            self._keys[key_id] = aead
        return aead

    def key_for(self, artifact_key: str) -> int:
        """The data key row that encrypts ``artifact_key``: its project's, else the platform's."""
        parts = artifact_key.split("/")
        if len(parts) < 3 or parts[0] != "projects":
            return self.platform_id
        project = parts[1]
        with self._lock:
            found = self._projects.get(project)
        if found is not None:
            return found
        with self._reader.connect() as conn:
            key_id = conn.scalar(
                select(DataKey.id)
                .join(Project, Project.id == DataKey.project_id)
                .where(Project.name == project)
            )
        if key_id is None:
            # a project not committed yet (kiln serve stores its bundle first): the
            # platform key encrypts it; decryption reads the key id from the header
            return self.platform_id
        with self._lock:
            self._projects[project] = key_id
        return int(key_id)

    def install(self, db: Database) -> None:
        """Give every project inserted through ``db`` its data key, in the same flush."""

        def after_flush(session: Session, _context: Any) -> None:
            projects = [o for o in session.new if isinstance(o, Project)]
            if not projects:
                return
            conn = session.connection()
            current = conn.scalar(
                select(DataKey.master_key_id)
                .where(DataKey.project_id.is_(None))
                .order_by(DataKey.id)
                .limit(1)
            )
            if current is not None and current != self.master.id:
                raise EncryptionError(
                    "the master key was rotated while this process ran: restart it", field=ENV
                )
            for project in projects:
                # several stores may be opened on one Database: the first hook makes it
                if conn.scalar(select(DataKey.id).where(DataKey.project_id == project.id)):
                    continue
                conn.execute(insert(DataKey).values(**_new_row(self.master, project.id)))

        # the Database's own session factory: other databases are untouched
        event.listen(db._sessions, "after_flush", after_flush)


def open_keyring(db: Database, settings: Settings) -> Keyring:
    """Load the master key and check it against the platform key; make missing data keys.

    A fresh platform (no data keys at all) gets a platform key, and a new key file if
    ``KILN_MASTER_KEY`` is not set. Raises :class:`EncryptionError` when the master key
    is missing or is not the one that wrapped the data keys.
    """
    for attempt in (1, 2):
        try:
            return _open_keyring(db, settings)
        except IntegrityError:  # another process made the same project's key just now
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _open_keyring(db: Database, settings: Settings) -> Keyring:
    with db.session() as s:
        rows = list(s.scalars(select(DataKey).order_by(DataKey.id)))
        master = load_master_key(settings, create=not rows)
        platform = next((r for r in rows if r.project_id is None), None)
        if platform is None:
            if rows:
                raise EncryptionError("the platform data key is missing from data_keys")
            platform = DataKey(**_new_row(master, None))
            s.add(platform)
            s.flush()
        if platform.master_key_id != master.id:
            raise EncryptionError(_wrong_key(master, settings), field=ENV)
        keyring = Keyring(db, master, platform.id)
        keyring._keys[platform.id] = AESGCM(unwrap(master, platform.wrapped, None))
        have = {r.project_id for r in rows}
        for project_id in s.scalars(select(Project.id)):
            if project_id not in have:  # projects made before encryption, or elsewhere
                s.execute(insert(DataKey).values(**_new_row(master, project_id)))
    keyring.install(db)
    return keyring


def _wrong_key(master: MasterKey, settings: Settings) -> str:
    message = (
        f"the master key from {master.source} is not the one that wrapped this platform's "
        f"data keys: set {ENV} to the right key, or restore {master_key_file(settings)}"
    )
    pending = master_key_file(settings).with_name("master.key.new")
    if pending.is_file():
        message += f" (an interrupted `kiln keys rotate-master` left the new key in {pending})"
    return message


def rotate_master(db: Database, old: MasterKey, new: MasterKey) -> int:
    """Re-wrap every data key with ``new`` in one transaction; the data is untouched.

    Returns the number of keys re-wrapped. Raises :class:`EncryptionError` if ``old``
    does not unwrap them.
    """
    with db.session() as s:
        rows = list(s.scalars(select(DataKey)))
        for row in rows:
            data_key = unwrap(old, row.wrapped, row.project_id)
            row.wrapped = wrap(new, data_key, row.project_id)
            row.master_key_id = new.id
            row.rotated_at = utcnow()
    return len(rows)


@dataclass(frozen=True)
class Rotation:
    """What :func:`rotate_master_key` did: keys re-wrapped, and where the new key is."""

    rewrapped: int
    new_key: MasterKey
    key_file: Path | None  # None: the caller shows new_key (KILN_MASTER_KEY users)


def rotate_master_key(
    settings: Settings,
    *,
    new_key_file: Path | None = None,
    before_commit: Callable[[MasterKey], None] | None = None,
) -> Rotation:
    """Replace the master key: re-wrap every data key with a new random one.

    With the key file: the new key is written to ``master.key.new`` (0600) first, the
    database is re-wrapped in one transaction, then ``master.key.new`` replaces
    ``master.key`` (one rename). An interruption leaves either the old state or both
    files, and the start-up error names ``master.key.new``. With ``KILN_MASTER_KEY``:
    the new key goes to ``new_key_file`` (created 0600, must not exist) or, if None, to
    ``before_commit`` (to show it) before anything changes. Stop the server and
    workers first: a running one keeps the old key and refuses to make new projects.
    """
    old = load_master_key(settings, create=False)
    db = Database(settings.resolved_database_url)
    try:
        with db.session() as s:
            first = s.scalars(select(DataKey).order_by(DataKey.id).limit(1)).first()
            if first is None:
                raise NotFoundError(
                    "no data keys to rotate: start the platform (kiln up) first", field="database"
                )
            unwrap(old, first.wrapped, first.project_id)  # the wrong key: stop before any write
        if settings.master_key is None:
            path = master_key_file(settings)
            pending = path.with_name("master.key.new")
            new = new_master_key(str(path))
            write_secret(pending, new.encoded(), replace=True)
            count = rotate_master(db, old, new)
            os.replace(pending, path)
            return Rotation(count, new, path)
        new = new_master_key(ENV)
        if new_key_file is None and before_commit is None:
            raise SpecError(
                f"with {ENV} set, the new key must go somewhere: give --new-key-file",
                field="new_key_file",
            )
        if new_key_file is not None:
            if not write_secret(new_key_file, new.encoded()):
                raise ConflictError(f"{new_key_file} already exists", field="new_key_file")
        elif before_commit is not None:
            before_commit(new)
        return Rotation(rotate_master(db, old, new), new, new_key_file)
    finally:
        db.dispose()
