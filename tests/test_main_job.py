"""The README's main job runs end to end and learns."""

import logging
import re

from launch.main import main


def test_default_job_trains_and_generates(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="fusiontree.main"):
        main(["--train.steps=30", "--train.log_every_steps=1", "--generate.max_new_tokens=40"])
    losses = [float(m) for m in re.findall(r"step \d+ loss ([0-9.]+)", caplog.text)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # bytes: ln(512) = 6.2 at start
    out = capsys.readouterr().out
    assert "--- generated with the cache ---" in out
    assert len(out.split("--- generated with the cache ---")[1]) > 40
