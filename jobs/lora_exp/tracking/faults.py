"""What went wrong between lora-exp and its MLflow store, decided at that edge, because the exit code says who
must act: the chart retries exit 75 (the server is away: wait for it), fails the Job at once on exit 2 (a retry
cannot install a package), and retries exit 1 a few times (anything else: a bug, a refused request).

- the server does not answer or times out -> 75: connection refused or reset, DNS, a timeout, HTTP 429/5xx
  after the client's retries, MLflow's TEMPORARILY_UNAVAILABLE, the database server away (SQLAlchemy's
  OperationalError);
- a package the store needs cannot be imported -> 2, naming the package and what installs it: an ImportError
  anywhere in the cause chain (``validate`` and every job import them first, before anything is written);
- anything else -> 1, the exception in one line, credentials redacted.

The packages a store needs are found by importing them as MLflow does, so that a package installed but broken
(a missing shared library) counts as missing too: what MLflow 3's SqlAlchemyStore imports beyond mlflow-skinny
(``mlflow/store/db/utils.py``: sqlalchemy, alembic; ``mlflow/store/model_registry/dbmodels/models.py``:
cryptography), then the URI's DBAPI driver as SQLAlchemy's own dialect imports it (``postgresql://`` is psycopg
under SQLAlchemy 2.1, ``postgresql+psycopg2://`` psycopg2, ``mysql://`` MySQLdb, ``mssql://`` pyodbc, ...).
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Iterator

from lora_exp.config.fields import redact_uri
from lora_exp.core.errors import TrackerUnavailable, UserError

# MLflow's database-backed stores (mlflow.store.db.db_types.DATABASE_ENGINES): SqlAlchemyStore and a DBAPI driver.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SQLALCHEMY_STORE_MODULES = ("sqlalchemy", "alembic.migration", "alembic.script", "cryptography.fernet")

# A module -> the pip requirement that installs it, where the two differ (or a binary wheel is the easy way).
PIP_NAMES = {
    "sqlalchemy": "SQLAlchemy", "mako": "Mako", "markupsafe": "MarkupSafe", "_cffi_backend": "cffi",
    "psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL",
    "mysql": "mysql-connector-python",
}
NOT_ON_PIP = ("sqlite3", "_sqlite3")  # part of CPython, when it was built with libsqlite3
# Another driver for a store whose default one is missing.
OTHER_DRIVERS = {"postgresql": ("psycopg2", "postgresql+psycopg2:// with psycopg2-binary"),
                 "mysql": ("pymysql", "mysql+pymysql:// with PyMySQL"),
                 "mssql": ("pymssql", "mssql+pymssql:// with pymssql")}

# MLflow error codes of a server that is there but cannot serve now (mlflow.protos.databricks_pb2).
OUTAGE_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def first_line(e: BaseException) -> str:
    text = redact_uri(str(e).strip())
    return text.splitlines()[0][:300] if text else type(e).__name__


def scheme_of(uri: str) -> str:
    """The store family a URI names: ``postgresql+psycopg2://...`` -> ``postgresql``."""
    return uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""


def needs(e: ImportError, module: str, who: str, note: str = "") -> str:
    """``<who> needs the Python package <name>, which cannot be imported (...); pip install <requirement>``,
    for ``e`` met importing ``module``."""
    name = (e.name or module).split(".")[0]
    fix = "use a Python built with SQLite" if name in NOT_ON_PIP else f"pip install {PIP_NAMES.get(name, name)}"
    return f"{who} needs the Python package {name}, which cannot be imported ({first_line(e)}); {fix}{note}"


def missing_package(uri: str) -> str | None:
    """Why MLflow cannot open the store ``uri`` names in this environment (a package it imports is missing or
    broken; an unknown SQLAlchemy driver), in one line naming the package and what installs it; None when it
    can. Imports the packages (a few tenths of a second, once per process) and writes nothing."""
    scheme = scheme_of(uri)
    if scheme not in DATABASE_SCHEMES:
        return None  # http(s), databricks, file: mlflow-skinny's own dependencies
    for module in SQLALCHEMY_STORE_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return needs(e, module, f"MLflow's {scheme} store",
                         " (the full mlflow package depends on it; mlflow-skinny does not)")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        dialect = make_url(uri).get_dialect()
    except ArgumentError as e:  # NoSuchModuleError too: postgresql+nosuchdriver://
        return f"not a database URL SQLAlchemy can use ({first_line(e)})"
    try:
        dialect.import_dbapi()
    except ImportError as e:
        other, how = OTHER_DRIVERS.get(scheme, (dialect.driver, ""))
        return needs(e, dialect.driver, f"{uri.split('://', 1)[0]}:// (SQLAlchemy's {dialect.driver} driver)",
                     f"; or {how}" if other != dialect.driver else "")
    return None


def causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and what it was raised from or during (MLflow wraps a requests error as an MlflowException
    raised while handling it), each once."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        cause = todo.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        yield cause
        todo += [c for c in (cause.__cause__, cause.__context__) if c is not None]


def _outage_types() -> tuple[type[BaseException], ...]:
    """The exception types of a server or database that is away, from whichever client libraries are here."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    try:
        import requests.exceptions as rq

        found += [rq.ConnectionError, rq.Timeout, rq.RetryError, rq.ChunkedEncodingError]
    except ImportError:  # pragma: no cover - a dependency of mlflow-skinny
        pass
    try:
        import sqlalchemy.exc as sa

        found += [sa.OperationalError, sa.DisconnectionError, sa.TimeoutError]
    except ImportError:
        pass
    return tuple(found)


def is_outage(e: BaseException) -> bool:
    """The server (or database) is away or overloaded: waiting and retrying will do. A TLS failure is not one
    (a certificate does not fix itself)."""
    import ssl

    outage = _outage_types()
    chain = list(causes(e))
    if any(isinstance(c, ssl.SSLError) or type(c).__name__ == "SSLError" for c in chain):
        return False
    return any(isinstance(c, outage) or str(getattr(c, "error_code", "")) in OUTAGE_CODES for c in chain)


def classify(e: BaseException, uri: str, outage: str, then: str = "") -> BaseException:
    """The exception to raise for ``e``, met talking to the store at ``uri``: TrackerUnavailable (exit 75:
    ``MLflow at <uri> <outage> (<the cause>)<then>``) for an outage, UserError (exit 2) naming a missing
    package, else a RuntimeError (exit 1) of one redacted line."""
    where = f"MLflow at {redact_uri(uri)}"
    missing = next((c for c in causes(e) if isinstance(c, ImportError)), None)
    if missing is not None:
        return UserError(f"{where}: {missing_package(uri) or needs(missing, missing.name or '?', 'MLflow')}")
    if is_outage(e):
        return TrackerUnavailable(f"{where} {outage} ({type(e).__name__}: {first_line(e)}){then}")
    return RuntimeError(f"{where} failed ({type(e).__name__}: {first_line(e)})")
