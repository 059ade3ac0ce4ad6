"""Research code built on the library: sweeps, the LoRA studies, the linear toy and the benchmark.

Nothing in the core package imports from here; ``lora_train`` top level is the library a user imports.
"""
