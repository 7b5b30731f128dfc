"""Device side: run any rate of a nested checkpoint.

``model`` (the elastic model, KV cache, 4-bit linears), ``generate`` (prefill, decode, sampling),
``engine`` (load one rate's bytes, switch rate in memory), ``memory`` (free memory, footprint
prediction, rate choice), ``chat`` (conversation with /rate), ``resolve`` (a model name to its
cached checkpoint).
"""
