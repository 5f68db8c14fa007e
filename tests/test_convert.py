"""Released-name conversion: round trip, accepted extras, and the errors a wrong file gets."""

import jax
import numpy as np
import pytest

from panda_jax import golden
from panda_jax.convert.common import ConversionError, check_shapes
from panda_jax.convert.visual import convert_visual
from panda_jax.models.distill import DistillConfig
from panda_jax.models.stab import VisualTokenizer

CASE = golden.case_path('stab_square_eval')


@pytest.fixture(scope='module')
def released():
  meta, params, *_ = golden.load_case(CASE)
  return golden.stab_config_from_meta(meta), params


def _abstract(cfg):
  import jax.numpy as jnp
  px = jax.ShapeDtypeStruct((1, 4, cfg.image_size, cfg.image_size, 3), jnp.float32)
  return jax.eval_shape(VisualTokenizer(cfg).init, jax.random.PRNGKey(0), px,
                        jax.ShapeDtypeStruct(px.shape[:-1], jnp.float32))


def test_converted_tree_is_exactly_the_models_variables(released):
  cfg, params = released
  conv = convert_visual(params, cfg)['visual']
  check_shapes(conv, _abstract(cfg), 'visual')   # raises on any missing or extra variable


def test_aliases_and_unused_module_are_accepted_and_kept_not_converted(released):
  """Not converted, and handed to `kept` as read (what the exporter writes back); keeping
  changes nothing converted."""
  cfg, params = released
  state = dict(params)
  state['model.vision_tower.class_embedding'] = params['model.video_tower.class_embedding']
  state['model.mm_projector.0.weight'] = params['model.video_projector.0.weight']
  assert any('lmhra2' in k for k in state)
  kept = {}
  conv = convert_visual(state, cfg, kept=kept)['visual']
  assert 'lmhra2' not in str(jax.tree_util.tree_structure(conv))
  assert sorted(kept) == sorted(n for n in state if 'lmhra2' in n or 'vision_tower' in n
                                or 'mm_projector' in n or n.endswith('num_batches_tracked'))
  assert all(kept[n].dtype == state[n].dtype and kept[n].tobytes() == state[n].tobytes()
             for n in kept)
  assert jax.tree.all(jax.tree.map(np.array_equal, conv, convert_visual(state, cfg)['visual']))


def test_missing_unexpected_and_misshaped_names_are_all_reported(released):
  cfg, params = released
  state = dict(params)
  del state['model.video_tower.balance']
  del state['model.video_projector.2.bias']
  state['model.video_tower.mystery.weight'] = np.zeros(3)
  state['model.layers.0.mlp.up_proj.weight'] = np.zeros(3)     # LLM weight, not ignored
  with pytest.raises(ConversionError) as e:
    convert_visual(state, cfg)
  msg = str(e.value)
  assert 'missing (2): model.video_tower.balance, model.video_projector.2.bias' in msg
  assert 'model.video_tower.mystery.weight' in msg
  assert 'model.layers.0.mlp.up_proj.weight' in msg
  # With ignore_other the LLM's names are someone else's business.
  del state['model.video_tower.mystery.weight']
  state['model.video_tower.balance'] = params['model.video_tower.balance']
  state['model.video_projector.2.bias'] = params['model.video_projector.2.bias']
  convert_visual(state, cfg, ignore_other=True)


def test_wrong_width_is_named_with_both_shapes(released):
  cfg, params = released
  state = dict(params)
  w = params['model.video_tower.local_attention.kv.1.weight']
  state['model.video_tower.local_attention.kv.1.weight'] = w[:, :-8]
  with pytest.raises(ConversionError, match='local_attention.kv.1.weight: shape'):
    convert_visual(state, cfg)
  conv = convert_visual(params, cfg)['visual']
  conv['params']['stab']['balance'] = np.zeros(7)
  with pytest.raises(ConversionError, match=r'balance: checkpoint gives \(7,\), model expects'):
    check_shapes(conv, _abstract(cfg), 'visual')


def test_distill_head_layer_count_mismatch_is_explained():
  meta, params, *_ = golden.load_case(golden.case_path('distill_head'))
  cfg = DistillConfig(llm_hidden=meta['llm_hidden'], teacher_hidden=meta['teacher_hidden'],
                      heads=meta['heads'], layers=(8, 4))
  with pytest.raises(ConversionError, match='beyond the 2 distillation layers'):
    convert_visual(params, None, cfg)
