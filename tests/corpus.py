"""
Access to the captured request corpus that tests replay.

The corpus holds real requests recorded from real client libraries: for
each request C{NNN.body} (the body as sent, never decompressed) and
C{NNN.json} (method, target, headers, the response the capture server gave,
and the client that sent it).  C{REDUCTRAI_CORPUS} overrides its location,
which is otherwise C{shared/corpus} beside the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import attrs

REPOSITORY = Path(__file__).resolve().parent.parent


def corpus_root() -> Path:
    """
    Return the corpus directory.
    """
    configured = os.environ.get("REDUCTRAI_CORPUS")
    if configured:
        return Path(configured)
    return REPOSITORY.parent / "shared" / "corpus"


@attrs.frozen
class CapturedRequest:
    """
    One captured request: its metadata and the exact body bytes.
    """

    folder: str
    name: str
    meta: dict[str, Any]
    body: bytes

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def target(self) -> str:
        return self.meta["target"]

    @property
    def path(self) -> str:
        return self.meta["path"]

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in self.meta["headers"]]

    def header(self, name: str) -> str | None:
        """
        Return the last value of header C{name} (any case), or L{None}.
        """
        found = None
        for key, value in self.headers:
            if key.lower() == name.lower():
                found = value
        return found

    def __repr__(self) -> str:
        return f"<CapturedRequest {self.folder}/{self.name} {self.method} {self.target}>"


def load(folder: str) -> list[CapturedRequest]:
    """
    Load every request of one corpus folder, in arrival order.
    """
    directory = corpus_root() / folder
    requests = []
    for meta_path in sorted(directory.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        body = (directory / meta["body_file"]).read_bytes()
        requests.append(CapturedRequest(folder, meta_path.stem, meta, body))
    return requests


def folders() -> list[str]:
    """
    Return the names of all corpus folders.
    """
    return sorted(p.name for p in corpus_root().iterdir() if p.is_dir())


def load_all() -> Iterator[CapturedRequest]:
    """
    Yield every request of every folder.
    """
    for folder in folders():
        yield from load(folder)
