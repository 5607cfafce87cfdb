"""The trainer behind `mhpo train`, one question per module:

    config, defaults     what can be set, and what an unset value becomes on this machine
    setup                validate before loading (prepare_run), the policy and optimizer, the warm-up stage
    warmup               the supervised warm-up of the tiny models (cached)
    step                 one RL step: sample, score, advantages, behaviour log-probs, update, metrics
    pending              batches sampled for later steps (rollout.staleness)
    advantages, update   group advantages; minibatches, policy_loss, optimizer steps
    loop                 the run: stages, evaluations, checkpoints, interrupts (run_training)
    run_dir              the run directory: config, summary, which checkpoint
    checkpoint           safetensors + JSON checkpoints, atomic and verified
    metrics, trackers, plots, progress    what a run logs and shows
    interrupts           Ctrl-C / SIGTERM held during an update
    evaluate_run         `mhpo eval RUN_DIR`: a checkpoint on the held-out set or benchmarks

Imports the objective library, models, tasks, rewards, generation and evaluation; never the
comparison, the integrations or the CLI."""
