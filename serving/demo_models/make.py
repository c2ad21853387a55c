"""Build the demo models once and reuse them: run `train.py` under the serving venv, write `models.yaml`.

Training needs torch, which lives only in the serving venv (`.venv-serving/`, next to vLLM), so
this module -- imported by the CLI and the tests in the main venv -- starts `train.py` as a child
process with that venv's python and follows its JSON-lines progress on stdout.

A build is cached: its key is a hash of train.py's source and the parameters, written into the
output directory last. A call that finds the same key returns at once; anything else (no key,
another key, `force=True`) rebuilds into a sibling temporary directory and swaps it in, so a
crashed or interrupted build never leaves a half-written directory that looks complete. A file
lock serialises concurrent builders (parallel test sessions sharing `.cache/demo-models`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetlens.serving.registry import load_models

TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")
# serving/demo_models/make.py -> the checkout root in a development (editable) install.
REPO = Path(__file__).resolve().parents[2]
CACHE_KEY_FILE = "cache-key"
MANIFEST_FILE = "manifest.json"
MODELS_FILE = "models.yaml"

# Registry entries: key -> checkpoint directory written by train.py, replicas launched by default.
REGISTRY_NAMES = {
    "demo-small": ("small", 1),
    "demo-large": ("large", 1),
    "demo-large-bf16": ("large-bf16", 0),
    "demo-large-int8": ("large-int8", 0),
    "demo-large-int4": ("large-int4", 0),
    "demo-large-int3": ("large-int3", 0),
}
HOURLY_USD = 0.10  # nominal price of one CPU "GPU"-hour, so the cost models have a number to use
# vLLM would serve an fp32 checkpoint in bf16 by default; the variants must run at the precision
# they were evaluated at. 1 GiB of KV cache is plenty for these models (the default takes 4 GiB).
VLLM_DTYPE = {"float32": "float32", "bfloat16": "bfloat16"}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}

Progress = Callable[[dict[str, Any]], None]


class DemoBuildError(RuntimeError):
    """The demo models could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class DemoModels:
    """A finished build: where it is, what it measured, and whether it was reused."""

    out_dir: Path
    manifest: dict[str, Any]
    models_yaml: Path
    cache_key: str
    cached: bool


def find_serving_python(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The serving venv's python: `explicit`, else `.venv-serving/` in the checkout or the cwd."""
    candidates = [Path(explicit)] if explicit else [
        REPO / ".venv-serving" / "bin" / "python", Path.cwd() / ".venv-serving" / "bin" / "python",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise DemoBuildError(
        f"no serving python at {', '.join(map(str, candidates))}: the demo models train with the "
        "serving venv's torch; run scripts/setup-serving-venv"
    )


def cache_key(params: dict[str, Any]) -> str:
    """sha256 of train.py's source and the parameters (threads excluded: speed, not content)."""
    digest = hashlib.sha256(TRAIN_SCRIPT.read_bytes())
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()


def load(out_dir: str | os.PathLike[str]) -> DemoModels | None:
    """The finished build in `out_dir`, or None when there is none (or only a partial one)."""
    out_dir = Path(out_dir).resolve()
    try:
        key = (out_dir / CACHE_KEY_FILE).read_text().strip()
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return DemoModels(out_dir, manifest, out_dir / MODELS_FILE, key, cached=True)


def make_demo(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    small_steps: int | None = None,
    large_steps: int | None = None,
    easy_facts: int | None = None,
    hard_facts: int | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    serving_python: str | os.PathLike[str] | None = None,
) -> DemoModels:
    """Build the demo models into `out_dir` (or reuse the build there with the same cache key).

    Parameters left as None take train.py's defaults (the tuned ones); smaller values make quick
    builds for tests. `progress` receives train.py's events (`start`, `step`, `eval`, `done`).
    """
    params = {"seed": seed, "small_steps": small_steps, "large_steps": large_steps,
              "easy_facts": easy_facts, "hard_facts": hard_facts}
    params = {name: value for name, value in params.items() if value is not None}
    key = cache_key(params)
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        existing = load(out_dir)
        if existing is not None and existing.cache_key == key and not force:
            return existing
        python = find_serving_python(serving_python)
        _check_replaceable(out_dir)
        partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            _run_train(python, partial, params, threads or min(os.cpu_count() or 1, 4), progress)
            write_registry(partial, out_dir)
            load_models(partial / MODELS_FILE)  # never hand out a registry the gateway would refuse
            (partial / CACHE_KEY_FILE).write_text(key + "\n")
            shutil.rmtree(out_dir, ignore_errors=True)
            partial.rename(out_dir)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    built = load(out_dir)
    assert built is not None
    return DemoModels(built.out_dir, built.manifest, built.models_yaml, key, cached=False)


def write_registry(build_dir: Path, final_dir: Path) -> Path:
    """`models.yaml` for the build in `build_dir`, naming checkpoints by their final absolute path."""
    manifest = json.loads((build_dir / MANIFEST_FILE).read_text())
    models: dict[str, dict[str, Any]] = {}
    for name, (checkpoint, replicas) in REGISTRY_NAMES.items():
        entry = manifest["models"][checkpoint]
        spec: dict[str, Any] = {
            "path": str(final_dir / checkpoint),
            "variant": entry["variant"],
            "gpu": {"type": "cpu", "count": 1, "hourly_usd": HOURLY_USD},
            "replicas": replicas,
            "max_model_len": manifest["max_model_len"],
            "extra_args": ["--dtype", VLLM_DTYPE[entry["dtype"]]],
            "env": dict(VLLM_ENV),
        }
        if entry["base"]:
            spec["base"] = "demo-" + entry["base"]
        models[name] = spec
    header = (
        "# Generated by `fleetlens models make-demo`: tiny Llamas that memorise a key=value table\n"
        "# (prompt `qzk=` -> value). Accuracies per slice are in manifest.json next to this file.\n"
    )
    path = build_dir / MODELS_FILE
    path.write_text(header + yaml.safe_dump({"models": models}, sort_keys=False))
    return path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to delete a directory that is not ours (a mistyped --out must not cost data)."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (
        (out_dir / MANIFEST_FILE).exists() or (out_dir / CACHE_KEY_FILE).exists()
    ):
        raise DemoBuildError(f"{out_dir} exists and holds no demo models; choose an empty or new directory")


def _run_train(
    python: Path, out: Path, params: dict[str, Any], threads: int, progress: Progress | None
) -> None:
    """Run train.py, forwarding each JSON progress line; its stderr goes to `train.log`."""
    args = [str(python), str(TRAIN_SCRIPT), "--out", str(out), "--threads", str(threads)]
    for name, value in params.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out.mkdir(parents=True)
    log_path = out / "train.log"
    tail: deque[str] = deque(maxlen=20)
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    tail.append(line.rstrip())
                    continue
                if progress is not None:
                    progress(event)
            returncode = process.wait()
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C, a failing callback): stop the child
                process.kill()
                process.wait()
    if returncode != 0:
        errors = log_path.read_text().strip().splitlines()[-20:]
        raise DemoBuildError(f"train.py failed (exit {returncode}):\n" + "\n".join([*tail, *errors]))
