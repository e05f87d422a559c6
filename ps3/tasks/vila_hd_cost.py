"""`vila_hd` stages in `platformctl estimate`: not estimated yet, and the note says why.

A VILA-HD model is PS3 plus the causal LM that `params.llm` names by path (its config and
tokenizer decide the model), so the spec alone does not fix its shapes. A probe that builds
the LLM from its config.json on the meta device would lift this; until then the stage gets
a one-line note instead of numbers.
"""

from __future__ import annotations

import torch

from ps3_platform.runtime.task import ProbeUnavailableError, TaskProbe
from ps3_platform.spec import Stage


def probe(stage: Stage, device: torch.device) -> TaskProbe:
    """Always refuses, naming the file the model would need."""
    raise ProbeUnavailableError(f"not estimated: the model needs the LLM at params.llm "
                                f"({stage.params.get('llm', 'not set')})")
