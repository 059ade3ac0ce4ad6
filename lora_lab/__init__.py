"""The lab: research built on lora_train, apart from the library it studies.

The LoRA studies and sweeps, the training and serving benchmarks, the linear SVD-bound toy, the GPU check, the
memory probe, the reload check and the generator of docs/distributed.md's compatibility table. Installed with
lora_train by the same setup.cfg; ``lora_train`` never imports from here (tests/test_layout.py checks it).
"""
