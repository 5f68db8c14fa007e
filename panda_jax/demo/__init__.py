"""The main job: a tiny Video-Panda that learns video QA on synthetic clips, end to end.

`panda_jax.demo.run.run(config, workdir)` generates the data, trains stages 1 -> 2 -> 3 with
the real training loop, answers the held-out questions with `panda_jax.eval.videoqa`, scores
them judge-free and writes `report.md` with figures (`panda_jax.demo.report`).
"""
