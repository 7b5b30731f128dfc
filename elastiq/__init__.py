"""elastiq: compress an LLM once into a nested checkpoint, run it at any pruning rate.

The sub-packages are the architecture: ``compressor`` (cloud side), ``runtime`` (device side),
``exporters`` (GGUF / ONNX / Hugging Face), ``kernels`` (GPU kernels and CPU paths) and
``evaluation`` (perplexity and zero-shot accuracy). ``docs/architecture.md`` in the repository
describes how they fit together, ``docs/format.md`` the nested checkpoint.
"""

__version__ = "0.1.0"


class ElastiqError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""
