"""--optim.class_weighting: balanced class weights (scikit-learn's) and BCE positive weights
(torch's pos_weight) from the training labels, the weighted losses against numpy, 'none'
leaving the losses and their programs as they were, and a whole tiny run with it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight
from test_experiment import tiny_config

from experiments import lesion, nih_cxr
from rosjax import losses
from rosjax.experiment import runner
from rosjax.experiment import training as training_lib
from rosjax.experiment.validate import ConfigError

RNG = np.random.default_rng(0)


def test_one_label_weights_are_sklearns_balanced():
    y = RNG.choice(5, size=300, p=[0.5, 0.25, 0.15, 0.07, 0.03])
    got = losses.class_weights(y, 5, multilabel=False)
    want = compute_class_weight("balanced", classes=np.arange(5), y=y)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    assert np.mean(got[y]) == pytest.approx(1.0, rel=1e-6)  # the mean weight over the rows is 1


def test_absent_class_gets_weight_one():
    got = losses.class_weights(np.array([0, 0, 2]), 3, multilabel=False)
    np.testing.assert_allclose(got, [3 / (3 * 2), 1.0, 3 / (3 * 1)])


def test_multilabel_pos_weight_by_hand():
    y = np.array([[1, 0, 1, 0],
                  [0, 0, 1, 0],
                  [1, 0, 1, 0],
                  [0, 0, 1, 1],
                  [0, 0, 1, 0]], np.float32)
    # label 0: 2 positive, 3 negative -> 3/2; label 1 never positive and label 2 always: 1;
    # label 3: 1 positive, 4 negative -> 4.
    np.testing.assert_allclose(losses.class_weights(y, 4, multilabel=True), [1.5, 1.0, 1.0, 4.0])


def test_none_means_no_weights():
    assert losses.class_weights(np.array([0, 1]), 2, multilabel=False, kind="none") is None
    with pytest.raises(ValueError, match="class weighting"):
        losses.class_weights(np.array([0, 1]), 2, multilabel=False, kind="inverse")


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_weighted_ce_equals_numpy():
    logits = RNG.normal(size=(16, 4)) * 3
    labels = RNG.integers(0, 4, 16)
    w = np.array([0.5, 2.0, 1.25, 3.0])
    ref = -(w[labels] * _log_softmax(logits)[np.arange(16), labels])
    got = losses.supervised_per_example(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                        multilabel=False, class_weights=w)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    loss = losses.supervised_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                  multilabel=False, class_weights=w)
    assert float(loss) == pytest.approx(ref.mean(), rel=1e-5)
    mask = (np.arange(16) < 10).astype(np.float32)
    masked = losses.supervised_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                    multilabel=False, class_weights=w, mask=mask)
    assert float(masked) == pytest.approx(ref[:10].mean(), rel=1e-5)


def test_weighted_bce_equals_numpy_pos_weight():
    logits = RNG.normal(size=(16, 5)) * 3
    y = (RNG.random((16, 5)) < 0.3).astype(np.float32)
    pw = np.array([1.0, 2.0, 0.5, 4.0, 3.0])
    ref = -(pw * y * _log_sigmoid(logits) + (1 - y) * _log_sigmoid(-logits)).sum(axis=1)
    got = losses.supervised_per_example(jnp.asarray(logits, jnp.float32), jnp.asarray(y),
                                        multilabel=True, class_weights=pw)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("multilabel", [False, True])
def test_kd_loss_weights_only_its_ce_term(multilabel):
    b, c, k = 12, 4, 3
    s = jnp.asarray(RNG.normal(size=(b, c)), jnp.float32)
    t = jnp.asarray(RNG.normal(size=(k, b, c)), jnp.float32)
    labels = (jnp.asarray((RNG.random((b, c)) < 0.4).astype(np.float32)) if multilabel
              else jnp.asarray(RNG.integers(0, c, b)))
    w = np.array([0.5, 2.0, 1.5, 3.0], np.float32)
    tw = jnp.full((k,), 1 / k)
    _, plain = losses.kd_loss(s, t, labels, tw, tau=2.0, alpha=0.3, multilabel=multilabel)
    loss, aux = losses.kd_loss(s, t, labels, tw, tau=2.0, alpha=0.3, multilabel=multilabel,
                               class_weights=w)
    want_ce = losses.supervised_loss(s, labels, multilabel=multilabel, class_weights=w)
    assert float(aux["ce"]) == pytest.approx(float(want_ce), rel=1e-6)
    assert float(aux["kd"]) == float(plain["kd"])
    assert float(loss) == pytest.approx(0.3 * float(aux["kd"]) + 0.7 * float(aux["ce"]), rel=1e-6)


def _old_supervised_per_example(logits, labels, *, multilabel):
    """The loss as it was before class weighting existed (copied)."""
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    if multilabel:
        y = labels.astype(jnp.float32)
        bce = -(y * jax.nn.log_sigmoid(logits) + (1.0 - y) * jax.nn.log_sigmoid(-logits))
        return jnp.sum(bce, axis=-1)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


@pytest.mark.parametrize("multilabel", [False, True])
def test_no_weights_is_bit_identical_and_the_same_program(multilabel):
    logits = jnp.asarray(RNG.normal(size=(8, 3)) * 5, jnp.float32)
    labels = (jnp.asarray((RNG.random((8, 3)) < 0.5).astype(np.float32)) if multilabel
              else jnp.asarray(RNG.integers(0, 3, 8), jnp.int32))
    new = jax.jit(lambda x, y: losses.supervised_per_example(x, y, multilabel=multilabel,
                                                             class_weights=None))
    old = jax.jit(lambda x, y: _old_supervised_per_example(x, y, multilabel=multilabel))
    np.testing.assert_array_equal(new(logits, labels), old(logits, labels))
    assert str(jax.make_jaxpr(new)(logits, labels)) == str(jax.make_jaxpr(old)(logits, labels))
    assert new.lower(logits, labels).as_text() == old.lower(logits, labels).as_text()


def test_unknown_class_weighting_is_refused(tmp_path):
    cfg = tiny_config(lesion.get_config, **{"optim.class_weighting": "inverse"})
    with pytest.raises(ConfigError, match="optim.class_weighting"):
        runner.run(cfg, tmp_path, stages=["data"], settings=[])


@pytest.mark.parametrize("get_config", [lesion.get_config, nih_cxr.get_config],
                         ids=["one_label", "multilabel"])
def test_balanced_run_trains_teachers_and_students(get_config, tmp_path):
    """A whole tiny run with balanced weights (teachers, baseline I, RoS-KD, baseline IV): the
    weights come from each model's own rows, losses stay finite, every run writes events."""
    cfg = tiny_config(get_config, **{"optim.class_weighting": "balanced", "optim.epochs": "2",
                                     "distill.rl_equal_epochs": "1"})
    runner.run(cfg, tmp_path, stages=["data", "teachers", "settings"],
               settings=["baseline_i", "ros_kd", "baseline_iv"])
    from rosjax.experiment import data as data_lib  # noqa: PLC0415
    data = data_lib.load(cfg)
    w = training_lib.class_weights(cfg, data, data.splits["train"])
    assert w is not None and w.shape == (data.num_classes,) and np.all(w > 0)
    folders = [*tmp_path.glob("teachers/*"), *(tmp_path / "settings").glob("*")]
    assert len(folders) == 6
    for folder in folders:
        assert list(folder.glob("events.out.tfevents.*")), folder
        assert (folder / "DONE.json").exists(), folder
        assert (folder / "metrics.jsonl").read_text().count("\n") == 2


def test_steps_apply_the_weights():
    """Weights 2 double the teacher step's loss and the student steps' CE (they reach the programs)."""
    from _tiny_student import tiny_student  # noqa: PLC0415

    from rosjax.distill import rl_policy  # noqa: PLC0415
    from rosjax.distill.steps import DistillInputs, make_distill_step  # noqa: PLC0415
    from rosjax.distill.weighting import weight_rule  # noqa: PLC0415
    from rosjax.train import steps  # noqa: PLC0415
    b, c, k = 8, 4, 2
    state, batch = tiny_student(k, b, c, RNG)
    key, two = jax.random.key(1), np.full(c, 2.0, np.float32)

    def teacher(w):
        return jax.jit(lambda s, x, r: steps.train_step(s, x, r, multilabel=False, class_weights=w))(
            state, batch, key)[1]

    def student(w):
        step = make_distill_step((None,) * k, tau=2.0, alpha=0.5, multilabel=False, class_weights=w)
        return jax.jit(step)(state, DistillInputs(teachers=(), rule=weight_rule("exponential", k)), batch, key)[1]

    assert float(teacher(two)["loss"]) == pytest.approx(2 * float(teacher(None)["loss"]), rel=1e-6)
    plain, doubled = student(None), student(two)
    assert float(doubled["ce"]) == pytest.approx(2 * float(plain["ce"]), rel=1e-6)
    assert float(doubled["kd"]) == pytest.approx(float(plain["kd"]), rel=1e-6)
    actions = jnp.ones((k, b), bool)
    args = (batch["image"].reshape(b, -1)[:, :c], batch["teacher_logits"], batch["label"], actions)
    _, rl_plain = rl_policy.rl_kd_loss(*args, tau=2.0, alpha=0.5, multilabel=False)
    _, rl_doubled = rl_policy.rl_kd_loss(*args, tau=2.0, alpha=0.5, multilabel=False, class_weights=two)
    assert float(rl_doubled["ce"]) == pytest.approx(2 * float(rl_plain["ce"]), rel=1e-6)
