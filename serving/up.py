"""The serving half of `fleetlens up`: demo models, the gateway, one small and one large replica.

Runs only when a vLLM is there to serve (the `.venv-serving` CPU build on a laptop, `vllm` on a GPU
host, or `replica.engine_command`). Everything it writes lives under `<data_dir>`:

    models/demo/            the demo checkpoints and their models.yaml (`fleetlens models make-demo`)
    gateway/routes.yaml     routes for the demo models (copied from serving/examples once; edit freely)
    gateway/keys.yaml       the demo API keys (one per demo customer), stored hashed
    gateway/demo-api-key    the demo customer's key in clear, mode 0600, so a user can call the gateway
    gateway/api-keys/       the other demo customers' keys (`fleetlens demo`'s traffic), mode 0600

The gateway and the replicas follow `<data_dir>/replicas`, so the replicas join the gateway's pools
when ready, whatever order they come up in.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from fleetlens.config import ConfigError, Settings

from .keys import generate_key
from .replica import default_engine_command

DEMO_ROUTES = Path(__file__).resolve().parent / "examples" / "routes-demo.yaml"
DEMO_REPLICAS = ("demo-small", "demo-large")


@dataclass(frozen=True)
class ServingFiles:
    models: Path
    routes: Path
    keys: Path
    api_keys: dict[str, str]  # customer -> key (in clear; the gateway reads only the hashes in `keys`)

    def env(self) -> dict[str, str]:
        """What the gateway and replica processes need to find these files."""
        return {"FLEETLENS_GATEWAY__MODELS_FILE": str(self.models), "FLEETLENS_GATEWAY__ROUTES_FILE": str(self.routes),
                "FLEETLENS_GATEWAY__KEYS_FILE": str(self.keys)}


def engine_available(settings: Settings) -> bool:
    """Whether `fleetlens serve replica` would find a vLLM to start."""
    if settings.replica.engine_command:
        return True
    try:
        default_engine_command()
    except ConfigError:
        return False
    return True


def prepare_files(settings: Settings, models_yaml: Path, *, routes: Path | None = None,
                  customers: tuple[str, ...] = ("demo",)) -> ServingFiles:
    """Routes (a copy of the demo routes, made once and kept: a user may edit it; or `routes` as given)
    and one API key per customer under <data_dir>/gateway; the first customer's key is the demo key."""
    directory = settings.data_dir / "gateway"
    directory.mkdir(parents=True, exist_ok=True)
    if routes is None:
        routes = directory / "routes.yaml"
        if not routes.exists():
            shutil.copyfile(DEMO_ROUTES, routes)
    return ServingFiles(models_yaml, routes, directory / "keys.yaml", customer_keys(directory, customers))


def customer_keys(directory: Path, customers: tuple[str, ...]) -> dict[str, str]:
    """A key per customer, made once: `keys.yaml` holds their hashes (what the gateway reads), the keys
    themselves are in files of mode 0600 — `demo-api-key` for the first customer (what `fleetlens eval`
    uses by default), `api-keys/<customer>` for the others. Re-running adds missing customers only."""
    keys_yaml = directory / "keys.yaml"
    entries = (yaml.safe_load(keys_yaml.read_text()) or []) if keys_yaml.exists() else []
    known, changed = {entry["id"] for entry in entries}, not keys_yaml.exists()
    keys: dict[str, str] = {}
    for index, customer in enumerate(customers):
        key_id = "demo" if index == 0 else customer
        key_file = directory / "demo-api-key" if index == 0 else directory / "api-keys" / customer
        if key_id not in known or not key_file.exists():
            key, digest = generate_key()
            entries = [e for e in entries if e["id"] != key_id] + [{"id": key_id, "customer": customer, "hash": digest}]
            changed = True
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.touch(mode=0o600)
            key_file.write_text(key + "\n")
        os.chmod(key_file, 0o600)
        keys[customer] = key_file.read_text().strip()
    if changed:  # the gateway watches keys.yaml: rewrite it only when a key is new
        keys_yaml.write_text("# Made by `fleetlens up` / `fleetlens demo`: demo keys, stored hashed (the keys are in\n"
                             "# demo-api-key and api-keys/<customer>, mode 0600).\n"
                             + yaml.safe_dump(entries, sort_keys=False))
    return keys
