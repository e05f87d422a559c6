"""Tasks (recipes) the runtime runs, by name.

Values are "module:function" strings imported only when the task runs, so looking up a
task never imports the models of the others.
"""

TASKS: dict[str, str] = {
    "noop": "ps3.tasks.noop:build",
    "sleep": "ps3.tasks.noop:build_sleep",
}

__all__ = ["TASKS"]
