"""The paper's method on a tiny SD-shaped pipeline: what it changes, what it must never change."""

import pytest
import torch

from conftest import tiny_spec
from sculpt.erase import erase
from sculpt.methods.sculpting import Sculpting, SculptingConfig
from sculpt.models.loading import cross_attention_params
from sculpt.patch import load_patch


def _state(pipe):
    return {n: p.detach().clone() for n, p in pipe.unet.state_dict().items()}


def test_only_cross_attention_changes(tmp_path, tiny_pipe):
    before = _state(tiny_pipe)
    result = erase(tiny_spec(tmp_path), pipe=tiny_pipe, progress=False)
    after = _state(tiny_pipe)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the erasure changed nothing"
    assert all(".attn2." in n for n in changed), sorted(n for n in changed if ".attn2." not in n)
    assert {f"unet.{n}" for n in changed} == set(result.patch.tensors)


def test_weights_outside_the_mask_and_inside_the_freeze_mask_stay_bit_identical(tmp_path, tiny_pipe):
    method = Sculpting(SculptingConfig(lr=1e-2, epochs=2, steps_per_epoch=6, warmup_steps=2,
                                       mask_update_every=3, freeze_fraction=0.1))
    cfg = tiny_spec(tmp_path)
    from sculpt import erase as erase_mod

    # Run stage by stage through the public loop, watching the method between stages.
    orig_fit = method.fit_stage
    seen = []

    def fit(ctx):
        start = {n: p.detach().clone() for n, p in cross_attention_params(ctx.unet, biases=False).items()}
        frozen_before = {n: m.clone() for n, m in method.frozen.items()}
        out = orig_fit(ctx)
        seen.append((start, frozen_before, method.last_mask))
        return out

    method.fit_stage = fit
    real_get = erase_mod.get_method
    erase_mod.get_method = lambda name: (lambda config: method)
    try:
        erase(cfg, pipe=tiny_pipe, progress=False)
    finally:
        erase_mod.get_method = real_get

    weights = cross_attention_params(tiny_pipe.unet, biases=False)
    # Stage 2's start is stage 1's end; stage 2's end is the final model.
    ends = [seen[1][0], {n: p.detach() for n, p in weights.items()}]
    for (start, frozen_before, mask), end in zip(seen, ends):
        for n in weights:
            untouched = ~mask.ever_active[n]
            assert torch.equal(start[n][untouched], end[n][untouched]), f"{n} moved outside the mask"
            if n in frozen_before:
                f = frozen_before[n]
                assert torch.equal(start[n][f], end[n][f]), f"{n} moved inside the freeze mask"
    # and the freeze mask was really in use in stage 2
    assert sum(int(m.sum()) for m in seen[1][1].values()) > 0


def _second_stage(pipe, tmp_path, accelerator=None):
    """A StageContext for the second stage (car, after cat) of the tiny spec, and its data."""
    from accelerate import Accelerator
    from sculpt.data.prepare import prepare_concept_data
    from sculpt.models.loading import model_hash
    from sculpt.stage import StageContext

    cfg = tiny_spec(tmp_path)
    h = model_hash(pipe)
    data = [prepare_concept_data(pipe, c, cfg.data, 0, tmp_path / "cache", h) for c in cfg.concepts]
    ctx = StageContext(pipe=pipe, accelerator=accelerator or Accelerator(cpu=True), index=1, concepts=[data[1]],
                       previous=[data[0]], seed=0)
    return ctx, data


def _kd_grads(pipe, tmp_path, lambda_kd, lambda_align=0.25, with_data=False):
    """Gradient of one step's loss, student moved away from the teacher, with fixed randomness."""
    ctx, data = _second_stage(pipe, tmp_path)
    terms, grads = _step_grads(pipe, ctx, Sculpting(SculptingConfig(lambda_kd=lambda_kd, lambda_align=lambda_align)))
    return (terms, grads, data) if with_data else (terms, grads)


def _step_grads(pipe, ctx, method, move=0.05):
    """The loss terms and gradient of one step of `method` with the student moved `move` (Gaussian)
    from the stage-start teacher; the weights are put back afterwards."""
    params = cross_attention_params(pipe.unet)
    teacher = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(move * torch.randn_like(p))
    pipe.unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    terms = method.losses(ctx, pipe.unet, teacher)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(teacher[n])
    return terms, grads


def test_distillation_changes_the_gradient(tmp_path, tiny_pipe):
    on_terms, on = _kd_grads(tiny_pipe, tmp_path, 0.25)
    off_terms, off = _kd_grads(tiny_pipe, tmp_path, 0.0)
    assert on_terms["L_kd"] > 0 and off_terms["L_kd"] == 0
    torch.testing.assert_close(on_terms["L_f"], off_terms["L_f"])  # same randomness, same L_f
    assert any(not torch.allclose(on[n], off[n]) for n in on)


def test_simultaneous_mode_is_one_stage_that_trains_on_every_concept(tmp_path, tiny_pipe, monkeypatch):
    from sculpt.stage import StageContext

    drawn = []
    real = StageContext.concept_batch

    def concept_batch(self, n, data=None, replace=True):
        x, c, s = real(self, n, data, replace)
        drawn.append((self.index, [d.name for d in (data if data is not None else self.concepts)], c))
        return x, c, s

    monkeypatch.setattr(StageContext, "concept_batch", concept_batch)
    result = erase(tiny_spec(tmp_path, mode="simultaneous"), pipe=tiny_pipe, progress=False)
    assert len(result.stages) == 1 and result.stages[0]["concepts"] == ["cat", "car"]
    assert load_patch(result.patch_path).concepts == ["cat", "car"]
    # One stage, nothing "earlier", and the concept batches hold both concepts' prompts.
    assert {i for i, _, _ in drawn} == {0} and all(names == ["cat", "car"] for _, names, _ in drawn)
    prompts = torch.cat([c for _, _, c in drawn])
    distinct = torch.unique(prompts.flatten(1), dim=0)
    assert len(distinct) >= 3  # cat, car and its synonym "automobile"


def test_sequential_writes_one_cumulative_patch_per_stage(tmp_path, tiny_pipe):
    result = erase(tiny_spec(tmp_path), pipe=tiny_pipe, progress=False)
    stages = sorted((result.output / "stages").glob("*.safetensors"))
    assert [p.name for p in stages] == ["01-cat.safetensors", "02-car.safetensors"]
    assert load_patch(stages[0]).concepts == ["cat"]
    assert load_patch(stages[1]).concepts == ["cat", "car"]
    assert result.stages[1]["frozen_share"] > result.stages[0]["frozen_share"] > 0
    lines = (result.output / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 12  # one record per optimisation step


def test_reference_mode_freezes_nothing(tmp_path, tiny_pipe):
    result = erase(tiny_spec(tmp_path, method={"reference": True}), pipe=tiny_pipe, progress=False)
    assert all(s["frozen_share"] == 0 for s in result.stages)
    import json
    kd = [json.loads(l)["L_kd"] for l in (result.output / "metrics.jsonl").read_text().splitlines()]
    assert all(v == 0 for v in kd)


def test_same_seed_same_patch(tmp_path):
    from sculpt.models.tiny import tiny_pipeline

    a = erase(tiny_spec(tmp_path / "a"), pipe=tiny_pipeline(), progress=False).patch
    b = erase(tiny_spec(tmp_path / "b"), pipe=tiny_pipeline(), progress=False).patch
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path, tiny_pipe):
    from sculpt.config import TrainConfig

    cfg = tiny_spec(tmp_path, concepts=[{"name": "cat", "superclass": "animal"}])
    cfg.train = TrainConfig(mixed_precision="bf16", gradient_checkpointing=True)
    before = _state(tiny_pipe)
    seen = []  # (dtype of a cross-attention output, checkpointing on) while training
    to_q = next(m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2.to_q"))
    hook = to_q.register_forward_hook(lambda m, i, o: seen.append(
        (o.dtype, tiny_pipe.unet.is_gradient_checkpointing)) if torch.is_grad_enabled() else None)
    try:
        result = erase(cfg, pipe=tiny_pipe, progress=False)
    finally:
        hook.remove()
    assert seen and all(dtype == torch.bfloat16 and ckpt for dtype, ckpt in seen)
    assert result.patch.tensors and all(".attn2." in k for k in result.patch.tensors)
    assert all(t.dtype == before[k.removeprefix("unet.")].dtype for k, t in result.patch.tensors.items())


def _run_with(method, cfg, pipe, monkeypatch):
    """erase() with this method instance (to watch or steer it from the test)."""
    from sculpt import erase as erase_mod

    monkeypatch.setattr(erase_mod, "get_method", lambda name: (lambda config: method))
    return erase(cfg, pipe=pipe, progress=False)


def test_the_stage_ends_on_the_weights_of_its_best_epoch_not_its_last(tmp_path, tiny_pipe, monkeypatch):
    """Epoch 1 of 3 is made the best by its logged L_f (the gradient is untouched): the stage must
    end with the weights it had at the end of epoch 1."""
    cfg = tiny_spec(tmp_path, concepts=[{"name": "cat", "superclass": "animal"}])
    method = Sculpting(SculptingConfig(lr=1e-2, epochs=3, steps_per_epoch=4, warmup_steps=2, mask_update_every=4))
    real_losses, calls, at_epoch_end = method.losses, [0], []

    def losses(ctx, model, teacher):
        terms = real_losses(ctx, model, teacher)
        epoch = calls[0] // 4
        calls[0] += 1
        terms["L_f"] = terms["L_f"].detach() + (0.0 if epoch == 1 else 10.0)  # logged only: loss is computed
        return terms

    def on_step(record):
        if record["step"] % 4 == 0:
            at_epoch_end.append({n: p.detach().clone() for n, p in cross_attention_params(tiny_pipe.unet).items()})

    method.losses = losses
    real_fit = method.fit_stage

    def fit(ctx):
        ctx.on_step = on_step
        return real_fit(ctx)

    method.fit_stage = fit
    result = _run_with(method, cfg, tiny_pipe, monkeypatch)
    assert result.stages[0]["best_epoch"] == 1
    final = cross_attention_params(tiny_pipe.unet)
    assert all(torch.equal(final[n], at_epoch_end[1][n]) for n in final)
    assert any(not torch.equal(final[n], at_epoch_end[2][n]) for n in final)  # the last epoch did move on


def test_distillation_reads_a_frozen_teacher_inside_the_stage(tmp_path, tiny_pipe):
    """L_kd compares the student with the weights of the stage's start: once the student moves it is
    positive (a teacher that follows the live weights would keep it at exactly 0)."""
    import json

    result = erase(tiny_spec(tmp_path), pipe=tiny_pipe, progress=False)
    records = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    for stage in (0, 1):
        kd = [r["L_kd"] for r in records if r["stage"] == stage]
        assert kd[0] < max(kd[1:]) and max(kd) > 0, (stage, kd)


def test_the_mask_inside_a_real_stage_follows_its_rules(tmp_path, tiny_pipe, monkeypatch):
    """Watched through a whole stage: the initial mask is the top p of the warm-up importance; at every
    drop/grow the inactive entries carry importance (gathered before the gradient is masked, or they
    could never be chosen); an entry dropped and never grown back keeps its value to the end of the
    stage (its Adam moments were zeroed when it was dropped)."""
    from sculpt.methods.dynamic_mask import DynamicMask

    events = []
    real_init, real_update = DynamicMask.initialise, DynamicMask.update

    def initialise(self):
        imp = {n: v.clone() for n, v in self.importance.items()}
        real_init(self)
        events.append(("init", imp, {n: a.clone() for n, a in self.active.items()}))

    def update(self, tau):
        imp = {n: v.clone() for n, v in self.importance.items()}
        inactive = {n: (~a & ~self.frozen[n]).clone() for n, a in self.active.items()}
        turnover, dropped = real_update(self, tau)
        values = {n: p.detach().clone() for n, p in self.params.items()}
        events.append(("update", imp, inactive, dropped, {n: a.clone() for n, a in self.active.items()}, values))
        return turnover, dropped

    monkeypatch.setattr(DynamicMask, "initialise", initialise)
    monkeypatch.setattr(DynamicMask, "update", update)
    cfg = tiny_spec(tmp_path, concepts=[{"name": "cat", "superclass": "animal"}])
    method = Sculpting(SculptingConfig(lr=1e-2, epochs=3, steps_per_epoch=8, warmup_steps=3, mask_update_every=4,
                                       drop_ratio=0.3, mask_update_stop=1.0, select_best_epoch=False))
    _run_with(method, cfg, tiny_pipe, monkeypatch)
    weights = cross_attention_params(tiny_pipe.unet, biases=False)

    _, imp, active = events[0]
    for n in weights:
        assert imp[n].sum() > 0, f"{n}: no warm-up importance"
        assert imp[n][active[n]].min() >= imp[n][~active[n]].max(), f"{n}: initial mask is not the top p"
    updates = [e for e in events if e[0] == "update"]
    assert len(updates) == 6
    for _, imp, inactive, _, _, _ in updates:
        assert all(imp[n][inactive[n]].sum() > 0 for n in weights), "inactive entries gathered no importance"
    stayed_out_total = 0
    for k, (_, _, _, dropped, _, values) in enumerate(updates):
        for n in weights:
            out = dropped[n].clone()
            for later in updates[k + 1:]:
                out &= ~later[4][n]
            stayed_out_total += int(out.sum())
            assert torch.equal(weights[n].detach()[out], values[n][out]), f"{n}: a dropped entry kept moving"
    assert stayed_out_total > 0


def test_each_loss_term_reads_what_the_paper_says(tmp_path, tiny_pipe, monkeypatch):
    """In one step of a second stage: the forget target is the model's own prediction under the
    superclass prompt, without gradient (stop-gradient); the distillation teacher sees the superclass
    images and the earlier concept's images under its own prompts; L_a and L_kd both shape the gradient."""
    from sculpt.stage import StageContext

    calls = []
    real_predict, real_with = StageContext.predict, StageContext.predict_with
    monkeypatch.setattr(StageContext, "predict", lambda self, model, x, t, emb: (
        lambda out: (calls.append(("student", out.requires_grad, emb.detach().clone())), out)[1])(
        real_predict(self, model, x, t, emb)))
    monkeypatch.setattr(StageContext, "predict_with", lambda self, w, x, t, emb: (
        calls.append(("teacher", False, emb.detach().clone())), real_with(self, w, x, t, emb))[1])
    terms, grads, data = _kd_grads(tiny_pipe, tmp_path, 0.25, with_data=True)
    (who0, grad0, emb0), (who1, grad1, emb1), (who2, _, emb2) = calls
    B = SculptingConfig().batch_size
    assert (who0, grad0) == ("student", True) and len(emb0) == 3 * B  # concept, superclass, earlier concept
    assert (who1, grad1) == ("student", False)  # sg[eps(x_c, t; s)]
    assert all(torch.equal(e, data[1].anchor_embeds[0]) for e in emb1)  # ... under the superclass prompt
    assert who2 == "teacher" and len(emb2) == 2 * B
    earlier = {tuple(e.flatten().tolist()[:8]) for e in data[0].prompt_embeds}
    assert all(tuple(e.flatten().tolist()[:8]) in earlier for e in emb2[B:])  # the earlier concept's prompts

    _, no_align, _ = _kd_grads(tiny_pipe, tmp_path, 0.25, lambda_align=0.0, with_data=True)
    assert any(not torch.allclose(grads[n], no_align[n]) for n in grads)


def test_each_sample_has_its_own_timestep_shared_by_its_concept_superclass_and_earlier_batches(tmp_path, tiny_pipe,
                                                                                              monkeypatch):
    """As the authors' script pairs its batches: item i of the concept, superclass and earlier-concept
    batches is noised at the same t_i, and the t_i differ; the forget target and the teacher see the
    same t; the warm-up draws one t per sample too."""
    from sculpt.stage import StageContext

    ctx, _ = _second_stage(tiny_pipe, tmp_path)
    seen = []
    real_predict, real_with = StageContext.predict, StageContext.predict_with
    monkeypatch.setattr(StageContext, "predict", lambda self, m, x, t, e: (seen.append(t.clone()), real_predict(
        self, m, x, t, e))[1])
    monkeypatch.setattr(StageContext, "predict_with", lambda self, w, x, t, e: (seen.append(t.clone()), real_with(
        self, w, x, t, e))[1])
    B = 8
    method = Sculpting(SculptingConfig(batch_size=B))
    params = cross_attention_params(tiny_pipe.unet)
    method.losses(ctx, tiny_pipe.unet, {n: p.detach().clone() for n, p in params.items()})
    student, target, teacher = seen
    t = student[:B]
    assert len(set(t.tolist())) > 1, "one timestep for the whole batch"
    assert torch.equal(student, t.repeat(3)) and torch.equal(target, t) and torch.equal(teacher, t.repeat(2))
    seen.clear()
    method.warmup_loss(ctx, tiny_pipe.unet)
    assert len(seen[0]) == B and len(set(seen[0].tolist())) > 1


def test_an_epoch_sees_every_image_once(tmp_path, tiny_pipe, monkeypatch):
    """Images are drawn without replacement: n_images / B steps show each concept image and each
    superclass image exactly once (the authors' shuffled DataLoader; an epoch is a pass over the data)."""
    from sculpt.stage import StageContext

    ctx, data = _second_stage(tiny_pipe, tmp_path)
    drawn = {"concept": [], "anchor": []}
    real_c, real_a = StageContext.concept_batch, StageContext.anchor_batch

    def concept_batch(self, n, d=None, replace=True):
        out = real_c(self, n, d, replace)
        if d is None:
            drawn["concept"].append(out[0])
        return out

    def anchor_batch(self, n, d=None, replace=True):
        out = real_a(self, n, d, replace)
        drawn["anchor"].append(out[0])
        return out

    monkeypatch.setattr(StageContext, "concept_batch", concept_batch)
    monkeypatch.setattr(StageContext, "anchor_batch", anchor_batch)
    B, n = 2, len(data[1].latents)
    method = Sculpting(SculptingConfig(batch_size=B))
    teacher = {k: p.detach().clone() for k, p in cross_attention_params(tiny_pipe.unet).items()}
    with torch.no_grad():
        for _ in range(n // B):
            method.losses(ctx, tiny_pipe.unet, teacher)
    for kind, images in (("concept", data[1].latents), ("anchor", data[1].anchor_latents)):
        got = torch.cat(drawn[kind])
        assert len(got) == n
        assert all(int((got == images[i]).flatten(1).all(1).sum()) == 1 for i in range(n)), kind


def test_the_turnover_decays_per_epoch_as_published():
    """Published settings (E=10, S=50, W=50, K=100, tau_0=0.2): after optimiser steps 100..400 (epochs
    1, 3, 5, 7) tau = 0.195, 0.159, 0.100, 0.041; nothing from epoch 8 on. The authors' script
    (reference) counts the warm-up as the first 50 of its 500 steps: 450 optimiser steps, same taus."""
    from sculpt.methods.sculpting import stage_schedule

    paper = stage_schedule(SculptingConfig())
    assert [t.warmup for t in paper[:51]] == [True] * 50 + [False] and len(paper) == 550
    updates = [(i - 50 + 1, round(t.tau, 3)) for i, t in enumerate(paper) if t.tau is not None]
    assert updates == [(100, 0.195), (200, 0.159), (300, 0.1), (400, 0.041)]
    authors = stage_schedule(SculptingConfig(reference=True))
    assert len(authors) == 500 and sum(not t.warmup for t in authors) == 450 and all(t.warmup for t in authors[:50])
    assert [(i + 1, round(t.tau, 3)) for i, t in enumerate(authors) if t.tau is not None] == updates
    assert [t.epoch for t in authors[:50]] == [0] * 50  # the warm-up is epoch 0


def test_a_real_stage_turns_the_mask_over_on_schedule(tmp_path, tiny_pipe, monkeypatch):
    """The loop follows stage_schedule: drop/grow after exactly the scheduled optimiser steps, with the
    scheduled tau; the reference mode takes E*S - W optimiser steps."""
    from sculpt.methods.dynamic_mask import DynamicMask
    from sculpt.methods.sculpting import stage_schedule

    real_update = DynamicMask.update
    for reference in (False, True):
        steps, calls = [0], []
        # the update comes after the step, before its record: steps[0] + 1 is that step
        monkeypatch.setattr(DynamicMask, "update", lambda self, tau: (calls.append((steps[0] + 1, tau)),
                                                                      real_update(self, tau))[1])
        cfg = SculptingConfig(lr=1e-3, epochs=5, steps_per_epoch=4, warmup_steps=3, mask_update_every=3,
                              reference=reference)
        method = Sculpting(cfg)
        real_fit = method.fit_stage

        def fit(ctx):
            def on_step(record):
                steps[0] = record["step"]
            ctx.on_step = on_step
            return real_fit(ctx)

        method.fit_stage = fit
        result = _run_with(method, tiny_spec(tmp_path / str(reference), concepts=[{"name": "cat", "superclass": "animal"}]),
                           tiny_pipe, monkeypatch)
        ticks = stage_schedule(cfg)
        optimiser = [i for i, t in enumerate(ticks) if not t.warmup]
        expected = [(optimiser.index(i) + 1, t.tau) for i, t in enumerate(ticks) if t.tau is not None]
        assert calls == expected and len(calls) >= 2, (reference, calls, expected)
        assert result.stages[0]["steps"] == (20 - 3 if reference else 20)


def _fp16_stage(tmp_path, pipe, monkeypatch, overflow_at: int | None, kind: str, zero_instead: bool = False):
    """One stage with fp16-style dynamic loss scaling (a CPU GradScaler in accelerate's place); the
    loss of one warm-up or optimiser step is made infinite (an overflow), or zero (the control)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    ctx, _ = _second_stage(pipe, tmp_path, acc)
    method = Sculpting(SculptingConfig(lr=1e-3, epochs=2, steps_per_epoch=4, warmup_steps=4, mask_update_every=3))
    calls = {"warmup": 0, "train": 0}
    real_warm, real_losses = method.warmup_loss, method.losses

    def poison(x, k):
        if calls[k] == overflow_at and k == kind:
            x = x * 0.0 if zero_instead else x * float("inf")
        calls[k] += 1
        return x

    method.warmup_loss = lambda c, m: poison(real_warm(c, m), "warmup")

    def losses(c, m, t):
        terms = real_losses(c, m, t)
        terms["loss"] = poison(terms["loss"], "train")
        return terms

    method.losses = losses
    seen = []
    real_fit = method.fit_stage
    from sculpt.methods.dynamic_mask import DynamicMask

    real_update = DynamicMask.update
    monkeypatch.setattr(DynamicMask, "update", lambda self, tau: (
        seen.append({n: v.clone() for n, v in self.importance.items()}), real_update(self, tau))[1])
    real_fit(ctx)
    return method, acc, seen


def test_fp16_overflow_steps_leave_the_mask_alone(tmp_path, tiny_pipe, monkeypatch):
    """Under fp16 loss scaling a step whose gradients overflow is skipped by the optimiser; the mask
    must skip it too (inf/NaN importance would be ranked first and those entries grown for good), read
    unscaled gradients, and the warm-up must let the scaler back off. An overflow in the warm-up then
    gives exactly the mask and weights of a run whose step contributed nothing."""
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.state_dict().items()}
    overflow, acc, _ = _fp16_stage(tmp_path / "a", tiny_pipe, monkeypatch, overflow_at=1, kind="warmup")
    assert acc.scaler.get_scale() == 2.0 ** 11  # backed off once
    got = {n: p.detach().clone() for n, p in cross_attention_params(tiny_pipe.unet).items()}
    tiny_pipe.unet.load_state_dict(base)
    control, _, _ = _fp16_stage(tmp_path / "b", tiny_pipe, monkeypatch, overflow_at=1, kind="warmup", zero_instead=True)
    want = cross_attention_params(tiny_pipe.unet)
    assert all(torch.equal(overflow.last_mask.active[n], control.last_mask.active[n]) for n in overflow.last_mask.active)
    assert all(torch.equal(got[n], want[n]) for n in got)
    tiny_pipe.unet.load_state_dict(base)
    _, _, seen = _fp16_stage(tmp_path / "c", tiny_pipe, monkeypatch, overflow_at=1, kind="train")
    assert seen and all(torch.isfinite(imp).all() for s in seen for imp in s.values())
    assert all(torch.isfinite(p).all() for p in cross_attention_params(tiny_pipe.unet).values())


def test_a_run_stacked_on_a_patch_goes_on_as_one_run_over_both_lists(tmp_path, tiny_pipe, monkeypatch):
    """[cat] then [car] stacked on the first run's patch ends with the freeze mask, the distillation set
    and (same seed, same data) the very weights of one run over [cat, car]."""
    seen = []
    real_fit = Sculpting.fit_stage

    def fit(self, ctx):
        seen.append(([d.name for d in ctx.concepts], [d.name for d in ctx.previous], ctx.seed,
                     sum(int(m.sum()) for m in self.frozen.values())))
        return real_fit(self, ctx)

    monkeypatch.setattr(Sculpting, "fit_stage", fit)
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.state_dict().items()}

    def run(name, concepts=None, patches=()):
        tiny_pipe.unet.load_state_dict(base)
        cfg = tiny_spec(tmp_path, concepts=concepts)
        cfg.output, cfg.patches = str(tmp_path / name), [str(p) for p in patches]
        erase(cfg, pipe=tiny_pipe, progress=False)
        return load_patch(tmp_path / name / "patch.safetensors")

    one = run("one")
    seen_one = list(seen)
    one_weights = {n: p.detach().clone() for n, p in cross_attention_params(tiny_pipe.unet).items()}
    cat, car = tiny_spec(tmp_path).concepts
    first = run("first", [cat.model_dump()])
    seen.clear()
    second = run("second", [car.model_dump()], [tmp_path / "first" / "patch.safetensors"])
    assert seen == [seen_one[1]] and seen_one[1][:2] == (["car"], ["cat"])  # same data, distilled set, seed
    assert seen[0][3] > 0  # the freeze mask came along
    assert [e["concept"]["name"] for e in second.metadata["erased"]] == ["cat", "car"]
    assert second.metadata["stages_total"] == 2 and second.concepts == ["car"]
    assert set(second.method_state) == set(one.method_state) and all(
        torch.equal(second.method_state[k], one.method_state[k]) for k in one.method_state)
    assert first.method_state and not all(torch.equal(first.method_state[k], one.method_state[k])
                                          for k in one.method_state)
    final = cross_attention_params(tiny_pipe.unet)
    assert all(torch.equal(final[n], one_weights[n]) for n in final)


def _nb_grads(pipe, tmp_path, lambda_nb, move=0.05):
    """One step's loss and gradient with a neighbour ("dog") in the stage, student moved by `move`."""
    from sculpt.data.prepare import prepare_neighbours
    from sculpt.models.loading import model_hash

    ctx, _ = _second_stage(pipe, tmp_path)
    cfg = tiny_spec(tmp_path)
    ctx.neighbours = list(prepare_neighbours(pipe, ["dog"], cfg.data.model_copy(update={"neighbour_images": 4}), 0,
                                             tmp_path / "cache", model_hash(pipe), progress=False).values())
    return _step_grads(pipe, ctx, Sculpting(SculptingConfig(lambda_nb=lambda_nb)), move)


def test_the_neighbour_term_adds_only_the_neighbours_distillation_gradient(tmp_path, tiny_pipe):
    """L_nb distils the stage-start model on the neighbours' prompts and images: at the stage start it is
    0 and changes no gradient; once the student has moved it adds a gradient, and every other term of
    the step is unchanged by it (its batch is drawn after theirs)."""
    plain, g0 = _nb_grads(tiny_pipe, tmp_path, 0.0)
    with_nb, g1 = _nb_grads(tiny_pipe, tmp_path, 1.0)
    assert float(plain["L_nb"].detach()) == 0 and float(with_nb["L_nb"].detach()) > 0
    for k in ("L_f", "L_a"):
        assert torch.equal(plain[k], with_nb[k]), k
    # the teacher's batch grows by the neighbours' rows: the same numbers up to the kernels' rounding
    assert torch.allclose(plain["L_kd"], with_nb["L_kd"], rtol=1e-5, atol=0)
    assert max((g1[n] - g0[n]).abs().max() for n in g0) > 0
    at_start, g_start = _nb_grads(tiny_pipe, tmp_path, 1.0, move=0.0)
    plain_start, g_plain = _nb_grads(tiny_pipe, tmp_path, 0.0, move=0.0)
    assert float(at_start["L_nb"].detach()) == 0
    assert all(torch.allclose(g_start[n], g_plain[n], atol=1e-7) for n in g_plain)


def test_neighbour_aware_erasure_moves_the_neighbour_less(tmp_path, tiny_pipe):
    """What a user notices: erasing "cat" with "dog" as a neighbour to keep changes the model's
    prediction for "a photo of a dog" less than the same erasure without the term; the ledger names it."""
    import json

    from sculpt.data.prepare import encode_prompts

    base = _state(tiny_pipe)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 300, 500, 700])
    dog = encode_prompts(tiny_pipe, ["a photo of a dog"]).repeat(4, 1, 1)

    def eps():
        with torch.no_grad():
            return tiny_pipe.unet(noise, t, encoder_hidden_states=dog).sample

    before = eps()
    drift = {}
    for lam in (0.0, 20.0):
        tiny_pipe.unet.load_state_dict(base)
        cfg = tiny_spec(tmp_path / str(lam), concepts=[{"name": "cat", "superclass": "animal", "neighbours": ["dog"]}],
                        method={"lambda_nb": lam, "lr": 3e-3})
        erase(cfg, pipe=tiny_pipe, progress=False)
        drift[lam] = (eps() - before).pow(2).mean().item()
        if lam:
            stage = [json.loads(x) for x in open(tmp_path / str(lam) / "run" / "ledger.jsonl")][1]
            assert stage["neighbours"] == {"cat": [["dog", None]]} and "dog" in stage["neighbour_data_keys"]
    assert drift[20.0] < 0.5 * drift[0.0], drift


def test_without_lambda_kd_the_teacher_reads_only_the_neighbours(tmp_path, tiny_pipe, monkeypatch):
    """lambda_kd = 0 switches L_kd off: the teacher's forward pass then covers the neighbours' rows
    alone (no superclass or earlier-concept rows computed for nothing), and L_nb is the same number as
    with the teacher run over every block."""
    from sculpt.data.prepare import prepare_neighbours
    from sculpt.models.loading import model_hash
    from sculpt.stage import StageContext

    rows = []
    real_with = StageContext.predict_with
    monkeypatch.setattr(StageContext, "predict_with", lambda self, w, x, t, e: (rows.append(len(x)),
                                                                                 real_with(self, w, x, t, e))[1])
    ctx, _ = _second_stage(tiny_pipe, tmp_path)
    cfg = tiny_spec(tmp_path)
    ctx.neighbours = list(prepare_neighbours(tiny_pipe, ["dog"], cfg.data.model_copy(update={"neighbour_images": 4}),
                                             0, tmp_path / "cache", model_hash(tiny_pipe), progress=False).values())
    B = SculptingConfig().batch_size
    no_kd, _ = _step_grads(tiny_pipe, ctx, Sculpting(SculptingConfig(lambda_kd=0.0, lambda_nb=1.0)))
    assert rows == [B] and float(no_kd["L_kd"]) == 0
    rows.clear()
    ctx, _ = _second_stage(tiny_pipe, tmp_path)
    ctx.neighbours = list(prepare_neighbours(tiny_pipe, ["dog"], cfg.data.model_copy(update={"neighbour_images": 4}),
                                             0, tmp_path / "cache", model_hash(tiny_pipe), progress=False).values())
    with_kd, _ = _step_grads(tiny_pipe, ctx, Sculpting(SculptingConfig(lambda_kd=0.25, lambda_nb=1.0)))
    assert rows == [3 * B]  # superclass, earlier concept, neighbours
    assert no_kd["L_nb"].item() > 0 and with_kd["L_nb"].item() > 0


def test_warmup_steps_zero_is_refused_with_the_reason(tmp_path):
    """No warm-up means no importance: the first mask would be a block of positions, not a choice."""
    from pydantic import ValidationError

    from sculpt.methods.dynamic_mask import DynamicMask

    with pytest.raises(ValidationError, match="warmup_steps is 0"):
        SculptingConfig(warmup_steps=0)
    SculptingConfig(warmup_steps=0, mask_ratio=1.0)  # no mask to choose: allowed
    w = torch.nn.Parameter(torch.zeros(8, 8))
    mask = DynamicMask({"w": w}, 0.5)
    with pytest.raises(RuntimeError, match="no importance"):
        mask.initialise()


def test_an_fp16_overflow_step_does_not_count_as_a_step(tmp_path, tiny_pipe):
    """A step the loss scaler skips took no optimiser step: the LR schedule, the step count and the
    epoch's L_f must not advance on it. The stage still takes exactly E * S optimiser steps, and the
    learning rates it steps through are those of a run without the overflow."""
    from accelerate import Accelerator

    records = {}
    for overflow_at in (None, 2):
        acc = Accelerator(cpu=True)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        ctx, _ = _second_stage(tiny_pipe, tmp_path / str(overflow_at), acc)
        method = Sculpting(SculptingConfig(lr=1e-3, epochs=2, steps_per_epoch=4, warmup_steps=2, mask_update_every=3))
        calls, steps = [0], []
        real_losses = method.losses

        def losses(c, m, t, real_losses=real_losses, calls=calls, overflow_at=overflow_at):
            terms = real_losses(c, m, t)
            if calls[0] == overflow_at:
                terms["loss"] = terms["loss"] * float("inf")
            calls[0] += 1
            return terms

        method.losses = losses
        ctx.on_step = lambda r, steps=steps: steps.append((r["step"], r["lr"]))
        records[overflow_at] = (steps, method.fit_stage(ctx), calls[0])
    (plain, r0, n0), (skipped, r1, n1) = records[None], records[2]
    assert n1 == n0 + 1  # the overflowed tick was tried again
    assert r1["steps"] == r0["steps"] == 8
    assert [s for s, _ in skipped] == list(range(1, 9))
    assert [lr for _, lr in skipped] == [lr for _, lr in plain]


def test_reference_mode_keeps_adams_moments_on_dropped_entries(tmp_path, tiny_pipe, monkeypatch):
    """The authors' script never resets Adam's state when the mask turns over; the paper's mode zeroes
    the moments of dropped entries so they stop at once. The reference mode must do what the script does."""
    from sculpt.methods import sculpting as sculpting_module

    for reference, want_calls in ((False, True), (True, False)):
        calls = []
        monkeypatch.setattr(sculpting_module, "reset_optimizer_state", lambda *a: calls.append(a))
        ctx, _ = _second_stage(tiny_pipe, tmp_path / str(reference))
        method = Sculpting(SculptingConfig(lr=1e-3, epochs=2, steps_per_epoch=4, warmup_steps=2,
                                           mask_update_every=3, reference=reference))
        method.fit_stage(ctx)
        assert bool(calls) == want_calls, reference


def test_a_stacked_run_keeps_the_neighbours_the_earlier_run_chose(tmp_path, tiny_pipe, monkeypatch):
    """The patch records each erased concept's neighbour rule; a run stacked on it keeps that concept's
    neighbours by its own run's rule (here k = 2), not by the new run's (k = 1)."""
    import sculpt.erase

    # the tiny model's look-alike verdicts are arbitrary (a random UNet): not what this test is about
    monkeypatch.setattr(sculpt.erase, "drop_lookalikes", lambda *args: {})
    seen = []
    real_fit = Sculpting.fit_stage
    monkeypatch.setattr(Sculpting, "fit_stage", lambda self, ctx: (seen.append([n.word for n in ctx.neighbours]),
                                                                   real_fit(self, ctx))[1])
    cat, car = tiny_spec(tmp_path).concepts

    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.state_dict().items()}

    def run(name, concepts, k, patches=()):
        tiny_pipe.unet.load_state_dict(base)
        cfg = tiny_spec(tmp_path, concepts=concepts, method={"neighbours": k})
        cfg.output, cfg.patches = str(tmp_path / name), [str(p) for p in patches]
        erase(cfg, pipe=tiny_pipe, progress=False)
        return load_patch(tmp_path / name / "patch.safetensors")

    first = run("first", [cat.model_dump()], 2)
    kept_for_cat = first.metadata["erased"][0]["neighbours"]
    assert len(kept_for_cat) == 2 and seen[-1] == kept_for_cat
    second = run("second", [car.model_dump()], 1, [tmp_path / "first" / "patch.safetensors"])
    assert seen[-1][:2] == kept_for_cat and len(seen[-1]) == 3  # cat's two, then car's one
    assert second.metadata["erased"][0]["neighbours"] == kept_for_cat
    assert second.metadata["erased"][0]["neighbour_rule"]["k"] == 2
