"""The command-line programs. Each module's ``main`` is a console script (declared in setup.cfg) and is
what the matching ``scripts/*.py`` file runs."""
