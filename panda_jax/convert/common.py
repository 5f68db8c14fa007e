"""Shared machinery for turning PyTorch-named tensors into our variable trees."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util


class ConversionError(ValueError):
  """A checkpoint does not fit the model: lists every missing, unexpected or misshaped name."""


class NameConsumer:
  """Hands out tensors by PyTorch name and remembers which ones were used.

  `take(name)` returns the array (as numpy) or records the name as missing; `finish()` raises
  one `ConversionError` naming every missing name, every name under `prefixes` that nothing
  used (unexpected) and every shape mismatch, so a wrong checkpoint is diagnosed in one go.
  `kept()` gives the tensors accepted and not converted (for the exporter to write back).
  """

  def __init__(self, state: Mapping[str, Any], prefixes: Iterable[str],
               dropped: Iterable[str] = ()):
    self.state = state
    self.prefixes = tuple(prefixes)
    self.dropped = tuple(dropped)
    self.used: set[str] = set()
    self.taken: set[str] = set()
    self.missing: list[str] = []
    self.problems: list[str] = []

  def has(self, name: str) -> bool:
    return name in self.state

  def take(self, name: str) -> np.ndarray | None:
    if name not in self.state:
      self.missing.append(name)
      return None
    self.used.add(name)
    self.taken.add(name)
    return np.asarray(self.state[name])

  def problem(self, msg: str) -> None:
    self.problems.append(msg)

  def drop(self, name: str) -> None:
    """Marks a name as accepted and deliberately not converted."""
    self.used.add(name)

  def kept(self) -> dict[str, np.ndarray]:
    """The tensors accepted and not converted (names under `dropped`, and those `drop`
    marked): name -> array as read, its dtype and bytes unchanged."""
    return {n: np.asarray(a) for n, a in self.state.items()
            if n not in self.taken and (n in self.used or n.startswith(self.dropped))}

  def unexpected(self) -> list[str]:
    out = []
    for name in self.state:
      if name in self.used or not name.startswith(self.prefixes):
        continue
      if name.startswith(self.dropped):
        continue
      out.append(name)
    return sorted(out)

  def finish(self, what: str) -> None:
    unexpected = self.unexpected()
    if not (self.missing or unexpected or self.problems):
      return
    lines = [f'cannot convert the {what} checkpoint:']
    if self.missing:
      lines.append(f'  missing ({len(self.missing)}): ' + ', '.join(self.missing))
    if unexpected:
      lines.append(f'  unexpected ({len(unexpected)}): ' + ', '.join(unexpected))
    lines.extend('  ' + p for p in self.problems)
    raise ConversionError('\n'.join(lines))


# (torch name, 'collection/our/path', transform[, inverse]): the inverse takes our array back to
# the PyTorch layout (`invert_rules`, used by the exporter). Several rules may read one packed
# PyTorch tensor (e.g. an attention's in_proj_weight): their inverses give its pieces, in rule
# order, concatenated along the first axis.
Fn = Callable[[np.ndarray], np.ndarray]
Rule = tuple[str, str, Fn] | tuple[str, str, Fn, Fn]


def apply_rules(src: NameConsumer, rules: Iterable[Rule]) -> dict[str, dict]:
  """Runs (torch name, 'collection/our/path', transform) rules into nested variable dicts."""
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for torch_name, path, fn, *_ in rules:
    arr = src.take(torch_name)
    if arr is None:
      continue
    try:
      flat[tuple(path.split('/'))] = np.asarray(fn(arr))
    except Exception as e:  # a reshape that does not fit: report with the name
      src.problem(f'{torch_name}: shape {arr.shape} does not fit {path} ({e})')
  return traverse_util.unflatten_dict(flat)


def invert_rules(rules: Iterable[Rule], variables: Mapping) -> dict[str, np.ndarray]:
  """The PyTorch tensors `rules` would convert into `variables` (nested, 'a/b/c' paths):
  torch name -> array, in rule order. Raises ConversionError naming every variable a rule needs
  that `variables` lacks."""
  flat = traverse_util.flatten_dict(unbox(variables), sep='/')
  pieces: dict[str, list[np.ndarray]] = {}
  missing = []
  for rule in rules:
    torch_name, path = rule[0], rule[1]
    if len(rule) < 4:
      raise TypeError(f'the rule for {torch_name} ({path}) has no inverse')
    if path not in flat:
      missing.append(path)
      continue
    pieces.setdefault(torch_name, []).append(np.asarray(rule[3](np.asarray(flat[path]))))
  if missing:
    raise ConversionError(f'cannot export: {len(missing)} variables missing: ' +
                          ', '.join(missing))
  return {k: v[0] if len(v) == 1 else np.concatenate(v, axis=0) for k, v in pieces.items()}


def inverse_permutation(axes) -> tuple[int, ...]:
  """The axes that undo `x.transpose(axes)`."""
  return tuple(int(i) for i in np.argsort(axes))


def check_shapes(converted: Mapping, expected: Mapping, what: str) -> None:
  """Compares converted arrays with the model's abstract variables (from `jax.eval_shape`)."""
  got = traverse_util.flatten_dict(converted, sep='/')
  want = traverse_util.flatten_dict(unbox(expected), sep='/')
  problems = []
  for k in sorted(set(want) - set(got)):
    problems.append(f'model variable {k} {tuple(want[k].shape)} has no source')
  for k in sorted(set(got) - set(want)):
    problems.append(f'converted {k} {got[k].shape} is not a model variable')
  for k in sorted(set(got) & set(want)):
    if tuple(got[k].shape) != tuple(want[k].shape):
      problems.append(f'{k}: checkpoint gives {tuple(got[k].shape)}, model expects '
                      f'{tuple(want[k].shape)} (wrong size in the config?)')
  if problems:
    raise ConversionError(f'the {what} checkpoint does not match the model:\n  ' +
                          '\n  '.join(problems))


def unbox(tree):
  """Strips flax partitioning metadata boxes."""
  import flax.linen as nn
  return nn.unbox(tree) if tree is not None else tree


def linear(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear / 1x1 conv weight [out, in, 1...] -> our kernel [in, out]."""
  return w.reshape(w.shape[0], -1).T


def unlinear(k: np.ndarray, tail: tuple[int, ...] = ()) -> np.ndarray:
  """Our kernel [in, out] -> PyTorch Linear weight [out, in] (+ `tail`, e.g. (1, 1, 1) for a
  1x1x1 convolution): the inverse of `linear`."""
  return k.T.reshape(k.shape[1], k.shape[0], *tail)


def identity(x: np.ndarray) -> np.ndarray:
  return x


def to_numpy_tree(tree):
  return jax.tree.map(np.asarray, tree)
