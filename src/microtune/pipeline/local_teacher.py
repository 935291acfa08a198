"""The offline default teacher for `synth`: the recipe's base model served by `microtune serve`, in-process.

    with local_teacher(recipe) as (base_url, model):     # http://127.0.0.1:<port>/v1, the base model's name
        ...                                                # any OpenAI client can talk to it meanwhile

The server listens on 127.0.0.1 on a free port, without the registry and without auth, and is shut
down when the block ends. A small base model writes weak examples; the filter cascade and the
fidelity tests say how weak — point `synth.teacher.base_url` at a bigger model for real use.
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from microtune.config import Recipe
from microtune.core.errors import ModelError


@contextmanager
def local_teacher(recipe: Recipe, start_timeout_s: float = 300) -> Iterator[tuple[str, str]]:
    import uvicorn

    from microtune.serve import ServeSettings, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = recipe.synth.teacher if recipe.synth else None
    settings = ServeSettings(base=recipe.model.base, registry=False, host="127.0.0.1", port=port, poll_s=0,
                             max_tokens=max(teacher.max_tokens if teacher else 600, 16), timeout_s=600)
    server = uvicorn.Server(uvicorn.Config(build_app(settings, api_keys=[]), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="microtune-local-teacher", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ModelError("the local teacher (microtune serve on the base model) did not start",
                             hint="set synth.teacher.base_url to another OpenAI-compatible endpoint")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/v1", recipe.model.base
    finally:
        server.should_exit = True
        thread.join(timeout=60)
