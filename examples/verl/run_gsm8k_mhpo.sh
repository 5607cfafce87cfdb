#!/usr/bin/env bash
# GRPO with the MHPO policy loss on GSM8K-format parquet data: verl 0.9.1, FSDP actor, vLLM rollout,
# one node or several. The only MHPO-specific lines are the three `policy_loss` groups below.
#
# Data: parquet files in verl's GSM8K format (columns data_source="openai/gsm8k", prompt (chat
# messages), ability, reward_model={"style": "rule", "ground_truth": ...}, extra_info), e.g. written
# by examples/data_preprocess/gsm8k.py of the verl repository; verl's built-in GSM8K rule reward
# scores them.
#
# One node:   bash examples/verl/run_gsm8k_mhpo.sh
# N nodes:    on the head node    ray start --head --port=6379
#             on every other node ray start --address=<head-ip>:6379
#             then, on the head:  NNODES=N bash examples/verl/run_gsm8k_mhpo.sh
# Extra hydra overrides go after the script name; DRY_RUN=1 prints the overrides and exits.
#
# Needs `pip install mhpo` (or -e .) in the environment of every node: `import verl` loads the
# `verl.plugins` entry point that registers loss_mode=mhpo in the driver and in every Ray worker.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-7B-Instruct}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/gsm8k/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/gsm8k/test.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ROLLOUT_TP=${ROLLOUT_TP:-2}
LOSS_AGG_MODE=${LOSS_AGG_MODE:-token-mean}
PROJECT=${PROJECT:-mhpo-gsm8k}
EXPERIMENT=${EXPERIMENT:-qwen2.5-7b-mhpo-c1.5}

ARGS=(
    algorithm.adv_estimator=grpo
    algorithm.use_kl_in_reward=False

    data.train_files="$TRAIN_FILE"
    data.val_files="$VAL_FILE"
    # 512 prompts x 8 samples = 4096 completions per batch; mini-batches of 128 prompts (x 8) give
    # 4 optimizer updates per batch, so old and current policy differ and MHPO's ratio control acts
    data.train_batch_size=512
    data.max_prompt_length=512
    data.max_response_length=1024
    data.filter_overlong_prompts=True
    data.truncation=error

    actor_rollout_ref.model.path="$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=128
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8
    actor_rollout_ref.actor.ppo_epochs=1
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.loss_agg_mode="$LOSS_AGG_MODE"
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False

    # --- MHPO: the loss, its config class, its hyper-parameters (the paper's defaults, spelled out)
    actor_rollout_ref.actor.policy_loss.loss_mode=mhpo
    actor_rollout_ref.actor.policy_loss._target_=mhpo.integrations.verl.MHPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.mhpo_c=1.5
    +actor_rollout_ref.actor.policy_loss.mhpo_k_pos=1.5
    +actor_rollout_ref.actor.policy_loss.mhpo_lambda_pos=1.0
    +actor_rollout_ref.actor.policy_loss.mhpo_k_neg=2.0
    +actor_rollout_ref.actor.policy_loss.mhpo_lambda_neg=0.8

    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.n=8
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16

    trainer.critic_warmup=0
    trainer.logger='["console","tensorboard"]'
    trainer.project_name="$PROJECT"
    trainer.experiment_name="$EXPERIMENT"
    trainer.nnodes="$NNODES"
    trainer.n_gpus_per_node="$GPUS_PER_NODE"
    trainer.save_freq=50
    trainer.test_freq=10
    trainer.total_epochs=10
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${ARGS[@]}" "$@"
    exit 0
fi

exec python3 -m verl.trainer.main_ppo "${ARGS[@]}" "$@"
