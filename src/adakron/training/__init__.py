"""The training application: data, tasks, recipes, the trainer, evaluation and generation."""
