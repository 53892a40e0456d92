"""The trainer's state on disk: the trainable tensors, the old/EMA policy copy, the step counter; atomic checkpoints
(accelerate's save_state into a temp folder, fsynced, renamed, marked COMPLETE) holding the trainable tensors only,
each stamped with its run's identity; which checkpoint a run may resume, and the logs cut back to it.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from trainer.cli import dumps, write_atomic, write_error


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


def save_checkpoint(accelerator, ckpt_root, step, keep, identity):
    """accelerate's save_state into a temp folder, fsync, then one rename: a killed save leaves only the temp folder,
    which nothing loads. identity.json holds the run identity (`identity`, a dict of config values); COMPLETE
    (written last, inside the temp folder) marks a checkpoint as whole. Keeps the newest `keep` checkpoints."""
    final = ckpt_root / f"checkpoint-{step:07d}"
    tmp = ckpt_root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:  # torch's writer reports a full disk as a RuntimeError ("unexpected pos ...") naming no file
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, e) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomic(tmp / "identity.json", dumps({"hash": identity_hash(identity), "config": identity}, indent=1))
        write_atomic(tmp / "COMPLETE", dumps({"step": step}))
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


def checkpoint_step(path):
    return int(Path(path).name.rsplit("-", 1)[1])


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
            if not all(bool(v.isfinite().all()) for v in named.values()):  # the trainer stops before this; kept
                raise RuntimeError(f"{output_dir}: non-finite trainable weights, not saved")  # as the last line
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


def identity_hash(identity):
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def check_run_folder(ckpt_root, resume, overwrite, identity):
    """The checkpoint to resume, or None for a fresh run; a ValueError before anything loads when a fresh run would
    mix with the checkpoints already in ckpt_root (unless overwrite, which a resume ignores: it removes nothing) or
    when the checkpoint to resume was written under another run identity (the differing keys named)."""
    if not resume:
        found = sorted(p.name for p in Path(ckpt_root).glob("*checkpoint-*"))
        if found and not overwrite:
            raise ValueError(
                f"out_dir: {Path(ckpt_root).parent} holds checkpoints of an earlier run ({', '.join(found[-3:])}); "
                "pass --resume=latest to continue it, --overwrite=true to remove them and start anew, or a new out_dir"
            )
        return None
    path = find_checkpoint(ckpt_root, resume)
    later = [p.name for p in complete_checkpoints(ckpt_root) if checkpoint_step(p) > checkpoint_step(path)]
    if later:  # its saves would interleave with theirs, and a later --resume=latest would pick theirs
        raise ValueError(
            f"resume: {ckpt_root} holds checkpoints after {path.name} ({', '.join(sorted(later))}); resume "
            "the newest (--resume=latest) or copy this one into a new out_dir and resume it there"
        )
    file = path / "identity.json"
    if not file.is_file():
        raise ValueError(f"resume: {path} has no identity.json (not written by this trainer's version); start anew")
    saved, current = json.loads(file.read_text()), json.loads(dumps(identity))  # current: as json reads it back
    saved["config"], current = resolved_model(saved["config"]), resolved_model(current)
    if identity_hash(saved["config"]) != identity_hash(current):
        keys = sorted(set(saved["config"]) | set(current))
        old, new = (tuple(c.get(k, "(absent)") for k in keys) for c in (saved["config"], current))
        diff = [f"{k} {a!r} -> {b!r}" for k, a, b in zip(keys, old, new) if a != b]
        raise ValueError(
            f"resume: {path} was written under another config ({'; '.join(diff)}); resume with the checkpoint's "
            "values or start a fresh run in another out_dir"
        )
    return path


def resolved_model(identity):
    """The identity with its model folder as the folder it resolves to: `PIPE/`, `./PIPE` or a symlink to it name
    the same model (a hub id, or a folder gone since, stays as written)."""
    path = identity.get("pretrained_model_name_or_path")
    if path and os.path.isdir(path):
        return {**identity, "pretrained_model_name_or_path": os.path.realpath(path)}
    return identity


def reject_checkpoint(path):
    """Rename the checkpoint `path` rejected-<name>: kept to inspect, out of --resume's reach (a fresh run into the
    folder still needs --overwrite). Returns the new path."""
    target = Path(path).with_name(f"rejected-{Path(path).name}")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(path, target)
    return target


def check_out_dir(out_dir):
    """Before any weight loads: out_dir is a folder this process can write into (or can create). A ValueError names
    the file in its way (out_dir itself or a parent that is a file) or the folder that refuses a write: a probe file
    is created and removed, so read-only mounts, immutable folders and missing permissions all show here."""
    path = Path(out_dir)
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, a file"
        raise ValueError(f"out_dir: {out_dir} {where}; expected a folder (or a path where one can be made)")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"out_dir: cannot write into {existing} ({e.strerror}); expected a writable folder") from None


def replace_dir(tmp, final):
    """Put the finished folder `tmp` at `final` (a previous one moved aside first, then removed): a kill leaves the
    old folder or the new one whole, never a half-written one under the final name."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


RUN_OUTPUTS = ("checkpoints", "log.jsonl", "evals.jsonl", "metrics.json", "config.json", "lora", "transformer", "eval")


def clear_run(out_dir):
    """--overwrite: remove what a train_full run writes into out_dir (RUN_OUTPUTS), nothing else; the names removed.
    Another process clearing the same folder at once (a second run started into the same out_dir, or the ranks of a
    launch accelerate did not join, which train_full now stops before this) may remove an entry first: what is
    gone counts as removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(out_dir) / name
        if path.exists():
            removed.append(name)
        while path.exists() or path.is_symlink():
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except FileNotFoundError:  # an entry another process removed under our walk: walk what is left
                continue
    return removed


def truncate_jsonl(path, last_step):
    """Keep the records of `path` with step <= last_step (and drop a line a kill cut short); returns them. A resumed
    run thus logs each step once: the steps after its checkpoint are redone and logged again."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", math.inf) <= last_step:
                records.append(record)
    write_atomic(path, "".join(dumps(r) + "\n" for r in records))
    return records
