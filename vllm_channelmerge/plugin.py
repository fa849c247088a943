"""vLLM general-plugin entry point (``vllm.general_plugins`` → ``channelmerge``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers),
so it is idempotent and cheap: model classes are registered lazily by ``"module:Class"``
strings, and the quantization config and config hooks are installed once per process.
"""

from __future__ import annotations

import logging

from vllm_channelmerge import format as fmt

log = logging.getLogger("vllm_channelmerge")

_DONE = False


def register() -> None:
    global _DONE
    if _DONE:
        return
    from vllm import ModelRegistry

    from vllm_channelmerge import compat

    compat.check_vllm_version()
    supported = set(ModelRegistry.get_supported_archs())
    for wrapper in fmt.WRAPPER_ARCHITECTURES.values():
        if wrapper not in supported:
            ModelRegistry.register_model(wrapper, f"vllm_channelmerge.models:{wrapper}")
    # Registers the `channel_merged` quantization config (decorator on import).
    import vllm_channelmerge.quant  # noqa: F401

    compat.install_config_hooks(fmt.WRAPPER_ARCHITECTURES.values())
    compat.install_http_hook()  # API server process only; a no-op elsewhere
    _DONE = True
