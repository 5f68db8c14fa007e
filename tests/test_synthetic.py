"""Synthetic video data: determinism, ground truth visible in decoded frames, annotations."""

import collections
import json
import os

import av
import numpy as np
import pytest

from panda_jax.data import synthetic
from panda_jax.data.video import decode_frames, load_video, sample_indices

SMALL = dict(width=96, height=64, fps=10, duration_s=2.0)


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
  a = synthetic.make_dataset(str(tmp_path_factory.mktemp('a')), 5, seed=7, **SMALL)
  b = synthetic.make_dataset(str(tmp_path_factory.mktemp('b')), 5, seed=7, **SMALL)
  c = synthetic.make_dataset(str(tmp_path_factory.mktemp('c')), 5, seed=8, **SMALL)
  return a, b, c


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def test_same_seed_same_bytes(datasets):
  a, b, c = datasets
  va, vb, vc = (d.train_videos + d.eval_videos for d in (a, b, c))
  assert len(va) == 5
  for pa, pb in zip(va, vb):
    assert _read(pa) == _read(pb)
  for key in ('train_captions', 'train_instruct', 'eval_qa', 'scenes'):
    assert _read(getattr(a, key)) == _read(getattr(b, key))
  assert any(_read(pa) != _read(pc) for pa, pc in zip(va, vc))
  assert _read(a.scenes) != _read(c.scenes)


def test_annotation_formats(datasets):
  d = datasets[0]
  assert len(d.train_videos) == 4 and len(d.eval_videos) == 1   # 25 % held out
  for key in ('train_captions', 'train_instruct'):
    data = json.load(open(getattr(d, key)))
    assert len(data) == 4
    for item in data:
      assert set(item) == {'id', 'video', 'conversations'}
      assert os.path.exists(os.path.join(d.root, item['video']))
      conv = item['conversations']
      assert conv[0]['from'] == 'human' and conv[0]['value'].startswith('<video>\n')
      assert [t['from'] for t in conv] == ['human', 'gpt'] * (len(conv) // 2)
      assert sum('<video>' in t['value'] for t in conv) == 1
  qa = json.load(open(d.eval_qa))
  assert qa and all({'video_name', 'question', 'question_id', 'answer'} <= set(q) for q in qa)
  held = {os.path.splitext(os.path.basename(p))[0] for p in d.eval_videos}
  train = {item['id'] for item in json.load(open(d.train_captions))}
  assert {q['video_name'] for q in qa} == held and not held & train
  assert len({q['question_id'] for q in qa}) == len(qa)
  assert {q['type'] for q in qa} <= {'direction', 'end_position', 'at_start', 'order'}
  scenes = json.load(open(d.scenes))
  for q in qa:
    s = scenes[q['video_name']]
    if q['type'] == 'direction':
      assert q['answer'] in [sh['direction'] for sh in s['shapes']]


def _centroid(frame, colour, tol=70):
  d = np.abs(frame.astype(int) - np.array(synthetic.COLOURS[colour])).sum(-1)
  ys, xs = np.nonzero(d < tol)
  if len(xs) < 5:
    return None
  return xs.mean(), ys.mean()


@pytest.mark.parametrize('direction', synthetic.DIRECTIONS)
def test_motion_is_visible_in_decoded_frames(tmp_path, direction):
  scene = synthetic.random_scene(np.random.default_rng(3), width=128, height=96, fps=12,
                                 duration_s=2.0, num_shapes=1, directions=[direction])
  path = synthetic.write_scene_video(str(tmp_path / 'm.mp4'), scene, gop=6)
  frames, info = decode_frames(path)
  assert info['n_frames'] == 24
  shape = scene.shapes[0]
  shown = info['indices'] >= shape.appear
  frames, info['indices'] = frames[shown], info['indices'][shown]
  xy = np.array([_centroid(f, shape.colour) for f in frames])
  dx, dy = np.diff(xy[:, 0]), np.diff(xy[:, 1])
  sign = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}[direction]
  moving, still = (dx, dy) if sign[0] else (dy, dx)
  assert (np.sign(moving) == sum(sign)).all(), xy
  assert np.abs(still).max() < 1.5
  # The decoded centroid follows the ground-truth centre (a triangle's centroid is not its
  # centre, so compare displacements).
  truth = np.array([shape.centre(int(i), scene.num_frames) for i in info['indices']])
  np.testing.assert_allclose(xy - xy[0], truth - truth[0], atol=1.5)


def test_order_of_appearance_is_visible(tmp_path):
  scene = synthetic.random_scene(np.random.default_rng(5), width=128, height=96, fps=10,
                                 duration_s=3.0, num_shapes=3)
  appear = [sh.appear for sh in scene.shapes]
  assert appear == sorted(appear) and len(set(appear)) >= 2
  assert appear[-1] <= synthetic.last_appearance(scene.num_frames)
  path = synthetic.write_scene_video(str(tmp_path / 'o.mp4'), scene, gop=10)
  everything, _ = decode_frames(path, indices=np.arange(scene.num_frames))
  for sh in scene.shapes:
    seen = [_centroid(f, sh.colour) is not None for f in everything]
    assert not any(seen[:max(sh.appear - 1, 0)]), sh          # absent before appearing
    assert all(seen[sh.appear + 1:]), sh                      # present afterwards
  (q,) = [q for q in synthetic.questions(scene, np.random.default_rng(0))
          if q['type'] == 'order']
  named = sorted((q['question'].index(s.name), s) for s in scene.shapes
                 if s.name in q['question'])
  assert len(named) == 2 and named[0][1].appear != named[1][1].appear
  assert q['answer'] == f'the {min((s for _, s in named), key=lambda s: s.appear).name}'


def test_each_fact_is_drawn_on_its_own():
  """Over many scenes: every shape's first frame is uniform over 0 .. last_appearance (frame 0
  for any shape, the first listed included), and its direction, the half it ends in and whether
  it is there at the start are independent (each cell of the joint table near the product of
  its margins); a clip whose shapes all appear together asks no "which appears first"."""
  kw = dict(width=112, height=84, fps=1, duration_s=4.0, max_shapes=2, size=0.2)
  joint = collections.Counter()
  together = 0
  for i in range(1500):
    scene = synthetic.random_scene(np.random.default_rng([4, i]), **kw)
    for sh in scene.shapes:
      joint[(sh.direction, synthetic.end_half(scene, sh), sh.appear)] += 1
      # Inside the frame at both ends of its path, at least 4 % of the width from the middle.
      for x, y in (sh.start, sh.end):
        assert sh.radius < x < 112 - sh.radius and sh.radius < y < 84 - sh.radius
      assert abs(sh.end[0] - 56) >= 0.04 * 112 - 1e-9
    if len(scene.shapes) == 2 and scene.shapes[0].appear == scene.shapes[1].appear:
      together += 1
      assert 'order' not in {q['type'] for q in synthetic.questions(
          scene, np.random.default_rng(0))}
  n = sum(joint.values())
  margin = lambda k: collections.Counter({v: sum(c for key, c in joint.items()  # noqa: E731
                                              if key[k] == v) for v in {key[k] for key in joint}})
  d, h, a = margin(0), margin(1), margin(2)
  assert set(a) == {0, 1, 2} and all(abs(c / n - 1 / 3) < 0.04 for c in a.values())
  assert all(abs(c / n - 1 / 4) < 0.04 for c in d.values())
  assert all(abs(c / n - 1 / 2) < 0.04 for c in h.values())
  for (dd, hh, aa), c in joint.items():
    assert abs(c / n - d[dd] * h[hh] * a[aa] / n ** 3) < 0.015, (dd, hh, aa)
  assert 100 < together < 400     # about a third of the ~750 two-shape clips


def test_held_out_conditions_are_avoided_or_shown_once():
  held = synthetic.DEMO_HELD_OUT
  kw = dict(width=112, height=84, fps=1, duration_s=4.0, max_shapes=2, size=0.2)
  seen = collections.Counter()
  for i in range(400):
    plain = synthetic.random_scene(np.random.default_rng(i), exclude=held, **kw)
    assert not any(held.condition(s.colour, s.kind, s.direction) for s in plain.shapes)
    novel = synthetic.random_scene(np.random.default_rng(i), novel=held, **kw)
    conds = [held.condition(s.colour, s.kind, s.direction) for s in novel.shapes]
    assert sum(map(bool, conds)) == 1
    assert len({s.colour for s in novel.shapes}) == len(novel.shapes)
    (shape,) = [s for s, c in zip(novel.shapes, conds) if c]
    seen[(shape.colour, shape.kind) if (shape.colour, shape.kind) in held.pairs
         else (shape.kind, shape.direction)] += 1
  assert set(seen) == set(held.pairs) | set(held.motions)      # every condition is shown
  with pytest.raises(ValueError, match="'purple'"):
    synthetic.HeldOut(pairs=(('purple', 'circle'),))
  with pytest.raises(ValueError, match="'sideways'"):
    synthetic.HeldOut(motions=(('circle', 'sideways'),))


def test_splits_are_disjoint_and_novel_questions_ask_about_the_held_out_shape(tmp_path):
  held = synthetic.DEMO_HELD_OUT
  ds = synthetic.make_dataset(str(tmp_path), 10, seed=3, eval_fraction=0.2, val_clips=3,
                              novel_clips=6, held_out=held, width=32, height=24, fps=1,
                              duration_s=4.0, max_shapes=2)
  stem = lambda paths: {os.path.splitext(os.path.basename(p))[0] for p in paths}  # noqa: E731
  train, test, val, novel = (stem(ds.train_videos), stem(ds.eval_videos), stem(ds.val_videos),
                             stem(ds.novel_videos))
  assert (len(train), len(test), len(val), len(novel)) == (8, 2, 3, 6)
  assert len(train | test | val | novel) == 19
  scenes = json.load(open(ds.scenes))
  assert {k: v['split'] for k, v in scenes.items()} == {
      **{k: 'train' for k in train}, **{k: 'test' for k in test}, **{k: 'val' for k in val},
      **{k: 'novel' for k in novel}}
  for key, clips in (('eval_qa', test), ('val_qa', val), ('novel_qa', novel)):
    qa = json.load(open(getattr(ds, key)))
    assert qa and {q['video_name'] for q in qa} <= clips, key
  assert train == {e['id'] for e in json.load(open(ds.train_captions))}
  for q in json.load(open(ds.novel_qa)):
    shapes = [s for s in scenes[q['video_name']]['shapes']
              if held.condition(s['colour'], s['kind'], s['direction'])]
    assert len(shapes) == 1 and f"the {shapes[0]['colour']} {shapes[0]['kind']}" in \
        q['question']
    assert q['condition'] == held.condition(shapes[0]['colour'], shapes[0]['kind'],
                                            shapes[0]['direction'])
  with pytest.raises(ValueError, match='needs held_out'):
    synthetic.make_dataset(str(tmp_path / 'bad'), 4, novel_clips=2)


def test_codec_and_keyframes(tmp_path):
  assert synthetic.default_codec() in ('libx264', 'mpeg4')
  scene = synthetic.random_scene(np.random.default_rng(1), **SMALL)
  for codec in ('mpeg4', synthetic.default_codec()):
    path = synthetic.write_scene_video(str(tmp_path / f'{codec}.mp4'), scene, codec=codec,
                                       gop=5)
    with av.open(path) as c:
      s = c.streams.video[0]
      assert s.codec_context.name in ('h264', 'mpeg4')
      packets = sorted((p.pts, p.is_keyframe) for p in c.demux(s) if p.size)
    keys = [i for i, (_, key) in enumerate(packets) if key]
    assert keys == list(range(0, scene.num_frames, 5))
    out = load_video(path)
    assert out['pixels'].shape == (8, 448, 448, 3)
    assert out['info']['indices'].tolist() == sample_indices(20, 10).tolist()


def test_travel_sets_every_shapes_path_length():
  """Every shape travels `travel` of `path_reach`, whenever it appears; the longest path (1.0)
  still ends in either half for every direction, on wide, square and tall frames."""
  for w, h, size in ((112, 84, 0.2), (48, 48, 0.1), (32, 24, 0.1), (64, 96, 0.1)):
    r = max(2, int(min(w, h) * size))
    reach = synthetic.path_reach(w, h, r)
    for travel in (0.4, 1.0):
      for i in range(60):
        scene = synthetic.random_scene(np.random.default_rng(i), width=w, height=h, fps=1,
                                       duration_s=4.0, num_shapes=2, size=size, travel=travel)
        for sh in scene.shapes:
          dist = np.hypot(sh.end[0] - sh.start[0], sh.end[1] - sh.start[1])
          assert dist == pytest.approx(travel * reach)
          for x, y in (sh.start, sh.end):
            assert r < x < w - r - 1 and r < y < h - r - 1
  # The demo's frame: a left-mover ending in the right half binds (the frame's right margin).
  assert synthetic.path_reach(112, 84, 16) == pytest.approx((112 - 16 - 2) - 56 - 0.04 * 112)
  with pytest.raises(ValueError, match='travel=0'):
    synthetic.random_scene(np.random.default_rng(3), travel=0.0)
  with pytest.raises(ValueError, match='no room'):
    synthetic.random_scene(np.random.default_rng(3), width=8, height=8, size=0.25)


def test_short_answer_turns_and_eval_instruction(tmp_path):
  ds = synthetic.make_dataset(str(tmp_path), 12, seed=1, turns=6, short_fraction=0.5,
                              eval_instruction=synthetic.SHORT_ANSWER_PROMPT, **SMALL)
  scenes = json.load(open(ds.scenes))
  pairs = [(h['value'], g['value']) for e in json.load(open(ds.train_instruct))
           for h, g in zip(e['conversations'][::2], e['conversations'][1::2])]
  short = [(q, a) for q, a in pairs if q.endswith('\n' + synthetic.SHORT_ANSWER_PROMPT)]
  assert 0 < len(short) < len(pairs)
  words = {'left', 'right', 'up', 'down', 'yes', 'no'}
  assert all(a in words or a.startswith('the ') for _, a in short)
  assert max(len(e['conversations']) for e in json.load(open(ds.train_instruct))) > 6
  qa = json.load(open(ds.eval_qa))
  assert all(q['question'].endswith('?\n' + synthetic.SHORT_ANSWER_PROMPT) for q in qa)
  assert {q['video_name'] for q in qa} <= set(scenes)


@pytest.mark.parametrize('after', [False, True])
def test_video_after_question_puts_the_question_before_the_frames(tmp_path, after):
  """`video_after_question`: a short-form first question and every held-out question read
  "Q\n<video>\n<instruction>", so in the built prompt the question's words come before the
  first frame marker; sentence-form first turns, later turns and the default keep the video
  first."""
  from panda_jax.data import text
  p = synthetic.SHORT_ANSWER_PROMPT
  ds = synthetic.make_dataset(str(tmp_path), 12, seed=1, turns=3, short_fraction=0.5,
                              eval_instruction=p, video_after_question=after, **SMALL)
  convs = [e['conversations'] for e in json.load(open(ds.train_instruct))]
  firsts = [c[0]['value'] for c in convs]
  short = [q for q in firsts if q.endswith(p)]
  long = [q for q in firsts if not q.endswith(p)]
  assert short and long
  assert all(q.startswith('<video>\n') and q.count('\n') == 1 for q in long)
  assert all('<video>' not in m['value'] for c in convs for m in c[2:])
  asked = []
  for q in short:  # training: a first turn of the short form
    question = q.split('\n')[0 if after else 1]
    assert q == (f'{question}\n<video>\n{p}' if after else f'<video>\n{question}\n{p}')
    asked.append((question, q))
  qa = json.load(open(ds.eval_qa))
  for e in qa:  # held out: no placeholder by default (the video is put first when decoding)
    question = e['question'].split('\n')[0]
    assert e['question'] == (f'{question}\n<video>\n{p}' if after else f'{question}\n{p}')
    asked.append((question, e['question']))
  for question, q in asked:
    assert question.endswith('?') and '<' not in question
    prompt = text.build_prompt(text.expand_placeholders([(q, None)], 4, insert_missing=True))
    assert prompt.count('<image>') == 4
    assert (prompt.index(question) < prompt.index('<image>')) == after, prompt


def test_name_first_sentences_put_the_deciding_word_right_after_the_name():
  """`name_first`: the at-start and end-position sentence answers begin with the named shape
  and the word that differs between the answers follows the name at once; short answers,
  questions and the other sentences are unchanged."""
  scene = synthetic.random_scene(np.random.default_rng(3), width=112, height=84, fps=1,
                                 duration_s=4.0, num_shapes=2)
  plain = synthetic.questions(scene, np.random.default_rng(0))
  first = synthetic.questions(scene, np.random.default_rng(0), name_first=True)
  assert [{k: v for k, v in q.items() if k != 'sentence'} for q in plain] == [
      {k: v for k, v in q.items() if k != 'sentence'} for q in first]
  by_type = collections.defaultdict(list)
  for p, f in zip(plain, first):
    by_type[p['type']].append((p, f))
  assert {t: len(v) for t, v in by_type.items()} == {
      'direction': 2, 'end_position': 2, 'at_start': 2, 'order': 1}
  for p, f in by_type['direction'] + by_type['order']:
    assert f['sentence'] == p['sentence']
  for sh, (p, f) in zip(scene.shapes, by_type['at_start']):
    assert f['sentence'].startswith(f'The {sh.name} ') and sh.name not in p['sentence']
    after = f['sentence'][len(f'The {sh.name} '):].split()[0]
    # Present on frame 0 or entering later: the word after the name tells them apart.
    assert (p['answer'], after) == (('yes', 'is') if sh.appear == 0 else ('no', 'only'))
  for sh, (p, f) in zip(scene.shapes, by_type['end_position']):
    assert f['sentence'] == f"The {sh.name} ends in the {p['answer']} half."
    assert p['answer'] == synthetic.end_half(scene, sh)


def test_size_sets_the_radius_and_nothing_else():
  kw = dict(width=112, height=84, fps=1, duration_s=4.0, num_shapes=2)
  small = synthetic.random_scene(np.random.default_rng(5), **kw)
  big = synthetic.random_scene(np.random.default_rng(5), size=0.2, **kw)
  assert {s.radius for s in small.shapes} == {8} and {s.radius for s in big.shapes} == {16}
  for a, b in zip(small.shapes, big.shapes):
    assert (a.kind, a.colour, a.direction, a.appear) == (b.kind, b.colour, b.direction, b.appear)
    # Still inside the frame at both ends of its path.
    for x, y in (b.start, b.end):
      assert b.radius <= x <= 112 - b.radius and b.radius <= y <= 84 - b.radius
  frame = synthetic.render_frame(big, 0)
  colour = np.array(synthetic.COLOURS[big.shapes[0].colour])
  painted = (np.abs(frame.astype(int) - colour).sum(-1) < 30).sum()
  painted_small = (np.abs(synthetic.render_frame(small, 0).astype(int) - colour).sum(-1) < 30).sum()
  assert 3 * painted_small < painted < 5 * painted_small      # about 4x the area
  for bad in (0.0, 0.3):
    with pytest.raises(ValueError, match=f'size={bad}'):
      synthetic.random_scene(np.random.default_rng(5), size=bad)


def test_balance_types_draws_each_type_equally_often(tmp_path):
  kw = dict(width=32, height=24, fps=1, duration_s=4.0, max_shapes=2, turns=1,
            short_fraction=1.0)

  def type_counts(root, balance):
    ds = synthetic.make_dataset(str(root), 201, seed=3, eval_fraction=0.005,
                                balance_types=balance, **kw)
    scenes = json.load(open(ds.scenes))
    counts = collections.Counter()
    for e in json.load(open(ds.train_instruct)):
      shapes = scenes[e['id']]['shapes']
      if len(shapes) != 2 or shapes[0]['appear'] == shapes[1]['appear']:
        continue               # one shape, or no "which appears first" to ask
      q = e['conversations'][0]['value']
      counts['order' if q.split('\n')[1].startswith('Which') else
             'at_start' if 'visible' in q else
             'end_position' if 'half' in q else 'direction'] += 1
    return counts, sum(counts.values())

  plain, n = type_counts(tmp_path / 'plain', False)
  balanced, m = type_counts(tmp_path / 'balanced', True)
  # Two shapes: seven questions, one of them "which appears first".
  assert plain['order'] < 0.25 * n
  assert all(abs(balanced[t] / m - 0.25) < 0.1 for t in
             ('order', 'at_start', 'end_position', 'direction'))
  assert balanced['order'] > 1.5 * plain['order']


def test_focus_types_add_one_single_question_per_two_shape_clip_and_change_nothing_else(tmp_path):
  """`focus_types`: every training clip of two shapes gets one more conversation per focus
  type, a single short-form question about one of its shapes with the scene's answer; the
  other conversations, the captions, the held-out questions and the scenes stay as they were."""
  kw = dict(width=32, height=24, fps=1, duration_s=4.0, max_shapes=2, turns=3,
            short_fraction=0.75, balance_types=True, name_first=True, eval_fraction=0.1)
  plain = synthetic.make_dataset(str(tmp_path / 'plain'), 40, seed=5, **kw)
  focus = synthetic.make_dataset(str(tmp_path / 'focus'), 40, seed=5,
                                 focus_types=('at_start', 'direction'), **kw)
  for key in ('train_captions', 'eval_qa', 'scenes'):
    assert _read(getattr(plain, key)) == _read(getattr(focus, key)), key
  scenes = json.load(open(focus.scenes))
  base = json.load(open(plain.train_instruct))
  entries = json.load(open(focus.train_instruct))
  assert [e for e in entries if e['id'] in scenes] == base
  extra = [e for e in entries if e['id'] not in scenes]
  two = [e['id'] for e in base if len(scenes[e['id']]['shapes']) == 2]
  assert 5 <= len(two) < len(base)
  assert sorted(e['id'] for e in extra) == sorted(f'{c}_{t}' for c in two
                                                  for t in ('at_start', 'direction'))
  named = collections.Counter()
  for e in extra:
    clip, kind = e['id'][:len('vid_00000')], e['id'][len('vid_00000_'):]
    (human, gpt) = e['conversations']
    assert e['video'] == f'videos/{clip}.mp4'
    question = human['value']
    assert question.startswith('<video>\n') and question.endswith(
        '?\n' + synthetic.SHORT_ANSWER_PROMPT)
    shapes = [s for s in scenes[clip]['shapes'] if f"the {s['colour']} {s['kind']} " in question]
    assert len(shapes) == 1
    (s,) = shapes
    named[s['appear'] == 0] += 1
    if kind == 'at_start':
      assert 'visible at the start' in question
      assert gpt['value'] == ('yes' if s['appear'] == 0 else 'no')
    else:
      assert question.startswith('<video>\nIn which direction')
      assert gpt['value'] == s['direction']
  assert named[True] > 0 and named[False] > 0          # both shapes get asked about
  assert json.load(open(focus.train_focus)) == extra and plain.train_focus == ''
  # With video_after_question the focus questions put the question before the video, as the
  # held-out questions do; nothing else about them changes.
  after = synthetic.make_dataset(str(tmp_path / 'after'), 40, seed=5, video_after_question=True,
                                 focus_types=('at_start', 'direction'), **kw)
  moved = json.load(open(after.train_focus))
  assert [e['id'] for e in moved] == [e['id'] for e in extra]
  for e, m in zip(extra, moved):
    question = e['conversations'][0]['value'].split('\n')[1]
    assert m['conversations'][0]['value'] == (
        f'{question}\n<video>\n{synthetic.SHORT_ANSWER_PROMPT}')
    assert m['conversations'][1] == e['conversations'][1]
  assert all(q['question'].split('\n')[1] == '<video>' for q in json.load(open(after.eval_qa)))
  with pytest.raises(ValueError, match='focus type'):
    synthetic.make_dataset(str(tmp_path / 'bad'), 4, focus_types=('colour',), **kw)
