"""PS3 science: model, losses, data, curation and the tasks the runtime runs."""
