"""The lab's command-line programs. Each module's ``main`` is a console script (declared in setup.cfg) and is what the
matching ``scripts/*.py`` file runs, as :mod:`lora_train.commands` is for the library's programs."""
