"""vLLM general-plugin entry point (``vllm.general_plugins`` → ``channelmerge``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers),
so it is idempotent and cheap: model classes are registered lazily by ``"module:Class"``
strings, and the quantization config and the config / HTTP hooks are installed once per
process. On an untested vLLM only a ``channel_merged`` quantization config that refuses to
load is registered (unless ``CHANNELMERGE_ALLOW_UNTESTED_VLLM=1``): a channel-merged
checkpoint then fails at start-up with the reason, and other models are not touched.
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

    supported = set(ModelRegistry.get_supported_archs())
    for wrapper in fmt.WRAPPER_ARCHITECTURES.values():
        if wrapper not in supported:
            ModelRegistry.register_model(wrapper, f"vllm_channelmerge.compat:{wrapper}")
    try:
        compat.check_vllm_version()
    except RuntimeError as e:
        log.warning("%s; channel-merged checkpoints will be refused", e)
        compat.register_refusal(str(e).removeprefix("channelmerge: "))
        _DONE = True
        return
    compat.register_quant_config()
    compat.install_config_hooks(fmt.WRAPPER_ARCHITECTURES.values())
    compat.install_http_hook()  # API server process only; a no-op elsewhere
    _DONE = True
