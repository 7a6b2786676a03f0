"""The value types and checks the spec's fields share: names that become directories and Kubernetes names,
non-empty texts, lists without duplicates, tracking URIs (their scheme, and how logs may show them) and
registered-model names; and the fields whose values come from a plugin registry (a task name, a method's spec).
Plain functions, so ``export`` and the reports use the same checks as the spec."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, GetCoreSchemaHandler, StringConstraints
from pydantic_core import CoreSchema, core_schema

from lora_exp.core.registry import Registry

# Experiment and run names become directory names, MLflow names and (slugged) Kubernetes names.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# Split names that would clash with the Trainer's own metric prefixes (train_runtime, eval_loss).
RESERVED_SPLITS = ("train", "eval")
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                    "file")

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1)]

# MLflow's own limits (mlflow.utils.validation): a longer key is refused by the server mid-run, a longer param
# or tag value is cut without a word. Checked in the spec, before anything runs.
MLFLOW_KEY_LENGTH, MLFLOW_PARAM_LENGTH, MLFLOW_TAG_LENGTH, MLFLOW_EXPERIMENT_LENGTH = 250, 6000, 8000, 500
MLFLOW_MAX_TAGS = 100  # what one batch call takes
TAG_KEY_PATTERN = r"^[A-Za-z0-9_.\-/: ]{1,250}$"  # MLflow's key alphabet (slashes and colons for namespaces)


def _shown(value: str, allowed: str = "") -> str:
    """A text MLflow's UI and terminals show: no control characters (ANSI escapes, newlines) and no invisible
    formatting characters (bidirectional overrides, zero-width), which make a run name read as another."""
    import unicodedata

    bad = sorted({f"U+{ord(c):04X}" for c in value if unicodedata.category(c) in ("Cc", "Cf") and c not in allowed})
    if bad:
        raise ValueError(f"holds control or invisible formatting characters ({', '.join(bad[:5])}): "
                         "MLflow would show them raw; use printable text")
    return value


def _experiment_path(value: str) -> str:
    """Experiment names may be paths (Databricks' /Users/me/exp); none may step out of where stores keep them."""
    parts = value.replace("\\", "/").split("/")
    if any(part in (".", "..") for part in parts):
        raise ValueError("holds a '.' or '..' path segment: an experiment name must not point elsewhere in a store")
    return value


ShownText = Annotated[str, StringConstraints(min_length=1, max_length=MLFLOW_KEY_LENGTH), AfterValidator(_shown)]
ExperimentName = Annotated[str, StringConstraints(min_length=1, max_length=MLFLOW_EXPERIMENT_LENGTH),
                           AfterValidator(_shown), AfterValidator(_experiment_path)]
TagKey = Annotated[str, StringConstraints(pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, StringConstraints(max_length=MLFLOW_TAG_LENGTH),
                     AfterValidator(lambda v: _shown(v, allowed="\n\t"))]  # a note may have lines


def _unique(values: list[Any] | None) -> list[Any] | None:
    if values is not None:
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise ValueError(f"duplicated {dupes}: each must appear once")
    return values


UniqueTexts = Annotated[list[Text], Field(min_length=1), AfterValidator(_unique)]


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://***@host/...``: what logs, tags and files may show."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}://{authority}{slash}{path}"


def tracking_scheme_problem(uri: str) -> str | None:
    """Why MLflow could not use ``uri`` (None when it can): the scheme decides the store."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        return (f"unknown scheme {scheme or '(none)'!r}; use http(s)://host:port, sqlite:///path.db or a database "
                "URI (postgresql://, mysql://)")
    return None


def registered_model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model in MLflow's registry (None when it can): for the spec and for export."""
    return "a registered model's name: not empty, no '/'" if not name.strip() or "/" in name else None


def _refused_when(problem: Any) -> AfterValidator:
    """A field check from a ``problem`` function (text -> why not, or None), shared with export's own checks."""

    def check(value: str) -> str:
        why = problem(value)
        if why:
            raise ValueError(why)
        return value

    return AfterValidator(check)


TrackingUri = Annotated[str, StringConstraints(min_length=1), _refused_when(tracking_scheme_problem)]
RegisteredModelName = Annotated[str, StringConstraints(min_length=1), _refused_when(registered_model_name_problem)]


class RegisteredNames:
    """A string that must be a registered name (plus ``extra`` values): an enum in the JSON Schema."""

    def __init__(self, reg: Registry[Any], *extra: str) -> None:
        self.reg, self.extra = reg, extra

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.literal_schema([*self.extra, *self.reg.names()])


class RegisteredSpecs:
    """One of the registered methods' spec classes, chosen by its ``name`` (a tagged union)."""

    def __init__(self, reg: Registry[Any]) -> None:
        self.reg = reg

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        choices = {name: handler.generate_schema(item.spec) for name, item in self.reg.items()}
        names = ", ".join(choices)
        return core_schema.tagged_union_schema(
            choices, discriminator="name", custom_error_type="method_name",
            custom_error_message=f"give the method's name: one of {names}",
        )
