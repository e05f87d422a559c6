"""Tasks (recipes) the runtime runs, by name.

Values are "module:function" strings imported only when the task runs, so looking up a
task never imports the models of the others.
"""

TASKS: dict[str, str] = {
    "noop": "ps3.tasks.noop:build",
    "sleep": "ps3.tasks.noop:build_sleep",
    "synth_data": "ps3.tasks.synth:build",
    "curate": "ps3.tasks.curate:build",
    "ps3_pretrain": "ps3.tasks.pretrain:build",
    "ps3_eval": "ps3.tasks.evaluate:build",
}

__all__ = ["TASKS"]
