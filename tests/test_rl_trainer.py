"""Tests for baseline IV's training (rosjax.distill.rl_trainer).

One straight run of 3 epochs (epoch 1: equal weights; epochs 2-3: the agent) with a resume
checkpoint after every step. Its recorded states are checked step by step against references
written here: stage 1 against baseline III's loss (hand-written KL, autodiff), stage 2 against
a hand-derived REINFORCE gradient with a moving-average baseline and the Adam update in numpy.
Then the run's schedule, exports and frozen teachers, and a run stopped in the middle of an
episode and resumed, which must end bit-identical to the straight run.

Tiny: `tiny_cnn`, 16-px RGB images, 2 teachers, 16 examples, global batch 8 (2 steps per
epoch), 4 fake CPU devices; three compiles of the training step in all.
"""
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rosjax import checkpoint, models
from rosjax.config import DistillConfig, OptimConfig
from rosjax.distill import rl_trainer
from rosjax.train import loop, parallel, validation

IMAGE, CHANNELS, CLASSES, TEACHERS = 16, 3, 3, 2
EXAMPLES, BATCH = 16, 8
STEPS_PER_EPOCH = EXAMPLES // BATCH
TAU, ALPHA, DECAY, POLICY_LR = 2.0, 0.7, 0.8, 0.05
DISTILL = DistillConfig(tau=TAU, alpha=ALPHA, rl_equal_epochs=1, rl_learning_rate=POLICY_LR, rl_baseline_decay=DECAY)
# Plain SGD for the student (no momentum, no weight decay): its update is -lr * gradient.
STUDENT_LR = 0.05
OPTIM = OptimConfig(epochs=3, batch_size=BATCH, learning_rate=STUDENT_LR, momentum=0.0,
                    weight_decay=0.0, milestones=(3,))
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults


MODEL = models.create("tiny_cnn", CLASSES)
# One compiled inference pass for every reference computation (eager op-by-op is slower).
_apply = jax.jit(MODEL.apply, static_argnames=("train", "return_features"))


def _data():
    """images [N, 16, 16, 3] in [0, 1] with the label in channel 0, labels [N] int32."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, EXAMPLES).astype(np.int32)
    images = rng.random((EXAMPLES, IMAGE, IMAGE, CHANNELS), dtype=np.float32)
    images[..., 0] = np.clip(images[..., 0] + 0.4 * labels[:, None, None], 0.0, 1.0)
    return images, labels


def _train_iter():
    """Endless, checkpointable grain iterator of {'image', 'label', 'index'} batches."""
    images, labels = _data()
    records = [{"image": images[i], "label": labels[i], "index": np.int32(i)}
               for i in range(EXAMPLES)]
    ds = (grain.MapDataset.source(records).seed(1).shuffle().repeat()
          .batch(BATCH, drop_remainder=True))
    return iter(ds.to_iter_dataset())


class _Interrupted(Exception):
    """Stands for a run stopped from outside."""


class _InterruptingIterator:
    """A train iterator that raises `_Interrupted` instead of yielding batch `stop_at` (0-based)."""

    def __init__(self, iterator, stop_at):
        self._iterator, self._stop_at, self._pulled = iterator, stop_at, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._pulled == self._stop_at:
            raise _Interrupted
        self._pulled += 1
        return next(self._iterator)

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state):
        self._iterator.set_state(state)


@pytest.fixture(scope="module")
def teachers():
    """Two differently initialised tiny CNNs, replicated on the mesh (as the experiment loads
    them), so a donation of the teachers would delete these very arrays."""
    x = jnp.zeros((1, IMAGE, IMAGE, CHANNELS))
    replicated = parallel.replicated(parallel.make_mesh())
    init = jax.jit(MODEL.init, static_argnames="train")
    return [(MODEL.apply, jax.device_put(init(jax.random.key(10 + k), x, train=False),
                                         replicated)) for k in range(TEACHERS)]


def _train(workdir, teachers, *, iterator=None, evaluator=None, distill=DISTILL):
    loop_cfg = loop.LoopConfig(log_every_steps=2, checkpoint_every_steps=1,
                               keep_checkpoints=3 * STEPS_PER_EPOCH, prefetch_batches=0,
                               progress=False)
    return rl_trainer.train_rl_student(
        models.create("tiny_cnn", CLASSES), teachers,
        lambda: iterator if iterator is not None else _train_iter(), evaluator, workdir,
        optim_cfg=OPTIM, steps_per_epoch=STEPS_PER_EPOCH, image_shape=(IMAGE, IMAGE, CHANNELS),
        multilabel=False, distill=distill,
        seed=3, loop_cfg=loop_cfg, mesh=parallel.make_mesh())


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teachers):
    """Three epochs in one go with the real evaluator; records (step, policy) at epoch ends."""
    eval_images, eval_labels = _data()
    eval_batch = {"image": eval_images[:BATCH], "label": eval_labels[:BATCH],
                  "mask": np.ones(BATCH, np.float32)}
    real = validation.make_evaluator(lambda: [eval_batch], mesh=parallel.make_mesh(),
                                   multilabel=False)
    seen = []

    def record(state, extras):
        seen.append(jax.device_get((state.step, state.policy)))
        return real(state, extras)

    before = jax.device_get([v for _, v in teachers])
    workdir = tmp_path_factory.mktemp("straight")
    result = _train(workdir, teachers, evaluator=record)
    return workdir, result, jax.device_get(result.fit.state), seen, before


@pytest.fixture(scope="module")
def checkpointed(straight):
    """{step: (state, run_key)} of the straight run's resume checkpoints 1-5, on the host."""
    workdir, result, *_ = straight
    ckpts = checkpoint.RunCheckpoints(workdir)
    try:
        out = {}
        for step in range(1, 6):
            restored = ckpts.restore(step,
                                     abstract_state=checkpoint.abstract_like(result.fit.state))
            out[step] = (jax.device_get(restored.state), restored.run_key)
        return out
    finally:
        ckpts.close()


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(logits, labels):
    """Per-example softmax cross-entropy [B]."""
    return -_log_softmax(logits)[np.arange(len(labels)), labels]


def _np_state(teachers, images, labels):
    """The agent's state [K, B, F]: the last teacher's L2-normalised pooled features,
    softmax(z_k / tau), CE_k against the label, one-hot(k)."""
    outputs = [_apply(v, images, train=False, return_features=True) for _, v in teachers]
    emb = np.asarray(outputs[-1][1], np.float64)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    rows = []
    for k, (z, _) in enumerate(outputs):
        onehot = np.broadcast_to(np.eye(TEACHERS)[k], (len(labels), TEACHERS))
        rows.append(np.concatenate([emb, np.exp(_log_softmax(np.asarray(z) / TAU)),
                                    _np_ce(z, labels)[:, None], onehot], axis=-1))
    return np.stack(rows)


@pytest.fixture(scope="module")
def host_batches():
    """The straight run's first five batches: batch s is the one of step s."""
    iterator = _train_iter()
    return [next(iterator) for _ in range(5)]


def test_stage_one_step_is_baseline_iii(checkpointed, teachers, host_batches):
    """Step 1 (stage 1): one SGD step on alpha * tau^2 * mean_k KL(q_k || p) + (1 - alpha) CE,
    written here with jax.nn.log_softmax and differentiated; the agent is left untouched."""
    before, after = checkpointed[1][0], checkpointed[2][0]
    batch = host_batches[1]
    images, labels = batch["image"], batch["label"]
    t_logp = jnp.stack([jax.nn.log_softmax(_apply(v, images, train=False) / TAU)
                        for _, v in teachers])  # [K, B, C]

    def baseline_iii_loss(params):
        logits, updates = MODEL.apply({"params": params, "batch_stats": before.batch_stats},
                                      images, train=True, mutable=["batch_stats"])
        s_logp = jax.nn.log_softmax(logits / TAU)  # [B, C]
        kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp[None]), axis=-1)  # [K, B]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        loss = jnp.mean(ALPHA * TAU ** 2 * jnp.mean(kl, axis=0) + (1 - ALPHA) * ce)
        return loss, updates["batch_stats"]

    grads, stats = jax.jit(jax.grad(baseline_iii_loss, has_aux=True))(before.params)
    want = jax.tree.map(lambda p, g: p - STUDENT_LR * g, before.params, grads)
    for got, ref in zip(jax.tree.leaves(after.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    for got, ref in zip(jax.tree.leaves(after.batch_stats), jax.tree.leaves(stats)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    for got, ref in zip(jax.tree.leaves(after.policy), jax.tree.leaves(before.policy)):
        np.testing.assert_array_equal(got, ref)
    assert int(after.policy.step) == 0 and int(after.step) == 2


def test_stage_two_steps_are_reinforce_with_a_moving_baseline(checkpointed, teachers,
                                                             host_batches):
    """Steps 2-4 (stage 2). Reward r_s = -mean CE of the student *after* step s, in eval mode.
    Step 2, the agent's first: the baseline starts at r_2, so the advantage and the update are
    zero. Steps 3, 4: advantage A = r_s - b_s; the REINFORCE gradient of
    -mean_b sum_k A log pi(a_kb | s_kb) is -mean_b sum_k A (a_kb - pi_kb) s_kb (s_kb -> 1 for
    the bias); Adam in numpy from the checkpointed moments; b_{s+1} = d b_s + (1 - d) r_s.
    The actions are redrawn from the documented key: split(fold_in(run_key, s))[1]."""
    states, batches = checkpointed, host_batches

    def reward(step):
        batch = batches[step]
        after = _apply(states[step + 1][0].variables, batch["image"], train=False)
        return -_np_ce(after, batch["label"]).mean()

    first, second = states[2][0].policy, states[3][0].policy
    np.testing.assert_allclose(float(second.baseline), reward(2), rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(second.params), jax.tree.leaves(first.params)):
        np.testing.assert_array_equal(got, ref)
    assert int(second.step) == 1

    for step in (3, 4):
        (before, run_key), (after, _) = states[step], states[step + 1]
        policy, images, labels = before.policy, batches[step]["image"], batches[step]["label"]
        r = reward(step)
        feats = _np_state(teachers, images, labels)  # [K, B, F]
        w, b = np.asarray(policy.params["w"], np.float64), float(policy.params["b"])
        probs = 1.0 / (1.0 + np.exp(-(feats @ w + b)))  # [K, B]
        action_key = jax.random.split(jax.random.fold_in(run_key, step))[1]
        actions = np.asarray(jax.random.bernoulli(action_key, probs.astype(np.float32)),
                             np.float64)
        coef = (r - float(policy.baseline)) * (actions - probs)  # [K, B]
        grads = {"w": -np.einsum("kb,kbf->f", coef, feats) / BATCH,
                 "b": -coef.sum() / BATCH}
        adam = policy.opt_state[0]
        count = int(adam.count) + 1
        for name, g in grads.items():
            m = ADAM_B1 * np.asarray(adam.mu[name], np.float64) + (1 - ADAM_B1) * g
            v = ADAM_B2 * np.asarray(adam.nu[name], np.float64) + (1 - ADAM_B2) * g ** 2
            m_hat, v_hat = m / (1 - ADAM_B1 ** count), v / (1 - ADAM_B2 ** count)
            want = np.asarray(policy.params[name], np.float64) - POLICY_LR * m_hat / (
                np.sqrt(v_hat) + ADAM_EPS)
            np.testing.assert_allclose(after.policy.params[name], want, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(after.policy.opt_state[0].mu[name], m, rtol=1e-4,
                                       atol=1e-9)
        assert np.abs(after.policy.params["w"] - w).max() > 1e-3  # the agent moved
        np.testing.assert_allclose(float(after.policy.baseline),
                                   DECAY * float(policy.baseline) + (1 - DECAY) * r, rtol=1e-5)
        assert int(after.policy.step) == step - 1


def test_run_switches_phase_trains_the_agent_and_exports(straight, teachers):
    workdir, result, final_state, seen, before = straight
    assert [int(s) for s, _ in seen] == [2, 4, 6]
    policies = [p for _, p in seen]
    assert [int(p.step) for p in policies] == [0, 2, 4]  # no agent update in stage 1
    assert int(policies[0].opt_state[0].count) == 0 and float(policies[0].baseline) == 0.0

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    stage1, *stage2 = [r["train"] for r in records]
    assert (stage1["rl_phase"], stage1["selected_frac"], stage1["reward"]) == (0.0, 1.0, 0.0)
    for train in stage2:
        assert train["rl_phase"] == 1.0 and 0.0 < train["selected_frac"] < 1.0
        assert train["reward"] < 0.0
    for r in records:
        assert all(0.0 < r["train"][f"select_prob/t{k}"] < 1.0 for k in range(TEACHERS))
        assert np.isfinite(r["val"]["loss"]) and 0.0 <= r["val"]["accuracy"] <= 1.0
        assert r["epoch_seconds"] > 0.0  # what the report's cost table sums

    exported = jax.device_get(checkpoint.load_variables(workdir / "final" / "student"))
    for got, ref in zip(jax.tree.leaves(exported), jax.tree.leaves(final_state.variables)):
        np.testing.assert_array_equal(got, ref)
    policy = jax.device_get(checkpoint.load_variables(workdir / "final" / "policy"))
    for got, ref in zip(jax.tree.leaves(policy), jax.tree.leaves(policies[2].params)):
        np.testing.assert_array_equal(got, ref)
    # The teachers are the caller's arrays, intact (not donated) and unchanged.
    for got, ref in zip(jax.tree.leaves(jax.device_get([v for _, v in teachers])),
                        jax.tree.leaves(before)):
        np.testing.assert_array_equal(got, ref)


def test_resume_in_the_middle_of_an_episode_is_exact(straight, teachers, tmp_path):
    # Stopped while fetching the batch of step 3 (the second step of episode 1); the last
    # checkpoint is the mid-epoch one taken after 3 steps.
    with pytest.raises(_Interrupted):
        _train(tmp_path, teachers, iterator=_InterruptingIterator(_train_iter(), stop_at=3))
    ckpts = checkpoint.RunCheckpoints(tmp_path)
    try:
        assert ckpts.latest_step() == 3
    finally:
        ckpts.close()
    resumed = _train(tmp_path, teachers)
    assert [r["epoch"] for r in resumed.fit.history] == [2, 3]
    # Every array of the student (params, BatchNorm statistics, optimiser state, step) and of
    # the agent (params, Adam moments and count, reward baseline, step). The static fields
    # (apply_fn, the optimiser's functions) differ between runs by identity: compare leaves.
    got, want = jax.tree.leaves(jax.device_get(resumed.fit.state)), jax.tree.leaves(straight[2])
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.policy.step) == 4


def test_bad_options_are_refused(teachers, tmp_path):
    with pytest.raises(ValueError, match="rl_embedding_teacher=2 .* 2 teachers"):
        _train(tmp_path, teachers, distill=DistillConfig(rl_embedding_teacher=2))
    with pytest.raises(ValueError, match="at least one teacher"):
        _train(tmp_path, [])
