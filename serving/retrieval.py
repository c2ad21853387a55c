"""The gateway's retrieval stage: a pluggable `Retriever` and the local BM25 one FleetLens ships.

A feature whose route has `retrieval: {retriever: docs, top_k: 3}` gets a `retrieval` span
between `route` and `prompt_assembly`; the passages found go to the model as a system message
(chat) or a prefix of the prompt (completions). Retrievers are declared in routes.yaml::

    retrievers:
      docs: {type: bm25, path: docs/}          # a directory of .md/.txt files, relative to routes.yaml
      wiki: {type: custom, factory: "my_pkg.search:make", options: {index: prod}}

`bm25` indexes every `*.md`, `*.markdown` and `*.txt` file under `path` (one document per file, its
id the path relative to the directory) with the `bm25s` library when the gateway starts, and
re-indexes when a file is added, removed or changed (checked at most every `refresh_s`). Queries
run in a worker thread, so a search never blocks the event loop. `custom` calls
`factory(name, options)`, which must return an object with `async retrieve(query, k)`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fleetlens.config import ConfigError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".md", ".markdown", ".txt")


@dataclass(frozen=True)
class Document:
    """One retrieved passage; `id` goes on spans, `text` only when record_content is on."""

    id: str
    text: str
    score: float
    source: str


@runtime_checkable
class Retriever(Protocol):
    async def retrieve(self, query: str, k: int) -> list[Document]:
        """The `k` best documents for `query`, best first (fewer when fewer match)."""
        ...


class BM25Retriever:
    """BM25 (bm25s) over the text files of one directory, rebuilt when the files change."""

    def __init__(self, path: str | Path, *, refresh_s: float = 5.0) -> None:
        self.path = Path(path)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._signature: tuple[Any, ...] = ()
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._index: Any = None
        self.builds = 0
        with self._lock:
            self._build(self._scan())

    def __len__(self) -> int:
        return len(self._ids)

    def _scan(self) -> tuple[Any, ...]:
        if not self.path.is_dir():
            raise ConfigError(f"retriever directory {self.path} does not exist or is not a directory")
        files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        signature = []
        for file in files:
            try:
                st = file.stat()
            except OSError:
                continue
            signature.append((str(file), st.st_mtime_ns, st.st_size))
        return tuple(signature)

    def _build(self, signature: tuple[Any, ...]) -> None:
        import bm25s

        ids, texts = [], []
        for name, _mtime, _size in signature:
            file = Path(name)
            try:
                text = file.read_text(encoding="utf-8", errors="replace").strip()
            except OSError as error:
                log.warning("retriever %s: cannot read %s: %s", self.path, file, error)
                continue
            if text:
                ids.append(file.relative_to(self.path).as_posix())
                texts.append(text)
        index = None
        if texts:
            index = bm25s.BM25()
            index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        self._ids, self._texts, self._index = ids, texts, index
        self._signature, self._checked = signature, time.monotonic()
        self.builds += 1
        log.info("retriever %s: indexed %d documents", self.path, len(ids))

    def refresh(self, force: bool = False) -> bool:
        """Re-index if a file changed (at most every refresh_s unless forced); True if rebuilt."""
        with self._lock:
            if not force and time.monotonic() - self._checked < self.refresh_s:
                return False
            try:
                signature = self._scan()
            except ConfigError as error:
                log.error("retriever %s: keeping the old index: %s", self.path, error)
                self._checked = time.monotonic()
                return False
            if signature == self._signature:
                self._checked = time.monotonic()
                return False
            self._build(signature)
            return True

    def search(self, query: str, k: int) -> list[Document]:
        """Blocking search (run it in a thread; `retrieve` does)."""
        import bm25s

        self.refresh()
        with self._lock:
            index, ids, texts = self._index, self._ids, self._texts
        if index is None or k < 1 or not query.strip():
            return []
        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens or not tokens[0]:
            return []
        found, scores = index.retrieve(tokens, k=min(k, len(ids)), show_progress=False)
        documents = []
        for position, score in zip(found[0], scores[0]):
            if float(score) <= 0:
                continue  # no query term in it: not a match, whatever BM25 ranks last
            documents.append(Document(ids[int(position)], texts[int(position)], float(score),
                                      str(self.path / ids[int(position)])))
        return documents

    async def retrieve(self, query: str, k: int) -> list[Document]:
        return await asyncio.to_thread(self.search, query, k)


def _load_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"retriever factory {spec!r} must be 'module:function'")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"retriever factory {spec!r} cannot be imported: {error}") from None
    if not callable(factory):
        raise ConfigError(f"retriever factory {spec!r} is not callable")
    return factory


def build_retriever(name: str, spec: Any) -> Retriever:
    """A retriever from its routes.yaml spec (`RetrieverSpec`); raises ConfigError."""
    if spec.type == "bm25":
        return BM25Retriever(spec.path, refresh_s=spec.refresh_s)
    factory = _load_factory(spec.factory or "")
    retriever = factory(name, dict(spec.options))
    if not isinstance(retriever, Retriever):
        raise ConfigError(f"retriever {name!r}: {spec.factory} returned {type(retriever).__name__}, "
                          "which has no async retrieve(query, k)")
    return retriever


class Retrievers:
    """The retrievers a routes.yaml declares, kept in step with reloads: an unchanged spec keeps
    its instance (and index); a new or changed one is built; a dropped one goes away."""

    def __init__(self, extra: Mapping[str, Retriever] | None = None) -> None:
        self.extra = dict(extra or {})  # given in code (tests, embedding apps); win over routes.yaml
        self._built: dict[str, tuple[Any, Retriever]] = {}
        self._lock = threading.Lock()

    def sync(self, specs: Mapping[str, Any]) -> None:
        """Build what `specs` (name → RetrieverSpec) needs; a spec that fails is logged and skipped."""
        with self._lock:
            built: dict[str, tuple[Any, Retriever]] = {}
            for name, spec in specs.items():
                if name in self.extra:
                    continue
                old = self._built.get(name)
                if old is not None and old[0] == spec:
                    built[name] = old
                    continue
                try:
                    built[name] = (spec, build_retriever(name, spec))
                except ConfigError as error:
                    log.error("retriever %r not built: %s", name, error)
                    if old is not None:
                        built[name] = old
            self._built = built

    def get(self, name: str) -> Retriever | None:
        if name in self.extra:
            return self.extra[name]
        found = self._built.get(name)
        return found[1] if found is not None else None

    def needs_sync(self, specs: Mapping[str, Any]) -> bool:
        return any(name not in self.extra and (name not in self._built or self._built[name][0] != spec)
                   for name, spec in specs.items())


def context_block(documents: list[Document]) -> str:
    """How passages are shown to the model."""
    parts = [f"[{number}] ({doc.id})\n{doc.text}" for number, doc in enumerate(documents, start=1)]
    return ("Answer using the following reference passages when they are relevant; cite them by number.\n\n"
            + "\n\n".join(parts))


def query_of(body: dict[str, Any]) -> str:
    """What to search for: the last user message (chat) or the prompt (completions)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(p["text"] for p in content
                                    if isinstance(p, dict) and isinstance(p.get("text"), str))
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return " ".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else ""


def insert_context(body: dict[str, Any], documents: list[Document]) -> dict[str, Any]:
    """The upstream body with the passages in: a system message after the caller's own system
    messages (chat), or a prefix of the prompt (completions)."""
    if not documents:
        return body
    block = context_block(documents)
    messages = body.get("messages")
    if isinstance(messages, list):
        at = 0
        while at < len(messages) and isinstance(messages[at], dict) and messages[at].get("role") == "system":
            at += 1
        return dict(body, messages=[*messages[:at], {"role": "system", "content": block}, *messages[at:]])
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return dict(body, prompt=f"{block}\n\n{prompt}")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return dict(body, prompt=[f"{block}\n\n{p}" for p in prompt])
    return body
