"""Evaluation of the trained cascade on the toy world, with no learned judge.

- `prompts`: the world's caption vocabulary parsed (`parse_prompt`) and fixed prompt sets with held-out
  shape/colour/background combinations (`prompt_set`);
- `scorer`: one video read frame by frame against its prompt (`evaluate_video`, `read_back`);
- `aggregate`: per-video rows, means, the quality bar, MLflow metrics and the printed table;
- `references`: the world's own videos as FVD references;
- `tracking`: what an evaluation logs to MLflow;
- `run`: the evaluation stage (`evaluate_cascade`; `evaluate`, the Prefect flow's body);
- `links`: where a prompt is lost before the video stages (`mav evaluate --links`);
- the paper's zero-shot protocols (`mav evaluate --protocol`): `ucf101` (FVD on I3D, IS on C3D), `msrvtt`
  (CLIPSIM, frame FID), on `datasets` (the datasets' own layouts), `generation` (resumable, on Ray actors)
  and `protocols` (checks, feature caches, MLflow);
- `promotion`: the challenger cascade judged after training; `current` moves on evidence.
"""
