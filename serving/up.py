"""The serving half of `fleetlens up`: demo models, the gateway, one small and one large replica.

Runs only when a vLLM is there to serve (the `.venv-serving` CPU build on a laptop, `vllm` on a GPU
host, or `replica.engine_command`). Everything it writes lives under `<data_dir>`:

    models/demo/            the demo checkpoints and their models.yaml (`fleetlens models make-demo`)
    gateway/routes.yaml     routes for the demo models (copied from serving/examples once; edit freely)
    gateway/keys.yaml       one demo API key, stored hashed
    gateway/demo-api-key    that key in clear, mode 0600, so a user can call the gateway

The gateway and the replicas follow `<data_dir>/replicas`, so the replicas join the gateway's pools
when ready, whatever order they come up in.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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
    api_key: str

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


def prepare_files(settings: Settings, models_yaml: Path) -> ServingFiles:
    """Routes and a demo key under <data_dir>/gateway, made once and kept (a user may edit them)."""
    directory = settings.data_dir / "gateway"
    directory.mkdir(parents=True, exist_ok=True)
    routes = directory / "routes.yaml"
    if not routes.exists():
        shutil.copyfile(DEMO_ROUTES, routes)
    keys, key_file = directory / "keys.yaml", directory / "demo-api-key"
    if not keys.exists() or not key_file.exists():
        key, digest = generate_key()
        keys.write_text("# Made by `fleetlens up`: the demo key (in clear in demo-api-key, mode 0600).\n"
                        f"- {{id: demo, customer: demo, hash: '{digest}'}}\n")
        key_file.touch(mode=0o600)
        key_file.write_text(key + "\n")
    os.chmod(key_file, 0o600)
    return ServingFiles(models_yaml, routes, keys, key_file.read_text().strip())
