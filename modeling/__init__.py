"""The elastic model: every supported family's decoder in plain torch, each block at its own widths.

It sits below the compressor (GPTQ, recovery and the quality measure run it), the exporters (which
read its shapes and layouts) and the runtime (which loads and switches it), so none of those
imports another to reach it.
"""
