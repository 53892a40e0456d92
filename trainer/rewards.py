"""Rewards of train_full.py: fn(images (B, C, H, W) in [-1, 1], prompts) -> (B,), by name in a registry that another
file extends with register_reward (experiments/digits_testbed.py registers its classifier), or
`--reward=module:function`.
"""

import importlib

import torch

from trainer.adapters import model_file

REWARDS = {}  # reward name -> build(cfg, device) -> fn(images (B, C, H, W) in [-1, 1], prompts) -> (B,)


def register_reward(name, build):
    """Make `--reward=name` call build(cfg, device), which returns fn(images, prompts) -> (B,) rewards."""
    REWARDS[name] = build


def jpeg_reward(images, prompts):
    """JPEG compressibility: minus the size in kB of each image encoded by Pillow at quality 95 (flow_grpo's reward,
    with its encoder: torchvision's encode_jpeg gives the same bytes but is deprecated and warns at every call)."""
    import io

    from PIL import Image

    u8 = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    sizes = []
    for img in u8.permute(0, 2, 3, 1).numpy():  # (H, W, C) per image, as Pillow takes it
        buffer = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buffer, format="JPEG", quality=95)
        sizes.append(-buffer.tell() / 1000)
    return torch.tensor(sizes, device=images.device)


class PickScore:
    """PickScore: logit_scale · cos(CLIP image, CLIP text), CLIP preprocessing done in torch (224 px, CLIP stats)."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path, device):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.size, self.device = self.model.config.vision_config.image_size, device

    @torch.no_grad()
    def __call__(self, images, prompts):
        x = (images.float() + 1) / 2
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True).clamp(0, 1)
        mean, std = (torch.tensor(c, device=x.device)[:, None, None] for c in (self.MEAN, self.STD))
        x = (x - mean) / std
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=x.to(self.device))
        txt = self.model.get_text_features(**tok)
        # transformers 5 returns output objects whose pooler_output is the projected embedding (4.x: the tensor)
        img, txt = (torch.nn.functional.normalize(getattr(e, "pooler_output", e), dim=-1) for e in (img, txt))
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


register_reward("jpeg", lambda cfg, device: jpeg_reward)
register_reward("pickscore", lambda cfg, device: PickScore(cfg.pickscore_model, device))


def check_reward(cfg, key="reward", name=None):
    """Before the model loads: a registered reward (pickscore: its CLIP folder or hub id answers), or a
    module:function that imports and is callable; a ValueError naming `key` otherwise. name: the reward to check
    (default cfg.reward)."""
    name = cfg.reward if name is None else name
    if name == "pickscore":
        model_file("pickscore_model", cfg.pickscore_model, "config.json", "a CLIPModel folder or hub id")
    if name in REWARDS:
        return
    module, colon, attr = name.partition(":")
    if not (module and colon and attr):
        raise ValueError(f"{key}: expected one of {sorted(REWARDS)} or module:function, got {name!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except Exception as e:  # the user's module may fail in any way on import
        raise ValueError(f"{key}: cannot load {name!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ValueError(f"{key}: expected {name!r} to be a function fn(images, prompts) -> (B,)")


def build_reward(cfg, device, name=None):
    """fn(images, prompts) -> (B,) of the reward `name` (default cfg.reward)."""
    name = cfg.reward if name is None else name
    if name in REWARDS:
        return REWARDS[name](cfg, device)
    module, colon, attr = name.partition(":")
    if not colon:
        raise ValueError(f"reward: expected one of {sorted(REWARDS)} or module:function, got {name!r}")
    return getattr(importlib.import_module(module), attr)


def eval_reward_names(cfg):
    """The held-out rewards of --eval_rewards (comma-separated), each checked like --reward; a ValueError for the
    trained reward (its eval already logs it as reward_full/few) or a name given twice."""
    names = [n.strip() for n in cfg.eval_rewards.split(",") if n.strip()]
    for i, name in enumerate(names):
        if name == cfg.reward:
            raise ValueError(
                f"eval_rewards: {name} is the trained reward (logged as reward_full and reward_few); expected "
                "rewards the run does not train on"
            )
        if name in names[:i]:
            raise ValueError(f"eval_rewards: {name} given twice")
        check_reward(cfg, "eval_rewards", name)
    return names
