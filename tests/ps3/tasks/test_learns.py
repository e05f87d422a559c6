"""Evidence that PS3 pre-training learns: `jobs/quickstart.yaml` exactly as users run it.

Synthetic 1K-4K scenes and documents, 300 steps of the tiny preset on 2 workers, then the
held-out evaluation. Local retrieval from the in-box high-res features must clearly beat
both the untrained model and the low-res features (which cannot tell which of a scene's
signs the caption names), and learnt selection must find box cells far above chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ps3_platform.cli import main

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_quickstart_pretraining_beats_untrained_and_lowres(platform_home, capsys):
    assert main(["submit", str(ROOT / "jobs" / "quickstart.yaml"), "--backend", "local", "--wait", "-q"]) == 0
    capsys.readouterr()
    assert main(["status", "quickstart", "-o", "json"]) == 0
    figures = json.loads(capsys.readouterr().out)["eval"]
    print(figures)

    baseline = max(figures["retrieval_r1_untrained"], figures["retrieval_r1_lowres"])
    assert figures["retrieval_r1"] >= 2 * baseline and figures["retrieval_r1"] >= baseline + 0.08, figures
    for selection in ("recall_topdown", "recall_bottomup"):
        assert figures[selection] >= 4 * figures["recall_random"], (selection, figures)
