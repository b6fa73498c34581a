"""Adapters that plug decodekit's ops into serving engines.

:mod:`decodekit.integrations.vllm`: decodekit as vLLM v1's sampler and rejection sampler
(a ``vllm.general_plugins`` entry point, enabled with ``DECODEKIT_VLLM=1``). The submodules
import their engine lazily; importing this package imports no engine.
"""

__all__ = ["vllm"]
