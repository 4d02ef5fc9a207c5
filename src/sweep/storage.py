"""Where a study lives: SQLite by default, any SQLAlchemy URL (PostgreSQL, MySQL), or an Optuna journal file.

Several workers share a study through the storage: local ones through the SQLite file, workers on other machines
through a database server or a journal file on a shared file system.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

from src.errors import UserError

JOURNAL_SUFFIXES = (".journal", ".log")
SQLITE_TIMEOUT_S = 60
"""Seconds a SQLite writer waits for another worker's lock (the default 5 s is short for several workers)."""


def default_storage(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'optuna.db').resolve()}"


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or ("://" not in url and url.endswith(JOURNAL_SUFFIXES))


def journal_path(url: str) -> Path:
    return Path(url[len("journal:") :] if url.startswith("journal:") else url)


def normalize(url: str) -> str:
    """The same storage named so that trial processes (which may run elsewhere in the tree) open it too."""
    if is_journal(url):
        path, raw = journal_path(url), url.removeprefix("journal:").strip()
        if not raw or path.is_dir():
            got = "an empty path" if not raw else f"the folder {path}"
            raise UserError(f"storage {url!r}: a journal needs a file path (journal:path/to/study.journal), got {got}")
        return f"journal:{path.resolve()}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{Path(url[len('sqlite:///') :]).resolve()}"
    return url


def open_storage(url: str):
    """An Optuna storage for ``url`` (UserError naming the URL when it cannot be opened)."""
    allowed = "sqlite:///path.db, postgresql://user@host/db (any SQLAlchemy URL), or journal:path / path.journal"
    if is_journal(url):
        path = journal_path(url)
        if not path.parent.is_dir():
            raise UserError(f"storage {url}: folder {path.parent} does not exist")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise UserError(f"storage {url!r}: not a database URL or a journal file; allowed {allowed}")
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise UserError(f"storage {url}: folder {folder} does not exist")
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds (driver missing, refused, bad URL)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"storage {url}: cannot open ({reason}); allowed {allowed}") from None


def dashboard_command(url: str) -> str:
    target = str(journal_path(url)) if is_journal(url) else url
    return f"pip install optuna-dashboard && optuna-dashboard {target}"


_THREAD_LOCK = threading.Lock()


@contextmanager
def local_lock(folder: Path) -> Iterator[None]:
    """Serialises asking for trials among the workers of this machine (threads and processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, open(folder / ".ask.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
