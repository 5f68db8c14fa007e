"""config.apply_overrides: the one way dotted overrides reach a config (demo variants, aot_7b)."""

import pytest

from panda_jax import config as config_lib


def test_sets_nested_fields_and_refuses_unknown_ones():
  c = config_lib.train_config(2, 'tiny')
  config_lib.apply_overrides(c, {'model.stab.lste': False, 'model.llm.loss_chunk': 64,
                                 'train.steps': 3})
  assert (c.model.stab.lste, c.model.llm.loss_chunk, c.train.steps) == (False, 64, 3)
  with pytest.raises(KeyError, match="override 'model.stab.lstee': no field 'lstee'"):
    config_lib.apply_overrides(c, {'model.stab.lstee': True})
  with pytest.raises(KeyError, match="override 'modle.stab.lste': no field 'modle'"):
    config_lib.apply_overrides(c, {'modle.stab.lste': True})
  assert c.model.stab.lste is False
