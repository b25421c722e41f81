"""Distillation math: losses (supervised, KD), teacher weights, weight smoothing.

The RL teacher-selection baseline is imported from `rosjax.distill.rl_policy` directly.
"""
from rosjax.distill.smoothing import SmoothState, recalibrate_batch_stats, should_average, update_running_mean
from rosjax.distill.weighting import (
                                      TEACHER_WEIGHTINGS,
                                      equal_teacher_weights,
                                      sample_teacher_weights,
                                      step_key,
                                      teacher_weights,
)
from rosjax.losses import kd_divergence, kd_loss, supervised_loss, supervised_per_example

__all__ = ["SmoothState", "TEACHER_WEIGHTINGS", "equal_teacher_weights", "kd_divergence", "kd_loss",
           "recalibrate_batch_stats", "sample_teacher_weights", "should_average", "step_key",
           "supervised_loss", "supervised_per_example", "teacher_weights", "update_running_mean"]
