"""`mhpo verl-overrides`: the Hydra overrides that give verl's `main_ppo` the objective, hyper-parameters,
group size and batch / mini-batch shape of an mhpo run config.

    mhpo verl-overrides --config run.yaml > overrides.txt
    mapfile -t MHPO < overrides.txt
    python3 -m verl.trainer.main_ppo "${MHPO[@]}" data.train_files=... actor_rollout_ref.model.path=...

What maps (A = actor_rollout_ref.actor, R = actor_rollout_ref.rollout; k = update.num_minibatches x
update.epochs optimizer steps per RL step, as verl counts them: one per mini-batch and epoch):

    objective.name / hparams           A.policy_loss.loss_mode=mhpo.<name> (the plug-in's loss), _target_ and
                                       +A.policy_loss.mhpo_hparams={...} (the values set; the rest are the
                                       objective's defaults on both sides, from the same registry)
    objective.agg                      A.loss_agg_mode
    objective.beta                     A.use_kl_loss, A.kl_loss_coef, A.kl_loss_type=low_var_kl (k3, as mhpo)
    advantage.estimator                algorithm.adv_estimator=grpo; dr_grpo: norm_adv_by_std_in_grpo=False
    rollout.prompts_per_step           data.train_batch_size (prompts)
    rollout.group_size                 R.n
    update.num_minibatches             A.ppo_mini_batch_size = prompts_per_step / num_minibatches (prompts;
                                       verl multiplies by R.n)
    update.epochs                      A.ppo_epochs
    update.micro_batch_size            A.ppo_micro_batch_size_per_gpu (default: a whole mini-batch's rows)
    update.micro_batch_tokens          A.use_dynamic_bsz=True, A.ppo_max_token_len_per_gpu (verl counts each
                                       row's prompt and response; mhpo each distinct prompt once: a note)
    update.max_grad_norm               A.grad_clip
    optim.lr / betas / weight_decay    A.optim.lr / betas / weight_decay
    optim.warmup_steps, schedule       A.optim.lr_warmup_steps (x k), lr_scheduler_type constant | cosine,
                                       min_lr_ratio
    rollout.max_new_tokens             data.max_response_length
    rollout.temperature / top_p / k    R.temperature / top_p / top_k (0 -> -1, verl's "off")
    train.steps                        trainer.total_training_steps
    seed                               A.data_loader_seed, data.seed

Model, data and hardware (paths, GPUs, nodes, tensor parallelism) are the user's: verl reads parquet
files and Hugging Face checkpoints, not mhpo's tasks or built-in models. What has no verl equivalent
comes back as a note (printed to stderr by the CLI), never as a silently wrong override.
"""

from __future__ import annotations

from mhpo.errors import UsageError
from mhpo.objectives import get_objective
from mhpo.trainer.config import Config
from mhpo.trainer.defaults import resolved_for_display

A = "actor_rollout_ref.actor"
R = "actor_rollout_ref.rollout"
LOSS_CONFIG = "mhpo.integrations.verl.MHPOPolicyLossConfig"
VERL_SCHEDULES = {"constant": "constant", "cosine": "cosine"}  # verl's FSDP optimizer has no linear decay


def hydra_value(value) -> str:
    """A Python value as Hydra's override grammar reads it: 1e-06, True, [0.9,0.999], {c:1.5}."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, float) else str(value)


def verl_overrides(cfg: Config) -> tuple[list[str], list[str]]:
    """(overrides, notes) for ``cfg`` (see the module docstring); UsageError when verl cannot hold the
    batch shape (prompts_per_step not divisible by update.num_minibatches)."""
    cfg = resolved_for_display(cfg)
    o, r, u, opt = cfg.objective, cfg.rollout, cfg.update, cfg.optim
    try:
        get_objective(o.name).resolve(o.hparams)  # the plug-in validates again when verl builds its config
    except (KeyError, ValueError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    if r.prompts_per_step % u.num_minibatches:
        raise UsageError(
            f"rollout.prompts_per_step={r.prompts_per_step} is not divisible by update.num_minibatches="
            f"{u.num_minibatches}: verl's mini-batches are whole prompts (ppo_mini_batch_size)"
        )
    mini = r.prompts_per_step // u.num_minibatches  # prompts per mini-batch
    per_rl_step = u.num_minibatches * u.epochs  # optimizer steps
    out = [
        f"{A}.policy_loss.loss_mode=mhpo.{o.name}",
        f"{A}.policy_loss._target_={LOSS_CONFIG}",
        f"+{A}.policy_loss.mhpo_hparams={hydra_value(dict(o.hparams))}",  # the rest: the objective's defaults
        f"{A}.loss_agg_mode={o.agg}",
        f"{A}.use_kl_loss={o.beta > 0}",
        f"{A}.kl_loss_coef={hydra_value(float(o.beta))}",
        f"{A}.kl_loss_type=low_var_kl",
        "algorithm.adv_estimator=grpo",
        f"algorithm.norm_adv_by_std_in_grpo={cfg.advantage.estimator == 'grpo'}",
        "algorithm.use_kl_in_reward=False",
        f"data.train_batch_size={r.prompts_per_step}",
        f"{R}.n={r.group_size}",
        f"{A}.ppo_mini_batch_size={mini}",
        f"{A}.ppo_epochs={u.epochs}",
        f"{A}.ppo_micro_batch_size_per_gpu={u.micro_batch_size or mini * r.group_size}",
        f"{A}.grad_clip={hydra_value(float(u.max_grad_norm))}",
        f"{A}.optim.lr={hydra_value(float(opt.lr))}",
        f"{A}.optim.betas={hydra_value([float(opt.beta1), float(opt.beta2)])}",
        f"{A}.optim.weight_decay={hydra_value(float(opt.weight_decay))}",
        f"{A}.optim.lr_warmup_steps={opt.warmup_steps * per_rl_step}",
        f"{A}.optim.lr_scheduler_type={VERL_SCHEDULES.get(opt.schedule, 'constant')}",
        f"{A}.optim.min_lr_ratio={hydra_value(float(opt.min_lr_ratio))}",
        f"{R}.temperature={hydra_value(float(r.temperature))}",
        f"{R}.top_p={hydra_value(float(r.top_p))}",
        f"{R}.top_k={r.top_k or -1}",
        f"trainer.total_training_steps={cfg.train.steps}",
        f"{A}.data_loader_seed={cfg.seed}",
        f"data.seed={cfg.seed}",
    ]
    if r.max_new_tokens is not None:
        out.append(f"data.max_response_length={r.max_new_tokens}")
    if u.micro_batch_tokens is not None:
        out += [f"{A}.use_dynamic_bsz=True", f"{A}.ppo_max_token_len_per_gpu={u.micro_batch_tokens}"]
    return out, _notes(cfg)


def _notes(cfg: Config) -> list[str]:
    """What the overrides do not carry over (one line each, naming the mhpo key)."""
    r, a, opt = cfg.rollout, cfg.advantage, cfg.optim
    notes = [
        f"model.name_or_path={cfg.model.name_or_path!r} and task.name={cfg.task.name!r} are not carried over: "
        "give actor_rollout_ref.model.path (a Hugging Face checkpoint) and data.train_files (verl's parquet "
        "format) yourself",
        f"advantage.eps={a.eps:g} is mhpo's std floor; verl's GRPO uses its own constant (1e-6)",
    ]
    if opt.schedule not in VERL_SCHEDULES:
        notes.append(f"optim.schedule={opt.schedule!r} has no verl equivalent; lr_scheduler_type=constant instead")
    if opt.eps != 1e-8:
        notes.append(f"optim.eps={opt.eps:g} is not carried over (verl's AdamW uses torch's default, 1e-8)")
    if a.drop_zero_std:
        notes.append("advantage.drop_zero_std=true is not carried over (verl: DAPO's filter_groups recipe)")
    if r.staleness:
        notes.append(f"rollout.staleness={r.staleness} is not carried over (verl: its fully async trainer recipe)")
    if r.behaviour_logprobs == "sampler" or r.precision != "same":
        notes.append(
            "rollout.behaviour_logprobs / rollout.precision are not carried over: verl recomputes the old "
            "log-probs with the actor; its rollout importance-sampling correction (algorithm.rollout_is*) is the "
            "knob for the sampler mismatch"
        )
    if cfg.update.minibatch_order != "rows":
        notes.append(
            f"update.minibatch_order={cfg.update.minibatch_order} is not carried over: verl orders the rows of its "
            "mini-batches itself (trainer.balance_batch, actor.shuffle)"
        )
    if cfg.update.micro_batch_tokens is not None:
        notes.append(
            f"update.micro_batch_tokens={cfg.update.micro_batch_tokens} -> ppo_max_token_len_per_gpu: verl counts "
            "every row's prompt tokens, mhpo each distinct prompt once per micro-batch (verl's micro-batches hold "
            "fewer rows at the same number)"
        )
    if cfg.update.micro_batch_size is None:
        notes.append(
            "ppo_micro_batch_size_per_gpu is a whole mini-batch's rows (update.micro_batch_size unset): lower it "
            "to fit GPU memory (it does not change the update)"
        )
    return notes
