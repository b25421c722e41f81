"""Training baseline IV: a student distilled under reinforced teacher selection (Yuan et al. 2021).

The schedule follows Yuan et al.'s description (the README's "Baseline IV" section lists the sources):

  stage 1, epochs [0, equal_epochs): every teacher is used for every example with equal
      weight, i.e. baseline III's recipe (`rl_policy.rl_kd_loss` with all actions True); the
      agent is not updated.
  stage 2, the remaining epochs, one episode each: per batch the agent picks a subset of
      teachers for every example, the student takes one SGD step on the selected teachers'
      KD terms plus the hard-label loss, and the agent takes one REINFORCE step with the
      reward = minus the hard-label loss of the *updated* student on the same batch.
      Log-probabilities and a moving-average reward baseline are used (the baseline is our
      addition to Yuan et al.; see `rl_policy` for every design choice).

Everything happens in one jitted step, `rl_distill_step(state, teachers, batch, run_key)`:
the phase is chosen inside it from `state.step` (one compile; a resumed run is exact), and the
state is an `RLTrainState`: the student's `TrainState` with the agent's `PolicyState` as one
more field, so `rosjax.train.loop.fit` donates, checkpoints and restores both together: a run
stopped in the middle of an episode continues that episode with the same policy, optimiser
moments and reward baseline.

Cost per stage-2 step, against baseline III / RoS-KD (same teachers, same student step):
  * one extra forward pass of the student in inference mode (the reward), about a third of a
    student training step's compute; in stage 1 it is skipped (`lax.cond`);
  * the state features need the pooled features of one teacher, which come out of the same
    forward pass as its logits (`return_features=True`): no extra teacher pass;
  * the agent itself (a logistic regression over [K, B, F] features) is negligible.
Teachers always run online here (the agent's state needs a teacher's features, which cached
logits do not hold).

`train_rl_student` mirrors `rosjax.distill.trainer.train_student` and exports, under
`<workdir>/final/`:
  student/   the student after the last epoch (never picked on validation)
  policy/    the agent's parameters {'w': [F], 'b': []} after the last epoch
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rosjax import checkpoint
from rosjax.config import DistillConfig, OptimConfig
from rosjax.data import device_augment
from rosjax.distill import rl_policy
from rosjax.train import loop, parallel
from rosjax.train import steps as train_steps
from rosjax.train.start import FINAL_DIR, start_run
from rosjax.train.state import TrainState

log = logging.getLogger(__name__)

# Agent metrics of a stage-2 step; stage 1 reports them as zeros (baseline: its current value).
_AGENT_METRICS = ("policy_loss", "reward", "baseline", "advantage")


class RLTrainState(TrainState):
    """The student's TrainState with the agent's PolicyState beside it, donated and checkpointed
    together: `fit`, the evaluator and the export read it as the student's state (`step` is the
    student's update count), and the step reads and replaces `policy`."""
    policy: rl_policy.PolicyState

    @classmethod
    def create(cls, student: TrainState, policy: rl_policy.PolicyState) -> RLTrainState:
        """`student`'s fields (arrays and static apply_fn, tx) and `policy`."""
        return cls(**{f.name: getattr(student, f.name) for f in dataclasses.fields(student)}, policy=policy)


@dataclasses.dataclass(frozen=True)
class RLStudentResult:
    variables: dict[str, Any]        # the student after the last epoch
    policy: rl_policy.PolicyState    # the agent after the last epoch
    fit: loop.FitResult


def teacher_outputs(apply_fns: Sequence[Callable], teachers: Sequence[Any], images: jax.Array,
                    embedding_teacher: int) -> tuple[jax.Array, jax.Array]:
    """Frozen teachers in eval mode: logits [K, B, C] and teacher `embedding_teacher`'s
    pooled features [B, D] (from the same forward pass as its logits)."""
    logits, embedding = [], None
    for k, (apply, variables) in enumerate(zip(apply_fns, teachers)):
        if k == embedding_teacher:
            z, embedding = apply(variables, images, train=False, return_features=True)
        else:
            z = apply(variables, images, train=False)
        logits.append(z)
    return (jax.lax.stop_gradient(jnp.stack(logits).astype(jnp.float32)),
            jax.lax.stop_gradient(embedding.astype(jnp.float32)))


def _teacher_index(index: int, num_teachers: int) -> int:
    if not -num_teachers <= index < num_teachers:
        raise ValueError(f"--distill.rl_embedding_teacher={index} is not a teacher index for "
                         f"{num_teachers} teachers")
    return index % num_teachers


def make_rl_distill_step(teacher_apply_fns: Sequence[Callable], *, tau: float, alpha: float,
                         multilabel: bool, equal_steps: int,
                         policy_tx: optax.GradientTransformation, baseline_decay: float,
                         embedding_teacher: int, per_example_reward: bool,
                         class_weights=None) -> Callable:
    """Builds `rl_distill_step(state, teachers, batch, run_key) -> (state, metrics)`.

    Compile it with `parallel.jit_train_step(step, mesh, frozen=teachers)` (the RLTrainState
    is donated, the teachers are not).

    Args:
      teacher_apply_fns: each teacher's `module.apply` (static).
      tau, alpha: temperature and KD weight (as baseline III).
      multilabel: task flag.
      equal_steps: student updates of stage 1 (equal_epochs * steps_per_epoch); from step
        `equal_steps` on the agent selects teachers and learns.
      policy_tx: the agent's optimiser (the one its PolicyState was initialised with).
      baseline_decay: moving-average decay of the reward baseline.
      embedding_teacher: which teacher's pooled features form the instance embedding (an
        index into the teachers; negative counts from the end).
      per_example_reward: reward per example instead of per batch.
      class_weights: optional host array [C] weighting the student's CE term (not the reward).
    The step's key is `fold_in(run_key, state.step)`, split into a dropout key and an action
    key (baseline III's split, so stage 1 draws the same dropout masks as baseline III).
    Metrics: loss, kd, ce, accuracy, grad_norm, selected_frac, none_frac, rl_phase (0/1),
    select_prob and select_prob/t{k} (the policy's mean selection probability, also reported
    while stage 1 ignores it), policy_loss, reward, baseline, advantage (0 in stage 1).
    """
    num_teachers = len(teacher_apply_fns)
    if num_teachers < 1:
        raise ValueError("make_rl_distill_step needs at least one teacher")
    embedding_teacher = _teacher_index(embedding_teacher, num_teachers)

    def rl_distill_step(state: RLTrainState, teachers: Sequence[Any], batch: dict[str, jax.Array],
                        run_key: jax.Array) -> tuple[RLTrainState, dict[str, jax.Array]]:
        policy = state.policy
        dropout_key, action_key = jax.random.split(train_steps.step_rng(run_key, state.step))
        batch = device_augment.render(batch)  # a shipped batch's views, rendered in the step
        images, labels = batch["image"], batch["label"]
        t_logits, embedding = teacher_outputs(teacher_apply_fns, teachers, images,
                                              embedding_teacher)  # [K, B, C], [B, D]
        feats = rl_policy.state_features(embedding, t_logits, labels, tau=tau,
                                         multilabel=multilabel)  # [K, B, F]
        probs = rl_policy.selection_probs(policy.params, feats)  # [K, B]
        rl_phase = state.step >= equal_steps  # []
        sampled = rl_policy.sample_actions(action_key, probs)  # [K, B]
        actions = jnp.logical_or(sampled, jnp.logical_not(rl_phase))  # stage 1: all True

        def loss_fn(params):
            logits, batch_stats = train_steps.forward_train(state, params, images, dropout_key)
            loss, aux = rl_policy.rl_kd_loss(logits, t_logits, labels, actions, tau=tau,
                                             alpha=alpha, multilabel=multilabel,
                                             class_weights=class_weights)
            return loss, (logits, batch_stats, aux)

        (loss, (logits, batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        new_student = train_steps.apply_gradients(state, grads, batch_stats)  # the policy unchanged

        def agent_update(policy):
            # The reward needs a second student forward pass, after the update, in eval mode.
            after = new_student.apply_fn(new_student.variables, images, train=False)  # [B, C]
            rewards = rl_policy.student_reward(after, labels, multilabel=multilabel,
                                               per_example=per_example_reward)  # [] or [B]
            new_policy, m = rl_policy.policy_step(policy, feats, sampled, rewards, policy_tx,
                                                  baseline_decay=baseline_decay)
            return new_policy, {k: m[k] for k in _AGENT_METRICS}

        def no_update(policy):
            zero = jnp.zeros((), jnp.float32)
            return policy, {"policy_loss": zero, "reward": zero, "baseline": policy.baseline,
                            "advantage": zero}

        new_policy, agent_metrics = jax.lax.cond(rl_phase, agent_update, no_update, policy)
        metrics = {"loss": loss, "kd": aux["kd"], "ce": aux["ce"],
                   "accuracy": train_steps.accuracy(logits, labels, multilabel=multilabel),
                   "grad_norm": optax.tree.norm(grads),
                   "selected_frac": aux["selected_frac"], "none_frac": aux["none_frac"],
                   "rl_phase": rl_phase.astype(jnp.float32), "select_prob": jnp.mean(probs),
                   **agent_metrics}
        for k in range(num_teachers):
            metrics[f"select_prob/t{k}"] = jnp.mean(probs[k])
        return new_student.replace(policy=new_policy), metrics

    return rl_distill_step


def state_feature_dim(embedding_apply: Callable, embedding_variables: Any,
                      image_shape: tuple[int, int, int], num_teachers: int) -> int:
    """F of the agent's state, from the embedding teacher's output shapes (no computation)."""
    logits, features = jax.eval_shape(
        lambda v: embedding_apply(v, jnp.zeros((1, *image_shape), jnp.float32), train=False,
                                  return_features=True), embedding_variables)
    return rl_policy.num_state_features(features.shape[-1], logits.shape[-1], num_teachers)


def train_rl_student(model: nn.Module, teachers: Sequence[tuple[Callable, Any]],
                     make_train_iter: Callable[[], Iterator],
                     evaluate: Callable[[Any, dict], dict] | None,
                     workdir: str | os.PathLike, *, optim_cfg: OptimConfig, steps_per_epoch: int,
                     image_shape: tuple[int, int, int], multilabel: bool,
                     distill: DistillConfig, seed: int = 0,
                     loop_cfg: loop.LoopConfig = loop.LoopConfig(),
                     mesh: jax.sharding.Mesh | None = None, compile_only: bool = False,
                     class_weights=None, load_weights: Callable[[dict], dict] | None = None) -> RLStudentResult | None:
    """Trains baseline IV's student and exports it (and the agent) to `<workdir>/final`.

    Args:
      model: the student module.
      teachers: (apply_fn, variables) per teacher, frozen; at least one.
      make_train_iter: returns a fresh endless, checkpointable iterator of training batches.
      evaluate: `evaluate(state, extras) -> dict` at each epoch end (logged, not used to
        select); `state` is the RLTrainState, which `validation.make_evaluator` takes as is.
      workdir: this setting's folder (ckpt/, metrics.jsonl, final/).
      optim_cfg, steps_per_epoch, image_shape, multilabel, seed, loop_cfg, mesh: as in
        `rosjax.distill.trainer.train_student` (same seed and data: the same student
        initialisation, and in stage 1 the same keys, batches and loss as baseline III, so
        the same trajectory up to float rounding).
      distill: the --distill.* section: temperature and KD weight (stage 1 is baseline III's
        equal weighting, so the teacher-weight draw options do not apply), and the agent's
        --distill.rl_* options: length of stage 1, Adam learning rate, reward-baseline decay,
        the embedding teacher (an index; -1 the last, DenseNet-121 in the paper's teacher
        order, which is still distilled from like the others; images have no [CLS] token) and
        per-example rewards. Checked at start-up by `rosjax.experiment.validate`.
      compile_only: only compile the step (`parallel.compile_step`, for compiling ahead) and return None.
      class_weights: optional host array [C] weighting the student's CE term (None: unweighted).
      load_weights: the student's starting weights (`rosjax.train.start.start_run`), e.g. ImageNet ones.
    """
    if not teachers:
        raise ValueError("baseline IV needs at least one teacher")
    embedding_teacher = _teacher_index(distill.rl_embedding_teacher, len(teachers))
    if distill.rl_equal_epochs >= optim_cfg.epochs:
        log.warning("baseline IV: --distill.rl_equal_epochs=%d >= --optim.epochs=%d, the agent "
                    "never acts and this run is baseline III", distill.rl_equal_epochs, optim_cfg.epochs)
    run = start_run(model, optim_cfg=optim_cfg, steps_per_epoch=steps_per_epoch, image_shape=image_shape,
                    seed=seed, mesh=mesh, load_weights=load_weights)
    mesh, student, init_key, run_key, schedule = run.mesh, run.state, run.init_key, run.run_key, run.schedule

    apply_fns = tuple(apply for apply, _ in teachers)
    frozen = jax.device_put(tuple(v for _, v in teachers), parallel.replicated(mesh))
    policy_tx = optax.adam(distill.rl_learning_rate)
    feature_dim = state_feature_dim(apply_fns[embedding_teacher], frozen[embedding_teacher],
                                    image_shape, len(teachers))
    policy = jax.device_put(
        rl_policy.init_policy_state(jax.random.fold_in(init_key, 1), feature_dim, policy_tx),
        parallel.replicated(mesh))
    state = RLTrainState.create(student, policy)
    step = make_rl_distill_step(apply_fns, tau=distill.tau, alpha=distill.alpha, multilabel=multilabel,
                                equal_steps=distill.rl_equal_epochs * steps_per_epoch, policy_tx=policy_tx,
                                baseline_decay=distill.rl_baseline_decay,
                                embedding_teacher=embedding_teacher,
                                per_example_reward=distill.rl_per_example_reward,
                                class_weights=class_weights)
    step_fn = parallel.jit_train_step(step, mesh, frozen=frozen)
    if compile_only:
        parallel.compile_step(step_fn, state, next(make_train_iter()), run_key, mesh)
        return None
    result = loop.fit(state, step_fn, make_train_iter(),
                      run_key=run_key, num_epochs=optim_cfg.epochs,
                      steps_per_epoch=steps_per_epoch, workdir=workdir, mesh=mesh,
                      cfg=dataclasses.replace(loop_cfg, best_metric=None), evaluate=evaluate,
                      schedule=schedule)

    final = pathlib.Path(workdir) / FINAL_DIR
    variables = result.state.variables
    checkpoint.save_variables(final / "student", variables)
    checkpoint.save_variables(final / "policy", result.state.policy.params)
    return RLStudentResult(variables=variables, policy=result.state.policy, fit=result)
