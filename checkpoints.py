"""The trainer's state and its checkpoints: the trainable tensors, the old/EMA policy copy, the step counter, and
atomic checkpoints (accelerate's save_state into a temp folder, fsynced, renamed, marked COMPLETE) holding the
trainable tensors only, not the frozen transformer.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch


def trainable_params(model):
    return [p for p in model.parameters() if p.requires_grad]


class PolicyCopy:
    """A copy of the trainable tensors (the LoRA weights) standing for the old/EMA policy; swapped in for forwards."""

    def __init__(self, params):
        self.params = params
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, decay):
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    def state_dict(self):
        return {"shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state):
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)


class Counter:
    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def save_checkpoint(accelerator, ckpt_root, step, keep):
    """accelerate's save_state into a temp folder, fsync, then one rename: a killed save leaves only the temp folder,
    which nothing loads. COMPLETE (written last, inside the temp folder) marks a checkpoint as whole."""
    final = ckpt_root / f"checkpoint-{step:07d}"
    tmp = ckpt_root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "COMPLETE").write_text(json.dumps({"step": step}))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)  # the rename itself is durable
        for old in sorted(complete_checkpoints(ckpt_root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(ckpt_root):
    return [p for p in Path(ckpt_root).glob("checkpoint-*") if (p / "COMPLETE").is_file()]


def find_checkpoint(ckpt_root, resume):
    """The folder --resume names: the newest complete checkpoint for 'latest', else the folder given."""
    found = sorted(complete_checkpoints(ckpt_root)) if resume == "latest" else [Path(resume)]
    if not found or not (found[-1] / "COMPLETE").is_file():
        raise ValueError(
            f"resume: expected 'latest' with a complete checkpoint under {ckpt_root} or a checkpoint "
            f"folder holding COMPLETE, got {resume!r}"
        )
    return found[-1]


def register_trainable_only_hooks(accelerator):
    """Checkpoints hold the trainable tensors only (the LoRA), not the frozen multi-GB transformer."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for model in models:
            named = accelerator.unwrap_model(model).named_parameters()
            named = {n: p.detach().cpu().contiguous() for n, p in named if p.requires_grad}
            if accelerator.is_main_process:
                save_file(named, os.path.join(output_dir, "trainable.safetensors"))
        weights.clear()  # accelerate would save the whole state dict otherwise

    def load_hook(models, input_dir):
        while models:
            params = dict(accelerator.unwrap_model(models.pop()).named_parameters())
            with torch.no_grad():
                for n, v in load_file(os.path.join(input_dir, "trainable.safetensors")).items():
                    params[n].copy_(v)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
