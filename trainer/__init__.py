"""The trainer's parts: model families, rollouts and samplers, evaluation, rewards, checkpoints, the official
recipes and the shared command line. train_full.py (the repo root) is the trainer; nothing here imports it."""
