"""The demo models' lookup facts as eval data: `evals/data/lookup_{easy,hard,choice}.jsonl`.

The facts come from the demo trainer's own `make_facts` (serving/demo_models/train.py), so the
shipped data and the models cannot drift apart; tests/test_eval_runner.py checks the shipped files
against it. train.py imports torch, which only the serving venv has, so this module compiles just
`make_facts` and the constants it reads out of train.py's source (standard library only).

Regenerate after changing the demo seed or slice sizes::

    python -m fleetlens.evals.demo_data            # writes evals/data/lookup_{easy,hard,choice}.jsonl

`lookup_choice.jsonl` is the same facts as a multiple-choice (likelihood) task: prompt `key=`, four
values to choose from — the fact's own and three other facts' — with the right one at a position
drawn from a generator seeded by the key alone, so an item does not change when others are added.
"""

from __future__ import annotations

import ast
import json
import random
import string
import sys
from collections.abc import Callable
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "serving" / "demo_models" / "train.py"
DATA_DIR = Path(__file__).resolve().with_name("data")
# The constants make_facts reads (module level in train.py).
_NEEDED = {"KEY_CHARS", "VALUE_CHARS", "KEY_LEN", "VALUE_LEN"}

Facts = tuple[list[tuple[str, str]], list[tuple[str, str]]]


def _train_module() -> ast.Module:
    return ast.parse(TRAIN_SCRIPT.read_text(), filename=str(TRAIN_SCRIPT))


def load_make_facts() -> Callable[[int, int, int], Facts]:
    """train.py's `make_facts(seed, easy, hard)`, without importing train.py (and torch)."""
    tree = _train_module()
    keep: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and {getattr(t, "id", None) for t in node.targets} & _NEEDED:
            keep.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name == "make_facts":
            keep.append(node)
    namespace: dict[str, object] = {"random": random, "string": string, "__name__": "demo_facts"}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(TRAIN_SCRIPT), "exec"), namespace)  # noqa: S102
    if "make_facts" not in namespace:
        raise RuntimeError(f"{TRAIN_SCRIPT} has no make_facts() any more; update {__file__}")
    return namespace["make_facts"]  # type: ignore[return-value]


def default_params() -> dict[str, int]:
    """train.py's default seed and slice sizes (its `Params` dataclass defaults)."""
    for node in _train_module().body:
        if isinstance(node, ast.ClassDef) and node.name == "Params":
            values = {}
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    values[statement.target.id] = ast.literal_eval(statement.value)  # type: ignore[arg-type]
            return {"seed": values["seed"], "easy": values["easy_facts"], "hard": values["hard_facts"]}
    raise RuntimeError(f"{TRAIN_SCRIPT} has no Params class any more; update {__file__}")


def records(seed: int | None = None, easy: int | None = None, hard: int | None = None) -> dict[str, list[dict]]:
    """{"easy": [...], "hard": [...]}: one {"id", "prompt", "answer", "slice"} per fact, in make_facts order.

    The id is the fact's key (keys are distinct across both slices), so an item keeps its id when
    the slices are resized.
    """
    params = default_params()
    seed = params["seed"] if seed is None else seed
    easy = params["easy"] if easy is None else easy
    hard = params["hard"] if hard is None else hard
    easy_facts, hard_facts = load_make_facts()(seed, easy, hard)
    return {name: [{"id": key, "prompt": f"{key}=", "answer": value, "slice": name} for key, value in facts]
            for name, facts in (("easy", easy_facts), ("hard", hard_facts))}


CHOICES = 4
CHOICE_EASY = 50    # every easy fact ...
CHOICE_HARD = 250   # ... and the first 250 hard ones: 300 items, well under a minute on demo-large


def choice_records(seed: int | None = None, easy: int = CHOICE_EASY, hard: int = CHOICE_HARD,
                   choices: int = CHOICES) -> list[dict]:
    """lookup_choice items: {"id", "prompt", "choices", "label", "answer", "slice"}, easy facts first.

    The distractors are other facts' values (from both slices, never equal to the answer); the
    generator that draws them and the answer's position is seeded by f"lookup_choice/{seed}/{key}".
    """
    params = default_params()
    seed = params["seed"] if seed is None else seed
    easy_facts, hard_facts = load_make_facts()(seed, params["easy"], params["hard"])
    values = sorted({value for _, value in easy_facts + hard_facts})
    rows = []
    for name, facts in (("easy", easy_facts[:easy]), ("hard", hard_facts[:hard])):
        for key, value in facts:
            rng = random.Random(f"lookup_choice/{seed}/{key}")
            options = rng.sample([v for v in values if v != value], choices - 1)
            label = rng.randrange(choices)
            options.insert(label, value)
            rows.append({"id": key, "prompt": f"{key}=", "choices": options, "label": label, "answer": value,
                         "slice": name})
    return rows


def write(out_dir: Path = DATA_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    files = {f"lookup_{name}.jsonl": rows for name, rows in records().items()}
    files["lookup_choice.jsonl"] = choice_records()
    for file_name, rows in files.items():
        path = out_dir / file_name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_DIR):
        print(path)
