"""normguard.py under torch.compile, on the meta device and with its value checks switched off.

One compiled training step calls every public tensor function: the hinge, the three base losses (AWM with
and without its options) and the helpers. Compiled with the default settings and with fullgraph=True, in
float32 and bf16, it must give eager's values and eager's gradient of every loss. Before the fix, the hinge at
lam = 1 came back with requires_grad=False under the default compile (inductor returned the loss and its
detached statistic as one tensor), and fullgraph failed on the value checks' host sync.
"""

import pytest
import torch

import normguard as ng

B = 4


def inputs(dtype):
    """Velocities, samples and per-sample tensors of one batch; v and v_l (DPO's loser) carry gradients."""
    g = torch.Generator().manual_seed(0)
    draw = lambda: torch.randn(B, 3, 4, 4, generator=g).to(dtype)
    x0, noise = draw(), draw()
    u = noise - x0
    near = lambda: u + 0.3 * draw()
    kw = dict(x0=x0, noise=noise, u=u, v=near(), v_l=near(), v_old=near(), v_ref=near(), v_ref_l=near())
    kw.update(v_ema=near(), x_t=draw(), u_l=noise - draw())
    kw.update(err=((kw["v"] - u) ** 2).flatten(1).mean(1).float())  # AWM's per-sample error, as a loss gives it
    kw.update(t=torch.tensor([0.1, 0.4, 0.7, 0.95]), adv=torch.tensor([1.5, -0.5, 0.0, 3.0]))
    kw["v"].requires_grad_(True)
    kw["v_l"].requires_grad_(True)
    return kw


def step(x0, noise, u, v, v_l, v_old, v_ref, v_ref_l, v_ema, x_t, u_l, err, t, adv):
    """Every public tensor function once: (losses, other outputs), each a dict of tensors. Nothing is computed
    here outside normguard: inductor fuses bf16 arithmetic without rounding its intermediates to bf16, so a
    bf16 `noise - x_t` here would differ from eager's by bf16's rounding, which the DPO loss amplifies.

    DPO at β = 20, not 2000: z = -(β/2)·gap, and at 2000 the float32 rounding of the errors (1e-7 of each)
    reaches z 1000-fold; any change of summation order shows. That is the loss's conditioning, not compile's."""
    sum_first = dict(loss_type="sum_first", timesteps_per_sample=2, kl_weighting="elbo")
    losses = {
        "hinge": ng.normguard_penalty(v, v_ref, lam=1.0),  # lam = 1: the case that lost its gradient
        "hinge_token": ng.normguard_penalty(v, v_ref, lam=0.5, granularity="token", power=1),
        "nft": ng.nft_loss(v, v_old, v_ref, x_t, x0, t, adv),
        "nft_no_kl": ng.nft_loss(v, v_old, v_ref, x_t, x0, t, adv, kl_weight=0.0),
        "awm": ng.awm_loss(v, v_old, v_ref, u, t, adv, v_ema=v_ema),
        "awm_options": ng.awm_loss(v, v_old, v_ref, u, t, adv[:2].repeat(2), **sum_first),
        "dpo": ng.dpo_loss(v, v_l, v_ref, v_ref_l, u, u_l, beta=20.0),
    }
    others = {
        "forward_process": ng.forward_process(x0, noise, t),
        "velocity_norm": ng.velocity_norm(v),
        "norm_ratio": ng.norm_ratio(v, v_ref),
        "profile": ng.norm_ratio_profile(ng.norm_ratio(v, v_ref), t, num_bins=3),
        "rescale": ng.rescale_to_reference(v, v_ref),
        "advantages": ng.group_advantages(adv, 2),
        "time_weight": ng.awm_time_weight(err, t),
        "kl_weight": ng.awm_kl_weight(t, "elbo"),
        "euler": ng.euler_sample(lambda x, s: -x, noise, ng.flow_timesteps(3, shift=3.0)),
    }
    return losses, others


def flat(outputs):
    """name -> tensor for every tensor in step's outputs (a loss's statistics included)."""
    out = {}
    for group in outputs:
        for name, value in group.items():
            parts = value if isinstance(value, tuple) else (value,)
            for i, part in enumerate(parts):
                items = part.items() if isinstance(part, dict) else [("", part)]
                out.update({f"{name}[{i}]{key}": tensor for key, tensor in items})
    return out


def gradients(losses, kw):
    """The gradient of each loss w.r.t. v and v_l (zeros where it does not reach one)."""
    return {
        name: torch.autograd.grad(loss, [kw["v"], kw["v_l"]], retain_graph=True, materialize_grads=True)
        for name, (loss, _) in losses.items()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_step_gives_eager_values_and_gradients(dtype):
    """Tolerances: the compiled kernels reduce in another order (float32: a few ulps of 1e-7); bf16 inputs are
    upcast, computed in float32 and their gradients rounded once to bf16 on both paths, where a few-ulp float32
    difference can flip that rounding by one bf16 ulp (2^-8 relative): torch's bf16 default tolerance (1.6e-2)."""
    kw = inputs(dtype)
    losses, others = step(**kw)
    want_values, want_grads = flat([losses, others]), gradients(losses, kw)
    for fullgraph in (False, True):
        torch._dynamo.reset()
        got_losses, got_others = torch.compile(step, fullgraph=fullgraph)(**kw)
        assert all(loss.requires_grad for loss, _ in got_losses.values()), {
            name: loss.requires_grad for name, (loss, _) in got_losses.items()
        }
        got_values = flat([got_losses, got_others])
        assert got_values.keys() == want_values.keys()
        for name, want in want_values.items():
            torch.testing.assert_close(got_values[name], want, msg=lambda m, n=name: f"{n}: {m}", equal_nan=True)
        for name, got in gradients(got_losses, kw).items():
            torch.testing.assert_close(got, want_grads[name], msg=lambda m, n=name: f"d {n} / dv: {m}")


def test_the_hinge_alone_keeps_its_gradient_under_compile():
    """The issue's own call: torch.compile of a lambda returning normguard_penalty(..., lam=1.0)[0]."""
    kw = inputs(torch.float32)
    torch._dynamo.reset()
    penalty = torch.compile(lambda: ng.normguard_penalty(kw["v"], kw["v_ref"], lam=1.0)[0])()
    eager = ng.normguard_penalty(kw["v"], kw["v_ref"], lam=1.0)[0]
    assert penalty.requires_grad and penalty.item() == pytest.approx(eager.item(), rel=1e-6)
    (got,), (want,) = torch.autograd.grad(penalty, kw["v"]), torch.autograd.grad(eager, kw["v"])
    torch.testing.assert_close(got, want)


def test_under_compile_the_value_checks_are_skipped_not_raised():
    """The documented contract: a compiled graph does not read values, so a NaN input gives a NaN loss (eager
    raises, naming v), and nothing breaks the graph (fullgraph)."""
    kw = inputs(torch.float32)
    with torch.no_grad():
        kw["v"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^v: expected finite"):
        ng.normguard_penalty(kw["v"], kw["v_ref"])
    torch._dynamo.reset()
    penalty, _ = torch.compile(ng.normguard_penalty, fullgraph=True)(kw["v"], kw["v_ref"])
    assert penalty.isnan()


# --------------------------------------------------------------------------------------------------------------
# meta tensors: shapes only, no value read


def test_every_public_function_runs_on_meta_tensors_shape_only():
    kw = {k: v.detach().to("meta") for k, v in inputs(torch.float32).items()}
    kw["v"].requires_grad_(True)
    kw["v_l"].requires_grad_(True)
    losses, others = step(**kw)
    outputs = flat([losses, others])
    assert all(x.device.type == "meta" for x in outputs.values())
    assert outputs["forward_process[0]"].shape == (B, 3, 4, 4) and outputs["profile[1]"].shape == (3,)
    assert all(loss.shape == () and loss.requires_grad for loss, _ in losses.values())
    grid = ng.flow_timesteps(3, device="meta")
    sensitivity, stats = ng.velocity_scale_sensitivity(
        lambda x, s: -x, lambda x: x.flatten(1).sum(1), kw["noise"], grid
    )
    assert sensitivity.shape == (B, 3) and sensitivity.device.type == "meta" and stats["std"].shape == (3,)


def test_every_public_function_runs_on_fake_tensors_shape_only():
    """FakeTensorMode, what shape inference and deferred initialisation trace with outside torch.compile: the value
    checks would read a value that does not exist (DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        kw = {k: mode.from_tensor(v.detach()) for k, v in inputs(torch.float32).items()}
        kw["v"].requires_grad_(True)
        kw["v_l"].requires_grad_(True)
        losses, others = step(**kw)
    assert all(loss.shape == () and loss.requires_grad for loss, _ in losses.values())
    assert flat([others])["forward_process[1]"].shape == (B, 3, 4, 4)


# --------------------------------------------------------------------------------------------------------------
# the switch for hot loops


def test_value_checks_off_skips_the_sync_and_the_check_and_restores(host_syncs, monkeypatch):
    kw = inputs(torch.float32)
    bad = kw["v"].detach().clone()
    bad[0, 0, 0, 0] = float("nan")
    syncs = host_syncs
    with ng.value_checks(False):
        loss, _ = ng.nft_loss(bad, kw["v_old"], kw["v_ref"], kw["x_t"], kw["x0"], kw["t"], kw["adv"])
        with pytest.raises(ValueError, match="^beta:"):  # hyperparameters are still checked
            ng.nft_loss(bad, kw["v_old"], kw["v_ref"], kw["x_t"], kw["x0"], kw["t"], kw["adv"], beta=0.0)
    assert syncs == []
    monkeypatch.undo()
    assert loss.isnan()
    with pytest.raises(ValueError, match="^v: expected finite"):  # on again after the block
        ng.nft_loss(bad, kw["v_old"], kw["v_ref"], kw["x_t"], kw["x0"], kw["t"], kw["adv"])


def test_value_checks_off_in_one_thread_leaves_another_threads_on():
    """The switch is per thread: a trainer's hot loop in one thread does not silence a check in another."""
    import threading

    kw = inputs(torch.float32)
    bad = kw["v"].detach().clone()
    bad[0, 0, 0, 0] = float("nan")
    call = lambda: ng.nft_loss(bad, kw["v_old"], kw["v_ref"], kw["x_t"], kw["x0"], kw["t"], kw["adv"])
    inside, other, seen = threading.Event(), threading.Event(), {}

    def hot_loop():
        with ng.value_checks(False):
            seen["hot"] = call()[0].isnan().item()
            inside.set()
            other.wait(timeout=30)  # still inside the block while the other thread calls

    def checked():
        inside.wait(timeout=30)
        try:
            call()
        except ValueError as e:
            seen["checked"] = str(e)
        other.set()

    threads = [threading.Thread(target=hot_loop), threading.Thread(target=checked)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen["hot"] and seen["checked"].startswith("v: expected finite")
