"""Video question answering end to end on a tiny random model and tokenizer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, box_mask, random_video
from panda_jax.data import text
from panda_jax.data.assembly import layout_batch
from panda_jax.eval.generate import Sampling, generate
from panda_jax.eval.predict import Predictor
from panda_jax.models.distill import DistillConfig
from panda_jax.models.llama import Llama, LlamaConfig
from panda_jax.models.panda import PandaConfig, VideoPanda
from test_text import build_tokenizer_dir

CFG = PandaConfig(
    stab=TINY,
    llm=LlamaConfig(vocab_size=512, hidden=TINY.llm_hidden, layers=2, heads=4, kv_heads=4,
                    head_dim=12, mlp=64),
    distill=DistillConfig(llm_hidden=TINY.llm_hidden, teacher_hidden=16, heads=4,
                          layers=(2, 0)))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  tok = text.load_tokenizer(build_tokenizer_dir(str(tmp_path_factory.mktemp('tok'))))
  f = 4
  px = random_video(jax.random.PRNGKey(0), 2, f)
  mask = jnp.asarray(box_mask(2, f, [(0, 112, 0, 112)] * f))
  mask = mask.at[1].set(jnp.asarray(box_mask(1, f, [(28, 84, 0, 112)] * f))[0])
  ids = np.array([[1] + [text.IMAGE_TOKEN_INDEX] * f + [5]])
  lay = layout_batch(ids, None, np.ones_like(ids), np.asarray(mask[:1]), TINY, max_len=96)
  batch = dict({k: jnp.asarray(v) for k, v in lay.items()}, pixels=px[:1], mask=mask[:1])
  v = nn.unbox(jax.jit(VideoPanda(CFG).init, static_argnames=('with_distill',))(
      jax.random.PRNGKey(1), batch, with_distill=False))
  v = dict(v, params=jax.tree.map(lambda a: a * 4.0, v['params']))  # decisive greedy choices
  return tok, v, px, mask


def test_answers_match_direct_greedy_decoding_and_are_batch_independent(setup):
  tok, v, px, mask = setup
  pred = Predictor(CFG, v, tok, Sampling(max_new_tokens=6, eos_id=tok.eos_token_id))
  questions = ['What is the man doing in the video?', 'Where is he going?']
  both = pred.generate_ids(px, mask, questions)
  for i, q in enumerate(questions):
    alone = pred.generate_ids(px[i:i + 1], mask[i:i + 1], [q])[0]
    np.testing.assert_array_equal(both[i], alone)
  # The same answer computed by hand with the scanned decoder.
  ids = text.generation_prompt_ids(tok, questions[0], num_frames=4)[None]
  n = ids.shape[1] - 4 + 4 * TINY.max_frame_tokens
  lay = layout_batch(ids, None, np.ones_like(ids), np.asarray(mask[:1]), TINY, max_len=n)
  batch = dict({k: jnp.asarray(a) for k, a in lay.items()}, pixels=px[:1], mask=mask[:1])
  # Jitted like the predictor's own embedding: op by op it compiles every operation alone.
  embed = lambda v, b: VideoPanda(CFG).apply(v, b, method=lambda m, b: m.embed_inputs(b)[0])
  emb = jax.jit(embed)(v, batch)
  out = generate(Llama(CFG.llm), v['params']['llm'], emb, batch['valid'],
                 jax.random.PRNGKey(0), Sampling(max_new_tokens=6, eos_id=tok.eos_token_id))
  want = np.asarray(out['tokens'][0, :int(out['lengths'][0])])
  want = want[want != tok.eos_token_id]
  np.testing.assert_array_equal(both[0], want)
  answers = pred.answer(px, mask, questions)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  assert answers[0] == tok.decode(want, skip_special_tokens=True).strip()
  with pytest.raises(ValueError, match='1 questions for a batch of 2'):
    pred.answer(px, mask, ['only one'])
