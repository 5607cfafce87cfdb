"""The trainer: config, sampling, advantages, the update, checkpoints, logs, warm-up, evaluation
and the loop (:mod:`mhpo.trainer.train`). Imports the objective library and the components
(models, tasks, rewards), never the comparison or the CLI."""
