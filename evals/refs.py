"""The two sides of a gate: a fleet configuration (models.yaml + routes.yaml) read from a git ref or files.

`fleetlens eval gate --baseline REF --candidate REF` accepts, for each REF:

* a **git revision** (`main`, `origin/main`, `HEAD~1`, a sha): `models.yaml` and `routes.yaml` as
  committed there, at the repository paths of `--models-path` / `--routes-path`;
* a **directory** holding `models.yaml` and `routes.yaml`;
* a **single YAML file**: a registry (top-level `models:`) or routes (top-level `features:`); the
  other file is the working tree's (`--models-path` / `--routes-path`). `--candidate my-routes.yaml`
  is "the fleet as it is, with these routes".

A path that exists wins over a git revision of the same name. Relative paths inside the files keep
their meaning: checkpoint paths (`./`, `../`) and retriever directories resolve against the file's
location in the working tree (for a git revision: where the file sits in the repository), so the
materialised copy the gate hands to its gateways names the same checkpoints. Both files are
validated exactly as the gateway would (`ConfigError` naming the file and key).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetlens.config import ConfigError
from fleetlens.serving.registry import ModelRegistry, RoutingTable, _parse_models, _parse_routes

MODELS_FILE, ROUTES_FILE = "models.yaml", "routes.yaml"


@dataclass(frozen=True)
class FleetConfig:
    """One side of the gate: the parsed registry and routes, and where they came from."""

    ref: str  # as given on the command line
    label: str  # for the report: "git 1a2b3c4d5e6f (main)", "file ./routes.yaml + working tree models.yaml"
    registry: ModelRegistry  # checkpoint paths already absolute
    routes: RoutingTable  # retriever paths already absolute
    models_text: str
    routes_text: str

    def write(self, directory: Path) -> tuple[Path, Path]:
        """models.yaml and routes.yaml for processes of this side (paths absolute, so anywhere works)."""
        directory.mkdir(parents=True, exist_ok=True)
        models, routes = directory / MODELS_FILE, directory / ROUTES_FILE
        models.write_text(yaml.safe_dump(self.registry.model_dump(mode="json", exclude_none=True), sort_keys=False))
        routes.write_text(yaml.safe_dump(self.routes.model_dump(mode="json", exclude_none=True), sort_keys=False))
        return models, routes


def load_fleet_config(ref: str, *, models_path: Path, routes_path: Path, repo: Path | None = None) -> FleetConfig:
    """Read one side; raises ConfigError with what was tried when REF is neither a path nor a revision."""
    candidate = Path(ref)
    if candidate.is_dir():
        models = _working(candidate / MODELS_FILE if (candidate / MODELS_FILE).exists() else models_path, "models")
        routes = _working(candidate / ROUTES_FILE if (candidate / ROUTES_FILE).exists() else routes_path, "routes")
        return _parse(ref, f"directory {candidate}", models, routes)
    if candidate.is_file():
        kind = _kind_of(candidate)
        if kind == "models":
            return _parse(ref, f"{candidate} + routes {routes_path}", _working(candidate, "models"),
                          _working(routes_path, "routes"))
        return _parse(ref, f"models {models_path} + {candidate}", _working(models_path, "models"),
                      _working(candidate, "routes"))
    root = repo or _repo_root(Path.cwd())
    sha = _rev_parse(root, ref) if root else None
    if sha is None:
        raise ConfigError(f"{ref!r} is neither a file, a directory nor a git revision"
                          + (f" of {root}" if root else " (and this is not a git checkout)"))
    label = f"git {sha[:12]}" + ("" if sha.startswith(ref) else f" ({ref})")
    return _parse(ref, label, _committed(root, sha, models_path, "models"),  # type: ignore[arg-type]
                  _committed(root, sha, routes_path, "routes"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Source:
    text: str
    name: str  # shown in errors
    location: Path  # where relative paths in it resolve from (as if it were at this path)


def _parse(ref: str, label: str, models: _Source, routes: _Source) -> FleetConfig:
    try:
        registry = _parse_models(models.text, str(models.location))
        table = _parse_routes(routes.text, str(routes.location), registry)
    except ConfigError as error:  # name the revision's file, not the working-tree path it stands for
        message = str(error).replace(str(models.location), models.name).replace(str(routes.location), routes.name)
        raise ConfigError(message if ref in message else f"{ref}: {message}") from None
    return FleetConfig(ref, label, registry, table, models.text, routes.text)


def _working(path: Path, kind: str) -> _Source:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {kind} configuration: {error.strerror or error}") from None
    return _Source(text, str(path), path.resolve())


def _committed(root: Path, sha: str, path: Path, kind: str) -> _Source:
    absolute = path if path.is_absolute() else (Path.cwd() / path)
    try:
        relative = absolute.resolve().relative_to(root)
    except ValueError:
        raise ConfigError(f"{path} is outside the git repository {root}: a git revision cannot hold it") from None
    shown = f"{sha[:12]}:{relative.as_posix()}"
    result = subprocess.run(["git", "-C", str(root), "show", f"{sha}:{relative.as_posix()}"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"{shown}: no {kind} configuration at that revision ({result.stderr.strip()})")
    return _Source(result.stdout, shown, root / relative)


def _kind_of(path: Path) -> str:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read it as YAML: {error}") from None
    if isinstance(data, dict) and "models" in data:
        return "models"
    if isinstance(data, dict) and "features" in data:
        return "routes"
    raise ConfigError(f"{path}: neither a model registry (top-level `models:`) nor routes (top-level `features:`)")


def _repo_root(start: Path) -> Path | None:
    result = subprocess.run(["git", "-C", str(start), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    return Path(result.stdout.strip()).resolve() if result.returncode == 0 else None


def _rev_parse(root: Path, ref: str) -> str | None:
    if ref.startswith("-"):
        return None
    result = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def model_identity(spec: Any) -> str:
    """What makes two registry entries the same served model (same weights, same engine arguments):
    everything except how many replicas run and where. Two sides with equal identities can share a replica."""
    data = spec.model_dump(mode="json", exclude={"replicas", "replica_urls"})
    return yaml.safe_dump(data, sort_keys=True)
