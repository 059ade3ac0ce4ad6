"""Serve trained adapters over HTTP: many adapters over one base model, micro-batched.

- :mod:`~lora_train.serving.registry`: the base model loaded once and the adapters attached to it (peft multi-adapter).
- :mod:`~lora_train.serving.trained`: BitFit / head_only runs and merged LoRA adapters (:mod:`lora_train.merged`),
  their tensors swapped into that base per forward.
- :mod:`~lora_train.serving.grouped`: one forward for the texts of several LoRA adapters.
- :mod:`~lora_train.serving.batcher`: the micro-batcher; every model call runs in a worker thread (one by default).
- :mod:`~lora_train.serving.replicas`: one model replica per worker, all sharing the same tensors.
- :mod:`~lora_train.serving.app`: the FastAPI application (HTTP API, OpenAPI schema, the page at ``/``).
- :mod:`~lora_lab.serve_bench`: the load test behind ``scripts/serve_bench.py``.

See docs/serving.md.
"""
