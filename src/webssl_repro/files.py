"""Files written whole or not at all: a reader, a concurrent job or a kill never sees one half-written.

Every result, cache, stamp, shard and checkpoint goes through ``atomic_write`` (or
``atomic_save``, for writers that take a path): the bytes go to a
temporary file beside the target (unique across processes and nodes), are fsync-ed and renamed
into place; a failed write leaves no temporary file and the previous version intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping


def atomic_save(path: str | os.PathLike, save: Callable[[Path], Any]) -> None:
    """``save(tmp)`` writes a temporary file beside ``path`` by name (safetensors, tarfile and
    the like take a path), which is fsync-ed and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would keep a shared results folder from the group
        os.close(fd)
        save(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (files written into it, a rename) durable: a
    pointer written after them must not outlive them in a node crash. A filesystem that cannot
    sync a directory is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(f)`` into a temporary binary file beside ``path``, then renamed to ``path``."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_save(path, save)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """``json.dumps(obj, **dumps)`` to ``path``, atomically."""
    write_text(path, json.dumps(obj, **dumps))


def read_json(path: str | os.PathLike) -> Any:
    """``path``'s JSON; a file that is not JSON (cut short, edited by hand) is a ``ValueError``
    naming it and the line, where ``json`` alone names neither the file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a log ``path`` appends to, one JSON per line; a line cut short (a kill, a
    full disk or a node lost mid-append) is skipped and named on stderr, not an error that
    stops every retry that reads the log."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if line.strip():
                print(f"{path}:{n}: not a JSON record, skipped: {line[:80]!r}", file=sys.stderr)
    return records


def package_version(package: str) -> str | None:
    """An installed distribution's version, or None."""
    import importlib.metadata as md

    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def model_location(value: str | os.PathLike, key: str) -> str:
    """``value`` of config key ``key`` as ``from_pretrained`` / ``load_dataset`` take it: an
    existing local path, or a hub id (``org/name``). A path that does not exist is a
    ``ValueError`` naming the key, where the hub client would take it for a repo id and fail on
    that, late (a model's job after its data loaded, an eval set's in every job that reads it)."""
    text = str(value)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    looks_local = text.startswith(("/", "~", ".")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if looks_local:
        raise ValueError(f"{key}: {text} does not exist (a local path; a hub id is 'org/name')")
    return text


def lm_entries(entries: Mapping[str, Any], lm_paths: Mapping[str, str], lm: str) -> dict[str, Any]:
    """Every per-language-model setting (``resources.lm_gpus``, ``evaluate.alignment.lm_revisions``)
    that names ``lm``: its own entry first, then those of the ``lm_paths`` keys whose value ``lm``
    is (a hub id named directly takes what is set for its short name)."""
    names = (lm, *(key for key, source in lm_paths.items() if source == lm))
    return {name: entries[name] for name in names if name in entries}


def lm_entry(entries: Mapping[str, Any], lm_paths: Mapping[str, str], lm: str) -> Any:
    """The setting ``lm`` takes (the first of ``lm_entries``), else None; the dry run refuses
    entries that name one model with different values (``plan_checks.check_language_models``)."""
    return next(iter(lm_entries(entries, lm_paths, lm).values()), None)


def pinned_revision(revision: str | None, location: str | os.PathLike, revision_key: str,
                    model_key: str) -> dict[str, str]:
    """``from_pretrained``'s keywords for a hub id pinned at ``revision`` (a commit or tag): jobs
    that load it over days get one model even if the repository changes meanwhile. A local
    directory is the copy it is, and ``from_pretrained`` would ignore the pin silently: refused."""
    if not revision:
        return {}
    if os.path.isdir(os.path.expanduser(str(location))):
        raise ValueError(f"{revision_key}: {revision!r} pins a hub id's commit, but {model_key} is a local "
                         f"directory ({location}), the copy it is; set {revision_key} to null (an overlay of "
                         "config/paper.yaml, which pins it) or give the hub id")
    return {"revision": str(revision)}


#: what a job without the hub (a compute node offline, a gated model) can do instead
HUB_REMEDY = ("a hub id needs the hub, or its files in the local cache: set HF_TOKEN for a gated model, or fill "
              "HF_HOME's cache beforehand and run with HF_HUB_OFFLINE=1, or give the key a local copy's path")


@contextlib.contextmanager
def hub_access(key: str, value: str | os.PathLike) -> Iterator[None]:
    """Loads from ``value`` (config key ``key``) inside: a model or dataset the hub client cannot
    reach or read (offline, gated, no such repo) is a ``ValueError`` naming the key and what to
    do, not the client's traceback."""
    try:
        yield
    except OSError as err:  # transformers' and datasets' unreachable / gated / missing repo errors
        cause = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{key}: cannot load {str(value)!r} ({type(err).__name__}: {cause}); {HUB_REMEDY}") from err


def repo_root() -> Path:
    """The checkout this package is installed from (editable): where config/ and results/published live."""
    return Path(__file__).resolve().parents[2]


def code_version(root: str | Path | None = None) -> str | None:
    """The commit of the checkout this package runs from (``repo_root``), marked when tracked
    files differ from it; None where git or the checkout is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root or repo_root(), capture_output=True, text=True,
                              timeout=20).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else None
