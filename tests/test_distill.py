"""The distillation loss: which frames and patches count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panda_jax.models.distill import DistillConfig, DistillHead, cosine_distill_loss


def test_loss_counts_only_frames_with_content_and_valid_patches():
  key = jax.random.PRNGKey(0)
  teacher = jax.random.normal(key, (3, 4, 8))
  student = teacher.at[1].set(-teacher[1])            # frame 1: opposite, loss 2
  student = student.at[2].set(jax.random.normal(jax.random.PRNGKey(1), (4, 8)))
  patch_valid = jnp.ones((3, 4), bool)
  loss, per_frame = cosine_distill_loss(student, teacher, patch_valid,
                                        jnp.array([True, True, False]))
  np.testing.assert_allclose(per_frame[:2], [0.0, 2.0], atol=1e-6)
  np.testing.assert_allclose(loss, 1.0, atol=1e-6)    # frame 2 excluded
  # Padded patches do not count: frame 0 wrong only where the patch is invalid.
  student = teacher.at[0, 3].set(-teacher[0, 3])
  pv = patch_valid.at[0, 3].set(False)
  loss, per_frame = cosine_distill_loss(student, teacher, pv, jnp.array([True, False, False]))
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  # No frame with content: zero, not NaN.
  loss, _ = cosine_distill_loss(student, teacher, pv, jnp.zeros(3, bool))
  assert float(loss) == 0.0


def test_head_rejects_wrong_layer_count_and_config():
  cfg = DistillConfig(llm_hidden=16, teacher_hidden=8, heads=2, layers=(4, 2, 0))
  head = DistillHead(cfg)
  with pytest.raises(ValueError, match=r'expected \[3, \.\.\., 16\]'):
    head.init(jax.random.PRNGKey(0), jnp.zeros((2, 5, 16)))
  with pytest.raises(ValueError, match='outside'):
    DistillConfig(layers=(40, 0)).validate(32)
  with pytest.raises(ValueError, match='at least 2'):
    DistillConfig(layers=(32,)).validate(32)
