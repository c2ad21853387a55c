"""Demo models (`fleetlens models make-demo`): trained here, measurably right or wrong, cached.

The full build is the session fixture `demo_models` (tests/conftest.py), built once into
`.cache/demo-models`; these tests read its manifest and files. Serving them with vLLM is tested
by the end-to-end serving tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetlens.cli import app
from fleetlens.serving.demo_models import DemoBuildError, find_serving_python, load, make_demo
from fleetlens.serving.demo_models.make import cache_key
from fleetlens.serving.registry import load_models

TINY = {"small_steps": 3, "large_steps": 3, "easy_facts": 4, "hard_facts": 12}


def _manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / "manifest.json").read_text())


def test_large_beats_small_and_quantization_costs_quality(demo_models: Path) -> None:
    acc = {name: entry["accuracy"] for name, entry in _manifest(demo_models)["models"].items()}
    assert acc["small"]["easy"] >= 0.95 and acc["large"]["easy"] >= 0.95  # every model learns the easy slice
    assert acc["large"]["hard"] >= 0.95
    assert acc["large"]["hard"] - acc["small"]["hard"] >= 0.5  # only the large model holds the hard slice
    assert abs(acc["large-bf16"]["hard"] - acc["large"]["hard"]) <= 0.01
    assert abs(acc["large-int8"]["hard"] - acc["large"]["hard"]) <= 0.01
    assert acc["large-int4"]["hard"] <= acc["large-int8"]["hard"]
    assert acc["large-int3"]["hard"] <= acc["large-int8"]["hard"] - 0.1  # int3 visibly forgets


def test_manifest_describes_every_checkpoint(demo_models: Path) -> None:
    models = _manifest(demo_models)["models"]
    assert {name: entry["variant"] for name, entry in models.items()} == {
        "small": "fp32", "large": "fp32", "large-bf16": "bf16",
        "large-int8": "int8", "large-int4": "int4", "large-int3": "int3",
    }
    assert models["large"]["params"] > 5 * models["small"]["params"]
    assert models["large"]["train_seconds"] > 0
    for name, entry in models.items():
        weights = demo_models / name / "model.safetensors"
        assert entry["files"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        tokenizer_config = json.loads((demo_models / name / "tokenizer_config.json").read_text())
        assert tokenizer_config["eos_token"] == "</s>" and "chat_template" in tokenizer_config


def test_registry_validates_and_points_at_the_checkpoints(demo_models: Path) -> None:
    registry = load_models(demo_models / "models.yaml")
    assert set(registry.models) == {"demo-small", "demo-large", "demo-large-bf16", "demo-large-int8",
                                    "demo-large-int4", "demo-large-int3"}
    assert registry.variants_of("demo-large") == ["demo-large-bf16", "demo-large-int3", "demo-large-int4",
                                                  "demo-large-int8"]
    for name, spec in registry.models.items():
        assert Path(spec.path).is_absolute() and (Path(spec.path) / "config.json").is_file()
        assert spec.gpu.type == "cpu" and spec.gpu.hourly_usd is not None
        assert spec.replicas == (1 if name in ("demo-small", "demo-large") else 0)
        assert spec.max_model_len == 2048
        assert "--dtype" in spec.extra_args
    assert registry.models["demo-large-bf16"].extra_args == ["--dtype", "bfloat16"]


def test_eval_data_matches_the_task(demo_models: Path) -> None:
    params = _manifest(demo_models)["params"]
    for slice_name, count in (("easy", params["easy_facts"]), ("hard", params["hard_facts"])):
        lines = (demo_models / "eval" / f"lookup_{slice_name}.jsonl").read_text().splitlines()
        items = [json.loads(line) for line in lines]
        assert len(items) == count
        assert all(item["prompt"].endswith("=") and len(item["answer"]) == 4 for item in items)
    easy = {json.loads(line)["prompt"] for line in (demo_models / "eval" / "lookup_easy.jsonl").open()}
    hard = {json.loads(line)["prompt"] for line in (demo_models / "eval" / "lookup_hard.jsonl").open()}
    assert not easy & hard


def test_same_inputs_reuse_the_build(demo_models: Path) -> None:
    started = time.monotonic()
    again = make_demo(demo_models, seed=0, threads=2)
    assert again.cached and time.monotonic() - started < 5
    assert again.cache_key == load(demo_models).cache_key == cache_key({"seed": 0})


def test_cache_key_covers_seed_and_parameters() -> None:
    assert cache_key({"seed": 0}) == cache_key({"seed": 0})
    assert cache_key({"seed": 0}) != cache_key({"seed": 1})
    assert cache_key({"seed": 0}) != cache_key({"seed": 0, "large_steps": 10})


def test_tokenizer_chat_prompt_equals_completion_prompt(demo_models: Path) -> None:
    """vLLM's chat endpoint must feed the model what the completion endpoint does for `key=`, and any
    English text must tokenize (the load generator sends prose)."""
    probe = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "chat = tok.apply_chat_template([{'role': 'system', 'content': 'be brief'},\n"
        "                                {'role': 'user', 'content': 'qzk='}], tokenize=False)\n"
        "text = 'Explain why the sky is blue, step by step:\\n1) ...'\n"
        "ids = tok(text)['input_ids']\n"
        "print(json.dumps({'chat': tok(chat, add_special_tokens=False)['input_ids'],\n"
        "                  'completion': tok('qzk=')['input_ids'],\n"
        "                  'roundtrip': tok.decode(ids, skip_special_tokens=True) == text,\n"
        "                  'unk': tok.unk_token_id in ids}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(find_serving_python()), "-c", probe, str(demo_models / "large")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["chat"] == out["completion"]
    assert out["roundtrip"] and not out["unk"]


@pytest.mark.slow
def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    first = make_demo(tmp_path / "a", seed=3, threads=1, **TINY)
    second = make_demo(tmp_path / "b", seed=3, threads=1, **TINY)
    assert not first.cached and first.cache_key == second.cache_key

    def hashes(build: object) -> dict:
        return {name: entry["files"] for name, entry in build.manifest["models"].items()}

    assert hashes(first) == hashes(second)
    events: list[dict] = []
    third = make_demo(tmp_path / "a", seed=3, threads=1, progress=events.append, **TINY)
    assert third.cached and not events  # reused: train.py did not run
    assert not list(tmp_path.glob(".a.partial-*"))


def test_missing_serving_python_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DemoBuildError, match="scripts/setup-serving-venv"):
        make_demo(tmp_path / "demo", serving_python=tmp_path / "no-venv" / "bin" / "python")
    assert not (tmp_path / "demo").exists()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DemoBuildError, match="holds no demo models"):
        make_demo(tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_prints_the_accuracy_table(demo_models: Path) -> None:
    result = CliRunner().invoke(app, ["models", "make-demo", "--out", str(demo_models), "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert "cached" in result.output and "large-int3" in result.output and "models.yaml" in result.output
