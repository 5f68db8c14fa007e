"""The symbolic at-start sandbox (experiments/binding.py): its data and where it predicts."""

import jax
import numpy as np
import pytest

from experiments import binding as bd


@pytest.mark.parametrize('fmt', ['std', 'prev', 'last'])
def test_answers_say_whether_the_named_shape_is_in_frame_0(fmt):
  vis, txt, tgt = bd.make_batch(np.random.default_rng(0), 200, [fmt])
  assert vis.shape == (200, bd.FRAMES * bd.CELLS, 3) and txt.shape == tgt.shape == (200, 9)
  two = 0
  for v, t, g in zip(vis, txt, tgt):
    (pos,) = np.nonzero(g)
    assert pos.tolist() == [7] and g[7] == t[8] and t[8] in (bd.YES, bd.NO)
    colour = [x - bd.COLOUR0 for x in t[:8] if bd.COLOUR0 <= x < bd.KIND0]
    kind = [x - bd.KIND0 for x in t[:8] if x >= bd.KIND0]
    assert len(colour) == len(kind) == 1
    assert t[:8].tolist() == bd.question(fmt, colour[0], kind[0])
    frames = v[:, 0].reshape(bd.FRAMES, bd.CELLS) - 1      # colour per cell, -1 background
    in_frame0 = colour[0] in frames[0]
    assert colour[0] in frames[1:]           # the named shape is in the clip (it may hide behind
                                             # the other one on a frame)
    assert (t[8] == bd.YES) == in_frame0
    two += len(set(frames[-1][frames[-1] >= 0])) == 2
  assert 60 < two < 140                                      # about half the clips have two


def test_the_answer_is_predicted_at_the_last_question_token():
  """Position 7 of the model's output is the prediction made at the question's last token: it
  changes with that token and not with the answer token after it."""
  cfg = bd.LlamaConfig(vocab_size=bd.VOCAB, hidden=32, layers=1, heads=2, kv_heads=2,
                       head_dim=16, mlp=64, max_positions=128, qk_norm=True)
  model = bd.SymbolicPanda(cfg)
  vis, txt, _ = bd.make_batch(np.random.default_rng(1), 4, ['prev'])
  params = model.init(jax.random.PRNGKey(0), vis, txt)
  out = np.asarray(model.apply(params, vis, txt))
  assert out.shape == (4, 9, bd.VOCAB)
  answer = txt.copy()
  answer[:, 8] = np.where(txt[:, 8] == bd.YES, bd.NO, bd.YES)
  np.testing.assert_array_equal(np.asarray(model.apply(params, vis, answer))[:, 7], out[:, 7])
  last = txt.copy()
  last[:, 7] = bd.KIND0 + (txt[:, 7] - bd.KIND0 + 1) % bd.KINDS
  assert np.abs(np.asarray(model.apply(params, vis, last))[:, 7] - out[:, 7]).max() > 1e-4


def test_run_reports_loss_and_accuracy():
  rows = bd.run('std,prev', eval_fmt='std', steps=6, batch=4, eval_every=3, eval_size=16,
                log=lambda s: None)
  assert [r[0] for r in rows] == [3, 6]
  assert all(np.isfinite(r[1]) and 0.0 <= r[2] <= 1.0 for r in rows)
  with pytest.raises(ValueError, match='fmt'):
    bd.question('middle', 0, 0)
