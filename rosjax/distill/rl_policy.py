"""Baseline IV: reinforced multi-teacher selection (Yuan et al., AAAI 2021), as pure functions.

An agent decides, for every training example and every teacher, whether that teacher's soft
label is used to distil the student on that example.  The functions here are the building
blocks of one stage-2 training step; the distillation loop composes them:

    feats   = state_features(embedding, teacher_logits, labels, tau=, multilabel=)  # [K, B, F]
    probs   = selection_probs(policy_state.params, feats)                           # [K, B]
    actions = sample_actions(key, probs)                                            # [K, B] bool
    loss, aux = rl_kd_loss(student_logits, teacher_logits, labels, actions, ...)    # student
    ...update the student, run it again on the batch...
    rewards = student_reward(student_logits_after, labels, multilabel=)             # [] or [B]
    policy_state, metrics = policy_step(policy_state, feats, actions, rewards, tx)

Stage 1 (equal weights, baseline III's recipe) is `rl_kd_loss` with all actions True: every
example then averages the KD term over all K teachers.

What follows Yuan et al. (their method text was not retrievable here; this rests on a
third-party summary, the THUDM GKD reimplementation and recollection; the README's
"Baseline IV" section):
  * a binary select/skip action per (example, teacher), a_kb ~ Bernoulli(pi(s_kb));
  * a logistic policy pi(select | s) = sigmoid(theta . s + b);
  * a state made of an instance embedding, the teacher's probability vector and the teacher's
    loss against the training label;
  * a student loss made of the hard-label loss and the KD terms of the selected teachers;
  * reward = minus the student's hard-label loss after its update on the batch, one value
    shared by every action of the batch (Yuan's first reward; GKD's default);
  * REINFORCE, i.e. ascent on r * grad log pi(a | s);
  * two stages: the student is first trained with all teachers weighted equally, then
    episodes (one epoch each) train the student and the agent together.

What is ours:
  * the embedding is the pooled pre-logit feature vector of one fixed teacher (images have no
    [CLS] token), L2-normalised so that its size does not swamp the other features;
  * the probability vector is softened with the distillation temperature (softmax, or
    per-label sigmoid for the multi-label task); the teacher's loss is at temperature 1
    (CE, or BCE summed over labels, as `losses.supervised_per_example`);
  * a one-hot of the teacher index is appended to the state, so one shared linear policy can
    prefer some teachers (GKD gets the same effect with one output unit per teacher);
  * the KD term of an example is the mean over its selected teachers (GKD divides by K
    instead); an example with no teacher selected keeps only its hard-label term (1 - alpha) * CE,
    the weight CE has in every other example, so dropping teachers never raises the CE weight
    (a pure-CE fallback would weigh it 1 / (1 - alpha) times more, 10x at alpha = 0.9, and pay
    the agent for dropping teachers);
  * log pi in the policy gradient (GKD differentiates pi itself, which is not REINFORCE) and a
    moving-average reward baseline (an addition to Yuan et al.), initialised with the first
    reward so the first update is not biased by a zero baseline;
  * the REINFORCE objective sums over teachers and averages over examples;
  * the agent is updated every batch, right after the student (on-policy: the actions were
    drawn by the current parameters), with any optax optimiser; Yuan et al. update at the end
    of an episode from stored (state, action, reward) tuples.  An episode is one epoch; since
    the agent learns per batch, episodes matter only as the schedule's unit;
  * optionally a per-example reward (`student_reward(..., per_example=True)`).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rosjax.losses import kd_divergence, supervised_per_example


def num_state_features(embed_dim: int, num_classes: int, num_teachers: int) -> int:
    """Length F of a state vector: embedding D + probabilities C + teacher loss 1 + one-hot K."""
    return embed_dim + num_classes + 1 + num_teachers


def state_features(embedding, teacher_logits, labels, *, tau, multilabel):
    """Per (teacher, example) state vectors, detached from every gradient.

    Args:
      embedding: [B, D] pooled pre-logit features of the fixed "semantic" teacher.
      teacher_logits: [K, B, C] logits of the K frozen teachers.
      labels: int [B] or float multi-hot [B, C] (the noisy training labels).
      tau: distillation temperature used to soften the teachers' outputs.
      multilabel: task flag (sigmoid per label instead of softmax).
    Returns:
      [K, B, F] float32 with F = num_state_features(D, C, K), each row
      concat[embedding / ||embedding||, softened probs, teacher loss, one-hot(k)].
    """
    emb = jax.lax.stop_gradient(jnp.asarray(embedding, jnp.float32))  # [B, D]
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))  # [K, B, C]
    if emb.ndim != 2 or t.ndim != 3 or t.shape[1] != emb.shape[0]:
        raise ValueError(f"state_features: need embedding [B, D] and teacher_logits [K, B, C] with "
                         f"the same B, got {emb.shape} and {t.shape}")
    num_teachers, batch, _ = t.shape
    emb = emb / (jnp.linalg.norm(emb, axis=-1, keepdims=True) + 1e-12)  # [B, D]
    probs = jax.nn.sigmoid(t / tau) if multilabel else jax.nn.softmax(t / tau, axis=-1)  # [K,B,C]
    teacher_loss = jax.vmap(
        lambda z: supervised_per_example(z, labels, multilabel=multilabel))(t)  # [K, B]
    onehot = jnp.broadcast_to(jnp.eye(num_teachers, dtype=jnp.float32)[:, None, :],
                              (num_teachers, batch, num_teachers))  # [K, B, K]
    emb = jnp.broadcast_to(emb[None], (num_teachers,) + emb.shape)  # [K, B, D]
    return jnp.concatenate([emb, probs, teacher_loss[..., None], onehot], axis=-1)  # [K, B, F]


def init_policy(key, feature_dim: int, *, init_scale: float = 0.01):
    """Logistic-policy parameters {'w': [F], 'b': []}; small weights, zero bias (pi ~ 0.5)."""
    return {"w": init_scale * jax.random.normal(key, (feature_dim,), jnp.float32),
            "b": jnp.zeros((), jnp.float32)}


def selection_logits(params, features):
    """theta . s + b for every state: [..., F] -> [...]."""
    if features.shape[-1] != params["w"].shape[0]:
        raise ValueError(f"selection_logits: features have {features.shape[-1]} entries, the "
                         f"policy expects {params['w'].shape[0]}")
    return features @ params["w"] + params["b"]


def selection_probs(params, features):
    """pi(select | s) = sigmoid(theta . s + b): [K, B, F] -> [K, B]."""
    return jax.nn.sigmoid(selection_logits(params, features))


def sample_actions(key, probs):
    """Bernoulli select (True) / skip (False) actions, one per (teacher, example): [K, B] bool."""
    return jax.random.bernoulli(key, probs)


def select_weights(actions):
    """KD weights [K, B]: 1 / n_selected(example) for selected teachers, 0 otherwise.

    An example with no teacher selected gets an all-zero column.
    """
    a = jnp.asarray(actions, jnp.float32)  # [K, B]
    return a / jnp.maximum(jnp.sum(a, axis=0, keepdims=True), 1.0)


def rl_kd_loss(student_logits, teacher_logits, labels, actions, *, tau, alpha, multilabel,
               class_weights=None):
    """Student loss under a teacher selection, mean over the batch.

    Per example b with selected set S_b (n_b = |S_b|):
      n_b > 0:  alpha * (1/n_b) sum_{k in S_b} tau^2 KL(q_k || p) + (1 - alpha) * CE
      n_b = 0:  (1 - alpha) * CE        (the hard-label term alone, at its usual weight)
    where CE is softmax cross-entropy (one-label) or BCE summed over labels (multi-label).

    Args:
      student_logits: [B, C].
      teacher_logits: [K, B, C]; constants (no gradient).
      labels: int [B] or float multi-hot [B, C].
      actions: [K, B] bool, True = teacher k is used for example b.
      tau, alpha: temperature and KD weight (as in `losses.kd_loss`).
      multilabel: task flag.
      class_weights: optional [C] weights of the CE term (`losses.supervised_per_example`).
    Returns:
      (loss scalar, aux) with aux = {'ce': mean CE, 'kd': mean over examples of the selected-
      teacher KD average (0 for examples with none), 'selected_frac': fraction of (teacher,
      example) pairs selected, 'none_frac': fraction of examples with no teacher selected}.
    """
    s = jnp.asarray(student_logits, jnp.float32)  # [B, C]
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))  # [K, B, C]
    actions = jnp.asarray(actions, bool)  # [K, B]
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"rl_kd_loss: alpha must be in [0, 1], got {alpha}")
    if t.ndim != 3 or t.shape[1:] != s.shape or actions.shape != t.shape[:2]:
        raise ValueError(f"rl_kd_loss: need student [B, C], teacher [K, B, C] and actions [K, B], "
                         f"got {s.shape}, {t.shape} and {actions.shape}")
    kl = jax.vmap(lambda z: kd_divergence(s, z, tau=tau, multilabel=multilabel))(t)  # [K, B]
    kd = jnp.sum(select_weights(actions) * kl, axis=0)  # [B]
    ce = supervised_per_example(s, labels, multilabel=multilabel, class_weights=class_weights)  # [B]
    any_selected = jnp.any(actions, axis=0)  # [B]
    per_example = alpha * kd + (1.0 - alpha) * ce  # [B]; kd is 0 where no teacher is selected
    aux = {"ce": jnp.mean(ce), "kd": jnp.mean(kd),
           "selected_frac": jnp.mean(jnp.asarray(actions, jnp.float32)),
           "none_frac": 1.0 - jnp.mean(any_selected.astype(jnp.float32))}
    return jnp.mean(per_example), aux


def student_reward(student_logits, labels, *, multilabel, per_example=False):
    """Reward = minus the student's hard-label loss (call it with the logits after the update).

    per_example=False gives the batch mean, one reward shared by all actions (Yuan et al.);
    per_example=True gives one reward per example [B] (our option, sharper credit assignment).
    """
    loss = supervised_per_example(student_logits, labels, multilabel=multilabel)  # [B]
    return jax.lax.stop_gradient(-loss if per_example else -jnp.mean(loss))


def log_probs(params, features, actions):
    """log pi(a | s) of the logistic policy for every state: [K, B]."""
    z = selection_logits(params, features)  # [K, B]
    a = jnp.asarray(actions, jnp.float32)
    return a * jax.nn.log_sigmoid(z) + (1.0 - a) * jax.nn.log_sigmoid(-z)


def reinforce_loss(params, features, actions, advantages):
    """REINFORCE surrogate -mean_b sum_k A_kb log pi(a_kb | s_kb) (minimise it).

    Args:
      params: policy parameters.
      features: [K, B, F] states.
      actions: [K, B] bool, the sampled actions.
      advantages: reward minus baseline; [] (one per batch), [B] (per example) or [K, B].
    Returns:
      scalar.  Its gradient is -mean_b sum_k A_kb (a_kb - pi_kb) s_kb for w (s_kb -> 1 for b).
    """
    adv = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32)),
                           actions.shape)  # [K, B]
    return -jnp.mean(jnp.sum(adv * log_probs(params, features, actions), axis=0))


def policy_gradient(params, features, actions, advantages):
    """(reinforce_loss, its gradient w.r.t. the policy parameters)."""
    return jax.value_and_grad(reinforce_loss)(params, features, actions, advantages)


def update_baseline(baseline, reward, decay):
    """Moving-average reward baseline: decay * baseline + (1 - decay) * mean(reward)."""
    return decay * baseline + (1.0 - decay) * jnp.mean(reward)


class PolicyState(flax.struct.PyTreeNode):
    """Agent state, a pytree of arrays only (checkpointable next to the student's state).

    Attributes:
      params: {'w': [F], 'b': []} logistic-policy parameters.
      opt_state: the optax optimiser state of `params`.
      baseline: [] moving average of the reward.
      step: [] int32 number of agent updates so far.
    """
    params: dict
    opt_state: optax.OptState
    baseline: jax.Array
    step: jax.Array


def init_policy_state(key, feature_dim: int, tx: optax.GradientTransformation,
                      *, init_scale: float = 0.01) -> PolicyState:
    """Fresh agent: small random policy, optimiser state of `tx`, baseline 0, step 0."""
    params = init_policy(key, feature_dim, init_scale=init_scale)
    return PolicyState(params=params, opt_state=tx.init(params),
                       baseline=jnp.zeros((), jnp.float32), step=jnp.zeros((), jnp.int32))


def policy_step(policy_state: PolicyState, features, actions, rewards,
                tx: optax.GradientTransformation, *, baseline_decay: float = 0.9):
    """One REINFORCE update of the agent; pure, jit it with `tx` bound (functools.partial).

    The advantage is rewards - baseline, with the baseline as it stood before this batch (at the
    very first step the batch's own mean reward, so that step's advantage is centred); then the
    baseline takes in this batch's mean reward.

    Args:
      policy_state: current agent.
      features: [K, B, F] states the actions were drawn in.
      actions: [K, B] bool actions drawn from the current policy.
      rewards: [] (one per batch) or [B] (one per example).
      tx: the optax optimiser the state was initialised with.
      baseline_decay: moving-average decay in [0, 1).
    Returns:
      (new PolicyState, metrics) with scalar metrics 'policy_loss', 'reward', 'baseline',
      'advantage', 'select_prob' and 'select_prob/t{k}' (mean pi per teacher k).
    """
    if isinstance(baseline_decay, (int, float)) and not 0.0 <= baseline_decay < 1.0:
        raise ValueError(f"policy_step: baseline_decay must be in [0, 1), got {baseline_decay}")
    rewards = jnp.asarray(rewards, jnp.float32)
    mean_reward = jnp.mean(rewards)
    baseline = jnp.where(policy_state.step == 0, mean_reward, policy_state.baseline)
    advantages = rewards - baseline
    loss, grads = policy_gradient(policy_state.params, features, actions, advantages)
    updates, opt_state = tx.update(grads, policy_state.opt_state, policy_state.params)
    params = optax.apply_updates(policy_state.params, updates)
    new_state = PolicyState(params=params, opt_state=opt_state,
                            baseline=update_baseline(baseline, rewards, baseline_decay),
                            step=policy_state.step + 1)
    probs = selection_probs(policy_state.params, features)  # [K, B]
    metrics = {"policy_loss": loss, "reward": mean_reward, "baseline": baseline,
               "advantage": jnp.mean(advantages), "select_prob": jnp.mean(probs)}
    for k in range(probs.shape[0]):
        metrics[f"select_prob/t{k}"] = jnp.mean(probs[k])
    return new_state, metrics
