"""The authors' implementation, reproduced: one test per golden case (see shared/golden)."""

import pytest

from panda_jax import golden

CASES = sorted(golden.default_dir().glob('*.npz'))


def test_golden_directory_has_the_implemented_kinds():
  kinds = {golden.load_case(p)[0]['kind'] for p in CASES}
  # Every implemented kind has cases here, so none of them can be skipped below.
  assert set(golden.CHECKS) <= kinds, (golden.default_dir(), kinds)
  assert {'stab', 'distill', 'llama', 'video_panda', 'languagebind_video'} <= set(golden.CHECKS)


@pytest.mark.parametrize('path', CASES, ids=[p.stem for p in CASES])
def test_golden(path):
  kind = golden.load_case(path)[0]['kind']
  if kind not in golden.CHECKS:
    pytest.skip(f'golden kind {kind!r} is not implemented yet (open issue)')
  rows = golden.check_case(path)
  assert rows and all(ok for *_, ok in rows)
