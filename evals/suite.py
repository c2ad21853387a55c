"""The eval suite: lm-eval task YAMLs in `evals/tasks/`, their data in `evals/data/`.

A task is any `evals/tasks/*.yaml` whose name does not start with `_` (`_template.yaml` and shared
`include:` bases are not tasks); its name is the YAML's `task:` key. Data files are named relative to
`evals/data/` (`dataset_kwargs: {data_files: {test: lookup_easy.jsonl}}`), so the repository can move;
lm-eval resolves `data_files` reliably only from absolute paths, so `write_include_dir` writes
resolved copies of the requested tasks into a scratch directory that the runner hands to lm-eval's
`TaskManager(include_path=..., include_defaults=False)`.

Everything the user can get wrong here raises `EvalConfigError` with a message naming the fix: an
unknown task (with the known ones), a missing data file (with the path looked at), a YAML that is
not a task.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetlens.config import ConfigError

EVALS_DIR = Path(__file__).resolve().parent
TASKS_DIR = EVALS_DIR / "tasks"
DATA_DIR = EVALS_DIR / "data"
TEMPLATE = "_template.yaml"


class EvalConfigError(ConfigError):
    """The suite cannot run as configured (unknown task, missing data file, bad task YAML)."""


# --------------------------------------------------------------------------- YAML with lm-eval's tags


class FunctionTag(str):
    """An lm-eval `!function module.name` value, kept as written (resolved by lm-eval, not here)."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionTag(loader.construct_scalar(node)))
_Dumper.add_representer(FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except OSError as error:
        raise EvalConfigError(f"cannot read task file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise EvalConfigError(f"task file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise EvalConfigError(f"task file {path} must hold a mapping (an lm-eval task config)")
    return data


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite: its YAML (and `include:` chain) and its data files, resolved."""

    name: str
    path: Path                      # the task's YAML
    config: dict[str, Any]          # merged over its include chain (base first), as lm-eval sees it
    chain: tuple[Path, ...]         # YAML files, base first, ending with `path`
    data_files: tuple[Path, ...]    # absolute; every one checked to exist by `resolve`
    description: str = ""           # the YAML's first comment line

    @property
    def output_type(self) -> str:
        return str(self.config.get("output_type", "?"))

    def count_items(self) -> int | None:
        """Lines of the task's JSONL data files (None for other formats)."""
        if not self.data_files or any(p.suffix != ".jsonl" for p in self.data_files):
            return None
        return sum(sum(1 for line in p.open() if line.strip()) for p in self.data_files)


@dataclass(frozen=True)
class Suite:
    """The task and data folders; the defaults are the ones shipped in the package."""

    tasks_dir: Path = TASKS_DIR
    data_dir: Path = DATA_DIR

    def task_files(self) -> dict[str, Path]:
        """{task name: YAML path} of every task in `tasks_dir` (names from the YAML's `task:` key)."""
        if not self.tasks_dir.is_dir():
            raise EvalConfigError(f"no task folder at {self.tasks_dir}")
        found: dict[str, Path] = {}
        for path in sorted(self.tasks_dir.glob("*.yaml")):
            if path.name.startswith("_"):
                continue
            name = _read_yaml(path).get("task")
            if not isinstance(name, str) or not name:
                raise EvalConfigError(f"task file {path} has no `task:` name")
            if name in found:
                raise EvalConfigError(f"task {name!r} is defined twice: {found[name]} and {path}")
            found[name] = path
        return found

    def names(self) -> list[str]:
        return sorted(self.task_files())

    def resolve(self, names: str | Sequence[str]) -> list[TaskSpec]:
        """TaskSpecs for `names` (a list or "a,b"), in the order given, duplicates dropped.

        Raises EvalConfigError for an empty list, an unknown name (listing the known ones) or a data
        file that does not exist (naming the path looked at).
        """
        wanted = _split_names(names)
        if not wanted:
            raise EvalConfigError(f"no tasks named; known tasks: {', '.join(self.names()) or '(none)'}")
        files = self.task_files()
        unknown = [name for name in wanted if name not in files]
        if unknown:
            raise EvalConfigError(
                f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"known tasks: {', '.join(sorted(files)) or '(none)'} (in {self.tasks_dir})")
        return [self.spec(name, files[name]) for name in wanted]

    def spec(self, name: str, path: Path) -> TaskSpec:
        chain = _include_chain(path)
        config: dict[str, Any] = {}
        for link in chain:
            config.update({k: v for k, v in _read_yaml(link).items() if k != "include"})
        data_files = []
        for link in chain:
            for key, relative in _data_file_entries(_read_yaml(link)):
                resolved = self.data_path(relative)
                if not resolved.is_file():
                    raise EvalConfigError(
                        f"task {name!r}: data file {resolved} does not exist (data_files {key}: {relative!r} "
                        f"in {link}; relative paths are relative to {self.data_dir})")
                data_files.append(resolved)
        return TaskSpec(name, path, config, tuple(chain), tuple(dict.fromkeys(data_files)),
                        _first_comment(path))

    def data_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return (path if path.is_absolute() else self.data_dir / path).resolve()

    # ----------------------------------------------------------------------- for lm-eval

    def write_include_dir(self, specs: Iterable[TaskSpec], out_dir: Path) -> Path:
        """Resolved copies of `specs`' YAMLs (and their include bases) in `out_dir`, data paths absolute.

        Python helpers next to the tasks (`!function utils.fn`) are copied too, so they resolve
        from the copies as they do from the originals. Returns `out_dir`, for
        `TaskManager(include_path=out_dir, include_defaults=False)`.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        for helper in self.tasks_dir.glob("*.py"):
            shutil.copy2(helper, out_dir / helper.name)
        for spec in specs:
            for link in spec.chain:
                config = _with_absolute_data_files(_read_yaml(link), self.data_path)
                (out_dir / link.name).write_text(
                    f"# resolved copy of {link} (data paths made absolute by fleetlens.evals.suite)\n"
                    + yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
        return out_dir

    def suite_hash(self, specs: Iterable[TaskSpec], **extra: Any) -> str:
        """sha256 of the tasks' YAML chains and data bytes (and `extra`): equal hashes, equal suite."""
        digest = hashlib.sha256()
        for spec in sorted(specs, key=lambda s: s.name):
            digest.update(f"task:{spec.name}\n".encode())
            for link in spec.chain:
                digest.update(link.name.encode() + b"\0" + _file_sha(link).encode() + b"\n")
            for data in spec.data_files:
                digest.update(data.name.encode() + b"\0" + _file_sha(data).encode() + b"\n")
        digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
        return digest.hexdigest()


def _split_names(names: str | Sequence[str]) -> list[str]:
    parts = names.split(",") if isinstance(names, str) else [p for n in names for p in str(n).split(",")]
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _include_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    if path in seen:
        raise EvalConfigError(f"task files include each other in a loop: {' -> '.join(map(str, (*seen, path)))}")
    include = _read_yaml(path).get("include")
    if include is None:
        return [path]
    base = (path.parent / str(include)).resolve()
    if not base.is_file():
        raise EvalConfigError(f"{path} includes {include!r}, but {base} does not exist")
    return [*_include_chain(base, (*seen, path)), path]


def _data_file_entries(config: dict[str, Any]) -> list[tuple[str, str]]:
    """[(where, path)] of the `dataset_kwargs.data_files` in one YAML (string, list or split mapping)."""
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        return []
    if isinstance(files, str):
        return [("", files)]
    if isinstance(files, list):
        return [(f"[{i}]", str(f)) for i, f in enumerate(files)]
    if isinstance(files, dict):
        out = []
        for split, value in files.items():
            values = value if isinstance(value, list) else [value]
            out += [(str(split), str(v)) for v in values]
        return out
    raise EvalConfigError(f"dataset_kwargs.data_files must be a path, a list or a split mapping, got {files!r}")


def _with_absolute_data_files(config: dict[str, Any], absolute: Any) -> dict[str, Any]:
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or kwargs.get("data_files") is None:
        return config
    files = kwargs["data_files"]

    def fix(value: Any) -> Any:
        if isinstance(value, list):
            return [str(absolute(str(v))) for v in value]
        return str(absolute(str(value)))

    if isinstance(files, dict):
        files = {split: fix(value) for split, value in files.items()}
    else:
        files = fix(files)
    return {**config, "dataset_kwargs": {**kwargs, "data_files": files}}


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


DEFAULT_SUITE = Suite()
DEFAULT_TASKS = ("lookup_easy", "lookup_hard")


def list_tasks(suite: Suite = DEFAULT_SUITE) -> list[TaskSpec]:
    """Every task of `suite`, resolved (raises EvalConfigError when one's data is missing)."""
    return suite.resolve(suite.names()) if suite.names() else []


def resolve_tasks(names: str | Sequence[str], suite: Suite = DEFAULT_SUITE) -> list[TaskSpec]:
    return suite.resolve(names)
