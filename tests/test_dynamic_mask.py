"""The Dynamic Mask: importance, density, drop/grow, freezing."""

import torch
from torch import nn

from sculpt.methods.dynamic_mask import DynamicMask, drop_ratio


def _params(seed=0):
    torch.manual_seed(seed)
    return {"a.weight": nn.Parameter(torch.randn(16, 8)), "b.weight": nn.Parameter(torch.randn(8, 8))}


def test_importance_is_sum_of_abs_grads_and_never_aliases():
    params = _params()
    mask = DynamicMask(params, 0.5)
    grads = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(3)]
    for g in grads:
        for n, p in params.items():
            if p.grad is None:
                p.grad = g[n].clone()
            else:
                p.grad.copy_(g[n])  # in-place reuse of the same buffer, as zero_grad(set_to_none=False) does
        mask.accumulate()
    for n in params:
        expected = sum(g[n].abs() for g in grads)
        torch.testing.assert_close(mask.importance[n], expected)
        params[n].grad.mul_(100)  # touching the gradient buffer must not change the importance
        torch.testing.assert_close(mask.importance[n], expected)


def test_reference_importance_is_abs_of_signed_sum():
    params = _params()
    mask = DynamicMask(params, 0.5, signed_importance=True)
    g1 = {n: torch.randn_like(p) for n, p in params.items()}
    for sign in (1, -1):
        for n, p in params.items():
            p.grad = sign * g1[n]
        mask.accumulate()
    assert all(float(mask._scores(n).abs().max()) == 0.0 for n in params)


def test_density_stays_at_p_through_updates_and_frozen_entries_stay_out():
    params = _params()
    frozen = {"a.weight": torch.zeros(16, 8, dtype=torch.bool)}
    frozen["a.weight"][:4] = True  # 32 frozen entries
    mask = DynamicMask(params, 0.5, frozen)
    for n, p in params.items():
        p.grad = torch.randn_like(p)
    mask.accumulate()
    mask.initialise()
    for tau in (0.2, 0.1, 0.05):
        for n, p in params.items():
            p.grad = torch.randn_like(p)
        mask.accumulate()
        before = {n: a.clone() for n, a in mask.active.items()}
        turnover, dropped = mask.update(tau)
        assert int(mask.active["a.weight"].sum()) == round(0.5 * (128 - 32))
        assert int(mask.active["b.weight"].sum()) == 32
        assert not (mask.active["a.weight"] & frozen["a.weight"]).any()
        assert 0 < turnover <= tau + 0.02
        for n in params:  # dropped entries were active and are not any more
            assert (before[n][dropped[n]]).all() and not mask.active[n][dropped[n]].any()


def test_initial_mask_keeps_the_most_important_entries():
    params = _params()
    mask = DynamicMask(params, 0.25)
    for n, p in params.items():
        p.grad = torch.arange(p.numel(), dtype=torch.float32).view_as(p)
    mask.accumulate()
    mask.initialise()
    a = mask.active["a.weight"].flatten()
    assert a[-32:].all() and not a[:-32].any()


def test_drop_ratio_is_cosine():
    assert drop_ratio(0, 100, 0.2) == 0.2
    assert abs(drop_ratio(50, 100, 0.2) - 0.1) < 1e-12
    assert abs(drop_ratio(100, 100, 0.2)) < 1e-12


def test_freeze_after_stage_takes_most_changed_entries():
    params = _params()
    start = {n: p.detach().clone() for n, p in params.items()}
    mask = DynamicMask(params, 0.5)
    with torch.no_grad():
        params["a.weight"][0, :4] += torch.tensor([1.0, 2.0, 3.0, 4.0])
        params["a.weight"][1, 0] += 0.5
    frozen = mask.frozen_after_stage(start, fraction=4 / 128)
    assert frozen["a.weight"][0, :4].all() and int(frozen["a.weight"].sum()) == 4
    assert int(frozen["b.weight"].sum()) == 0  # nothing changed there: nothing frozen
    everything = mask.frozen_after_stage(start, fraction=1.0)
    assert int(everything["a.weight"].sum()) == 5


def test_update_drops_the_least_important_active_and_grows_the_most_important_inactive():
    params = {"w": nn.Parameter(torch.zeros(4, 5))}  # 20 entries
    mask = DynamicMask(params, 0.5)
    params["w"].grad = torch.arange(20, dtype=torch.float32).view(4, 5)
    mask.accumulate()
    mask.initialise()  # active: entries 10..19
    assert mask.active["w"].flatten().nonzero().flatten().tolist() == list(range(10, 20))
    # New importance: active entries 10, 11 least important, inactive 0, 1 most important.
    imp = torch.full((20,), 5.0)
    imp[10], imp[11], imp[0], imp[1] = 0.1, 0.2, 9.0, 8.0
    params["w"].grad = imp.view(4, 5)
    mask.accumulate()
    turnover, dropped = mask.update(0.2)  # 2 of 10 active entries swap
    active = set(mask.active["w"].flatten().nonzero().flatten().tolist())
    assert active == {0, 1} | set(range(12, 20))
    assert set(dropped["w"].flatten().nonzero().flatten().tolist()) == {10, 11}
    assert turnover == 0.2


def test_dropped_entries_stop_moving_at_once_though_adam_has_momentum():
    """After a drop, an entry that is not grown back stays bit-identical: its gradient is masked and
    its Adam moments are zeroed (without the reset, momentum keeps moving it for many steps)."""
    from sculpt.methods.dynamic_mask import reset_optimizer_state

    torch.manual_seed(0)
    params = {"w": nn.Parameter(torch.randn(8, 8))}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    mask = DynamicMask(params, 0.5)

    def step():
        params["w"].grad = torch.randn(8, 8)
        mask.accumulate()
        mask.mask_gradients()
        opt.step()

    params["w"].grad = torch.randn(8, 8)
    mask.accumulate()
    mask.initialise()
    for _ in range(5):
        step()
    _, dropped = mask.update(0.5)
    reset_optimizer_state(opt, params, dropped)
    at_drop = params["w"].detach().clone()
    stayed_out = dropped["w"].clone()
    for _ in range(5):
        step()
        stayed_out &= ~mask.active["w"]
    assert stayed_out.any()
    assert torch.equal(params["w"].detach()[stayed_out], at_drop[stayed_out])


def test_a_parameter_without_gradient_is_an_error_not_dense_training():
    import pytest

    params = _params()
    mask = DynamicMask(params, 0.5)
    params["a.weight"].grad = torch.randn(16, 8)  # b.weight got no gradient: not trained through these objects
    with pytest.raises(RuntimeError, match="b.weight"):
        mask.accumulate()
    params["b.weight"].grad = torch.randn(8, 8)
    mask.accumulate()
    mask.initialise()
    params["b.weight"].grad = None
    with pytest.raises(RuntimeError, match="b.weight"):
        mask.mask_gradients()
