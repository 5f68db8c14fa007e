"""Parameter trees as flat `{'a/b/c': leaf}` dicts: the path form regexes match (optimizer
groups, freezing) and checkpoints merge by (`train/checkpoint.py`)."""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util


def flatten(tree: Mapping) -> dict[str, Any]:
  """{'llm': {'lm_head': {'kernel': x}}} -> {'llm/lm_head/kernel': x}."""
  return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict:
  """The inverse of `flatten`."""
  return traverse_util.unflatten_dict(dict(flat), sep='/')
