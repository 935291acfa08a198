"""SQLite cache of teacher answers, keyed by a hash of (model, parameters, messages).

    cache = AnswerCache(ws.root / "synth-cache.sqlite")
    key = request_key("gpt-x", {"temperature": 1.0, "seed": 7}, messages)
    cache.get(key) or cache.put(key, answer)

Every answer is committed as it arrives (WAL journal), so a run killed with ``kill -9`` loses at most
the requests in flight: a rerun sends only the requests that have no answer yet. Failed requests are
never cached, so they are tried again. The key covers what shapes the answer and nothing secret (no
API key, no endpoint URL: the same model behind another host answers the same prompt).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from microtune.core.hashing import hash_value


def request_key(model: str, params: dict[str, Any], messages: list[dict[str, str]]) -> str:
    return hash_value({"model": model, "params": params, "messages": messages})


class AnswerCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: autocommit, each put is durable on its own
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, answer: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO answers (key, answer, created) VALUES (?, ?, julianday('now'))",
                        (key, json.dumps(answer)))

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self.db.close()
