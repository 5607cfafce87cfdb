"""Other engines for an mhpo config: the same run (model, task, rewards, objective, rollout and update
settings, evaluation) carried out by another trainer, e.g. `mhpo train --engine trl` (engines/trl.py)
runs it through TRL's MHPOTrainer so that torchrun / accelerate launch scale it out.

Above the trainer (it reuses its config, setup and run directory) and the integrations (the TRL
trainer it drives), below the CLI."""
