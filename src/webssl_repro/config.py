"""Config loading outside Snakemake (CLI, tests), against the same schema the
Snakefile validates with ``snakemake.utils.validate``."""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from webssl_repro.files import repo_root

SCHEMA = repo_root() / "config" / "schema.yaml"


class ConfigError(ValueError):
    pass


@contextlib.contextmanager
def stop_on_config_error() -> Iterator[None]:
    """While snakemake reads the workflow: a ``ConfigError`` ends it with the message alone, not
    with the Python frames it prints under other errors; the fix is in the config, not the code."""
    try:
        yield
    except ConfigError as err:
        sys.exit(str(err))


class UnknownKeyError(KeyError, ValueError):
    """A config section names a key its consumer does not have (a typo, usually)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_keys(mapping: Mapping[str, Any], known, what: str) -> None:
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise UnknownKeyError(f"{what}: unknown key(s) {unknown}; known keys are {sorted(known)}")


def merge_known(base: Mapping[str, Any], over: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``over`` laid onto ``base``, nested sections merged; a key ``base`` lacks is an error
    naming its dotted path under ``what`` (a misspelt override would otherwise do nothing)."""
    check_keys(over, base, what)
    out = dict(base)
    for k, v in over.items():
        if isinstance(base[k], Mapping):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{what}.{k}: a section, got {v!r}")
            v = merge_known(base[k], v, f"{what}.{k}")
        out[k] = v
    return out


def dataclass_from_mapping(cls, mapping: Mapping[str, Any], what: str):
    """A frozen recipe dataclass from a config section: unknown keys are named, lists become tuples."""
    import dataclasses

    check_keys(mapping, [f.name for f in dataclasses.fields(cls)], what)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()})


def config_hash(cfg: Mapping[str, Any]) -> str:
    """12 hex digits of the config as canonical JSON: eval results and run provenance name
    the exact config that made them."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def config_origin(configfiles: Sequence[str | Path], overrides: Mapping[str, Any] | None = None) -> str:
    """Where a workflow's config came from, for its error messages: the config files (the
    default mini config without ``--configfile``) and the keys ``--config`` set."""
    origin = ", ".join(map(str, configfiles or ["config/mini.yaml"]))
    if overrides:
        origin += f" with --config {', '.join(sorted(overrides))}"
    return origin


def _number_as_text(err) -> str:
    """Why a number arrived as text, where a schema wanted a number: YAML 1.1 reads ``1e-3``
    (no dot, no signed exponent) as a string, and ``--config`` passes every value as one."""
    wanted = err.schema.get("type") if err.validator == "type" and isinstance(err.schema, Mapping) else None
    wanted = wanted if isinstance(wanted, list) else [wanted]
    if not isinstance(err.instance, str) or not {"number", "integer"} & set(wanted):
        return ""
    try:
        value = float(err.instance)
    except ValueError:
        return ""
    if not math.isfinite(value):
        return ""
    as_written = int(value) if "integer" in wanted and value.is_integer() else value
    return (f". YAML reads {err.instance!r} as text: write it as {as_written!r} (a float needs a dot and a signed "
            "exponent, e.g. 1.0e-3); --config passes values as text too, so set numbers in a config file")


def _form_description(form: Any, schema: Mapping[str, Any]) -> str | None:
    """A form's description, or that of the ``#/$defs/...`` it refers to."""
    if not isinstance(form, Mapping):
        return None
    ref = form.get("$ref", "")
    if not form.get("description") and ref.startswith("#/$defs/"):
        form = schema.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
    return form.get("description")


def _error_lines(err, origin: str, schema: Mapping[str, Any], form: str | None = None) -> list[str]:
    """One line per schema error, naming its key. A value that matches none of a setting's forms
    (``anyOf`` / ``oneOf``) is explained by the errors of the forms it came nearest to (at most one
    error more than the fewest), e.g. the misspelt key of a mapping, not by "not valid under any of
    the given schemas"."""
    if err.validator in ("anyOf", "oneOf") and err.context:
        by_form: dict[int, list] = {}
        for sub in err.context:  # a boolean form's error has no schema path of its own
            by_form.setdefault(sub.relative_schema_path[0] if sub.relative_schema_path else -1, []).append(sub)
        fewest = min(map(len, by_form.values()))
        forms, setting = err.schema[err.validator], err.schema.get("description")
        return [line for i, subs in sorted(by_form.items()) if len(subs) <= fewest + 1 for sub in subs
                for line in _error_lines(sub, origin, schema,
                                         (i >= 0 and _form_description(forms[i], schema)) or setting or form)]
    where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    known = sorted(err.schema.get("properties", {})) if err.validator == "additionalProperties" else []
    about = err.schema.get("description") if isinstance(err.schema, Mapping) else None
    about = None if about == form or not err.absolute_path else about
    hint = f"; known keys are {known}" if known else (f" ({about})" if about else "")
    as_form = f" (as {form})" if form else ""
    return [f"{origin}: at key '{where}': {err.message}{hint}{_number_as_text(err)}{as_form}"]


def validate_config(config: Mapping[str, Any], origin: str = "config") -> None:
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [line for err in errors for line in _error_lines(err, origin, schema)]
        if any(err.validator == "required" and not err.absolute_path for err in errors):
            lines.append("(a --configfile replaces the default config/mini.yaml rather than being merged into it: "
                         "to change a few keys, give the scale's config first, e.g. --configfile config/mini.yaml "
                         "mine.yaml)")
        raise ConfigError("\n".join(lines))


def load_configs(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Several config files, each merged over the ones before it (nested sections too), as
    snakemake's ``--configfile a.yaml b.yaml`` merges them, then validated as one config."""
    from webssl_repro.settings import merge_nested

    config: dict[str, Any] = {}
    for path in paths:
        try:
            with open(path) as fh:  # a YAML error then names the file, not "<unicode string>"
                part = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(part, dict):
            raise ConfigError(f"{path}: a config is a mapping, got {type(part).__name__}")
        config = merge_nested(config, part)
    validate_config(config, ", ".join(map(str, paths)))
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    return load_configs([path])
