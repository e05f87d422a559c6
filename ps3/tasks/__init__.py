"""Tasks (recipes) the runtime runs, by name.

Values are "module:function" strings imported only when the task runs, so looking up a
task never imports the models of the others.
"""

TASKS: dict[str, str] = {
    "noop": "ps3.tasks.noop:build",
    "sleep": "ps3.tasks.noop:build_sleep",
    "synth_data": "ps3.tasks.synth:build",
    "curate": "ps3.tasks.curate:build",
    "lowres_pretrain": "ps3.tasks.lowres_pretrain:build",
    "ps3_pretrain": "ps3.tasks.pretrain:build",
    "ps3_eval": "ps3.tasks.evaluate:build",
    "synth_vqa": "ps3.tasks.synth_vqa:build",
    "import_llava": "ps3.tasks.import_llava:build",
    "vila_hd": "ps3.tasks.vila_hd:build",
    "hr_sft_synth": "ps3.tasks.hr_sft_synth:build",
    "selection_data": "ps3.tasks.selection_data:build",
    "vila_hd_eval": "ps3.tasks.vila_hd_eval:build",
}

#: Checks of a task's params that `platformctl validate` and `submit` run before anything starts,
#: importable without torch: "module:function" taking the params dict and returning a list of
#: (path inside params, message). Every task's params model (`ps3.tasks.params.PARAM_MODELS`) is
#: checked as well; these are the tasks whose params need more than a model.
PARAM_CHECKS: dict[str, str] = {
    "curate": "ps3.curation.config:check_params",
}

#: Training tasks' probes (`ps3_platform.runtime.task.TaskProbe`): "module:function" taking
#: (stage, device) and returning the stage's model, a micro-batch maker and its loss, for
#: `platformctl estimate` and the counted FLOPs behind MFU. Tasks without one are not estimated.
PROBES: dict[str, str] = {
    "lowres_pretrain": "ps3.tasks.lowres_pretrain:probe",
    "ps3_pretrain": "ps3.tasks.pretrain_cost:probe",
    "vila_hd": "ps3.tasks.vila_hd_cost:probe",
}

__all__ = ["PARAM_CHECKS", "PROBES", "TASKS"]
