"""The memory probe's argument checks (its measurements are in docs/results.md, run by hand)."""

from __future__ import annotations

import pytest

from lora_lab.memory_probe import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be > 0"),
        (["--multiple", "-8"], "--multiple must be > 0"),
        (["--attention-dropout", "1.0"], "--attention-dropout must be in [0, 1)"),
        (["--attention-dropout", "-0.1"], "--attention-dropout must be in [0, 1)"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
