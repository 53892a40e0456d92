"""What the README and docs/ show runs today.

Commands: every `python ...`, `python -m ...` and `accelerate launch ...` line of a shell code block and every such
inline code span in README.md and docs/*.md, found anew at each run (a command added to a page is covered without
editing this file). Each entry point must answer `--help` with exit 0 and list every `--key` its commands pass;
where it has a `parse_args(argv)`, each command's own arguments must parse (keys and values checked, nothing runs).
Nothing trains here: the smoke sizes run in the tests of each script.

The README's trainer snippet: its diffusers switch (`disable_adapters()` / `enable_adapters()`) and its peft one
(`disable_adapter()`) run on a tiny SD3 transformer.
"""

import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import test_train_full
import torch

import normguard as ng

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")  # a leading VAR=value of a shell line


def shell_lines(text):
    """The lines of ```bash/sh/console (or unlabelled) blocks, continuation lines joined, and every inline code span
    (one may wrap across lines)."""
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if block.group(1) in ("", "bash", "sh", "shell", "console"):
            yield from block.group(2).replace("\\\n", " ").splitlines()
    outside = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    yield from (span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", outside))


def commands(text):
    """Each command of the page as its words, without leading VAR=value, split at && and ;."""
    for line in shell_lines(text):
        for part in re.split(r"&&|;", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:  # an unbalanced quote: prose, not a command
                continue
            while words and ENV.match(words[0]):
                words = words[1:]
            if words[:1] == ["python"] or words[:2] == ["accelerate", "launch"]:
                yield words


def entry_and_args(words):
    """("-m module" or "path.py", its arguments). `accelerate launch script.py args` runs `python script.py args` in
    each process it starts: the script's command line is what the page shows."""
    rest = words[2:] if words[0] == "accelerate" else words[1:]
    if rest[0] == "-m":
        return f"-m {rest[1]}", rest[2:]
    script = next(w for w in rest if w.endswith(".py"))
    return script, rest[rest.index(script) + 1 :]


def by_entry(found):
    """{entry point: [(page, its arguments)]} of the (page, command) pairs found."""
    out = {}
    for page, command in found:
        entry, args = entry_and_args(shlex.split(command))
        out.setdefault(entry, []).append((page, args))
    return out


ALL = sorted({(page.name, " ".join(words)) for page in PAGES for words in commands(page.read_text())})
BY_ENTRY = by_entry(ALL)


def test_the_pages_show_the_commands_this_test_expects_to_find():
    """The extraction itself: the README's tiers and the reports' commands are found (a broken pattern would find
    none and pass every test below)."""
    entries = set(BY_ENTRY)
    assert {"-m experiments.toy", "-m experiments.digits", "train_full.py", "bench/gpu_runbook.py"} <= entries
    assert len(ALL) >= 20


@pytest.mark.parametrize("entry", sorted(BY_ENTRY))
def test_each_entry_point_answers_help_and_lists_every_key_its_commands_pass(entry):
    done = subprocess.run(
        [sys.executable, *entry.split(), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"python {entry} --help: exit {done.returncode}\n{done.stderr[-2000:]}"
    for page, args in BY_ENTRY[entry]:
        for arg in args:
            key = arg.split("=")[0]
            if key.startswith("--"):
                assert re.search(rf"(^|\s){re.escape(key)}(=|\s|,|$)", done.stdout, re.M), (page, entry, key)


def parser_of(entry):
    """The entry point's parse_args, or None: a script without one, or not of this repo (pytest), is checked by
    --help alone."""
    path = ROOT / (entry[3:].replace(".", "/") + ".py" if entry.startswith("-m ") else entry)
    if not path.is_file():
        return None
    if entry.startswith("-m "):
        module = importlib.import_module(entry[3:])
    else:
        spec = importlib.util.spec_from_file_location(Path(entry).stem, ROOT / entry)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return getattr(module, "parse_args", None)


@pytest.mark.parametrize("page, command", ALL)
def test_each_command_parses_as_written(page, command):
    """Keys and values as the script's own parser checks them, before anything loads or trains. A command that
    needs a GPU this machine lacks counts as checked when its parser refuses for that reason alone."""
    entry, args = entry_and_args(shlex.split(command))
    parse = parser_of(entry)
    if parse is None:
        return
    try:
        parse(args)
    except ValueError as e:
        if torch.cuda.is_available() or "GPU" not in str(e):
            raise AssertionError(f"{page}: {command}\n{e}") from None


# ---------------------------------------------------------------------------------------------------------------
# the README's "Put NormGuard in your trainer" snippet


def readme_python_blocks():
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def tiny_sd3():
    """The tests' tiny SD3 transformer, frozen, and its inputs: x_t (2, 4, 8, 8), t (2,), cond (encoder states,
    pooled projections)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**test_train_full.TINY_SD3).requires_grad_(False)
    cond = dict(encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 32))
    return transformer, torch.randn(2, 4, 8, 8), torch.rand(2), cond


def nonzero_lora(model):
    """LoRA's B starts at 0 (the adapter a no-op); drawn here, so that switching it off changes the velocity."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)


def test_the_readme_snippets_diffusers_switch_gives_the_reference_velocity():
    """The README's diffusers block, run as written on a transformer given its LoRA by add_adapter: v_ref is the
    velocity without the LoRA (the frozen reference), and the adapter is on again afterwards."""
    from peft import LoraConfig

    block = next(b for b in readme_python_blocks() if "disable_adapters()" in b)
    transformer, x_t, t, cond = tiny_sd3()
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    nonzero_lora(transformer)
    scope = dict(torch=torch, ng=ng, transformer=transformer, x_t=x_t, t=t, cond=cond)
    exec(block, scope)
    velocity = lambda: transformer(hidden_states=x_t, timestep=ng.TIMESTEP_SCALE * t, **cond, return_dict=False)[0]
    with torch.no_grad():
        v_lora = velocity()
        transformer.disable_adapters()
        v_base = velocity()
        transformer.enable_adapters()
    assert torch.equal(scope["v_ref"], v_base) and not scope["v_ref"].requires_grad
    assert not torch.allclose(v_lora, v_base) and torch.equal(velocity().detach(), v_lora)  # the LoRA is back on


def test_the_readme_snippets_peft_path_trains_the_lora_against_the_adapterless_reference():
    """The README's first block, run as written with `model` a peft get_peft_model wrapper of the same transformer:
    it backpropagates base loss + hinge into the LoRA only, with v_ref the velocity without the adapter."""
    from peft import LoraConfig, get_peft_model

    block = next(b for b in readme_python_blocks() if "disable_adapter()" in b)
    transformer, x_t, t, cond = tiny_sd3()

    class Velocity(torch.nn.Module):  # the call shape the snippet uses: model(x_t, 1000 t, cond)
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, x, timestep, cond):
            return self.transformer(hidden_states=x, timestep=timestep, **cond, return_dict=False)[0]

    model = get_peft_model(Velocity(transformer), LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    nonzero_lora(model)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t, _ = ng.forward_process(x0, eps, t)
    scope = dict(torch=torch, model=model, x_t=x_t, t=t, cond=cond, x0=x0, lam=1.0)
    scope.update(v_old=model(x_t, ng.TIMESTEP_SCALE * t, cond).detach(), advantages=torch.tensor([1.0, -1.0]))
    exec(block, scope)
    with torch.no_grad(), model.disable_adapter():
        v_base = model(x_t, ng.TIMESTEP_SCALE * t, cond)
    assert torch.equal(scope["v_ref"], v_base) and not torch.allclose(scope["v"], v_base)
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in name and g is not None for name, g in grads.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_readme_bare_hinge_is_the_cores_hinge_bit_for_bit(dtype):
    """The README says its plain-torch hinge returns exactly ng.normguard_penalty(v, v_ref, lam=lam)[0], value and
    gradient, for v and v_ref of one dtype: the same operations in the same order, so equal to the last bit."""
    block = next(b for b in readme_python_blocks() if "def normguard_hinge" in b)
    scope = {}
    exec(block, scope)
    gen = torch.Generator().manual_seed(0)
    v_ref = torch.randn(6, 4, 8, 8, generator=gen).to(dtype)
    v = (v_ref.float() * torch.linspace(0.8, 1.3, 6)[:, None, None, None]).to(dtype)  # half above the reference
    grads = []
    for hinge in (
        lambda a, b: scope["normguard_hinge"](a, b, lam=0.7),
        lambda a, b: ng.normguard_penalty(a, b, lam=0.7)[0],
    ):
        leaf = v.clone().requires_grad_(True)
        value = hinge(leaf, v_ref)
        value.backward()
        grads.append((value.detach(), leaf.grad))
    (ours, our_grad), (core, core_grad) = grads
    assert core > 0 and torch.equal(ours, core) and torch.equal(our_grad, core_grad)


# ---------------------------------------------------------------------------------------------------------------
# links between the pages


def anchors(text):
    """GitHub's heading anchors: lower case, every character but letters, digits, spaces, - and _ dropped, spaces
    to -; a repeated heading gets -1, -2, ..."""
    seen, out = {}, set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M):
        slug = "".join(c for c in heading.lower() if c.isalnum() or c in " -_").replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    """A moved section or file leaves no dead link: each `[text](path#anchor)` names a file of the checkout and, with
    an anchor, a heading of that file."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), (page.name, target)
        if anchor:
            assert anchor in anchors(file.read_text()), (page.name, target)
