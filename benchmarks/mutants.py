"""Would the tests notice if the method broke? Named mutants of the Dynamic Mask, the method's
loss / stage code, the fp16 plumbing and run stacking, each applied alone, with the tests that cover them run against it.

    python benchmarks/mutants.py [--only NAME ...] [--list]

A mutant is killed when at least one test fails with it in place; the score is killed / total. Each
mutant is a small textual edit of src/ (one exact snippet, which must occur once); the file is
restored afterwards whatever happens. Not part of CI: a full run takes a few minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MASK = "src/sculpt/methods/dynamic_mask.py"
METHOD = "src/sculpt/methods/sculpting.py"
STAGE = "src/sculpt/stage.py"
ERASE = "src/sculpt/erase.py"
TESTS = ["tests/test_dynamic_mask.py", "tests/test_sculpting.py"]

# name: (file, original snippet, mutated snippet)
MUTANTS = {
    # the mask
    "importance-signed": (MASK, "self.importance[n] += g if self.signed else g.abs()", "self.importance[n] += g"),
    "importance-not-reset": (MASK, "        for imp in self.importance.values():\n            imp.zero_()",
                             "        for imp in self.importance.values():\n            pass"),
    "init-keeps-least-important": (MASK, "active[scores.topk(self.n_target(n)).indices] = True",
                                   "active[scores.topk(self.n_target(n), largest=False).indices] = True"),
    "init-ignores-freeze": (MASK, "scores = self._scores(n).flatten().masked_fill(self.frozen[n].flatten(), -math.inf)",
                            "scores = self._scores(n).flatten()"),
    "drop-most-important": (MASK, "drop_idx = scores.masked_fill(~active, math.inf).topk(k, largest=False).indices",
                            "drop_idx = scores.masked_fill(~active, -math.inf).topk(k).indices"),
    "grow-least-important": (MASK, "grow_idx = scores.masked_fill(~grow_pool, -math.inf).topk(k).indices",
                             "grow_idx = scores.masked_fill(~grow_pool, math.inf).topk(k, largest=False).indices"),
    "grow-into-frozen": (MASK, "grow_pool = ~active & ~self.frozen[n].flatten()", "grow_pool = ~active"),
    "mask-not-applied": (MASK, "            self._grad(n, p).mul_(self.active[n])", "            self._grad(n, p)"),
    "moments-not-reset": (MASK, "                state[key].masked_fill_(entries[n], 0.0)", "                pass"),
    "freeze-forgets-earlier": (MASK, "out[n] = self.frozen[n] | new.view_as(self.frozen[n])",
                               "out[n] = new.view_as(self.frozen[n])"),
    "freeze-least-changed": (MASK, "new[delta.masked_fill(~changed, -1.0).topk(k).indices] = True",
                             "new[delta.masked_fill(~changed, math.inf).topk(k, largest=False).indices] = True"),
    "grad-none-skipped": (MASK, "        if p.grad is None:\n            # Training",
                          "        if p.grad is None and False:\n            # Training"),
    # the method: loss and stage
    "reset-not-called": (METHOD, "reset_optimizer_state(optimizer, weights, dropped)", "pass"),
    "importance-after-masking": (METHOD,
                                 "    mask.accumulate()  # on the full gradient: inactive entries need importance to grow\n"
                                 "                mask.mask_gradients()",
                                 "    pass\n                mask.mask_gradients()\n                mask.accumulate()"),
    "importance-stops-early": (METHOD, "if i <= last_read and", "if i <= last_read - cfg.mask_update_every and"),
    "last-epoch-kept": (METHOD, 'if not cfg.select_best_epoch or epoch_lf < best["L_f"]:', "if True:"),
    "live-teacher": (METHOD, "teacher = {n: p.detach().clone() for n, p in params.items()}",
                     "teacher = {n: p.detach() for n, p in params.items()}"),
    "no-stop-gradient": (METHOD, "        with torch.no_grad():\n            target_f = ctx.predict(",
                         "        if True:\n            target_f = ctx.predict("),
    "no-align-term": (METHOD, 'cfg.lambda_align * out["L_a"]', '0.0 * out["L_a"]'),
    "no-kd-term": (METHOD, 'cfg.lambda_kd * out["L_kd"]', '0.0 * out["L_kd"]'),
    "kd-skips-earlier-concepts": (METHOD, "if use_kd and ctx.previous:", "if False:"),
    "concept-maps-to-itself": (METHOD, "target_f = ctx.predict(model, xt_c, t, s_c)",
                               "target_f = ctx.predict(model, xt_c, t, c)"),
    "no-freeze-after-stage": (METHOD, "self.frozen = {n: m.cpu() for n, m in mask.frozen_after_stage(teacher, cfg.freeze_fraction).items()}",
                              "self.frozen = {}"),
    "no-warmup-importance": (METHOD, "                if ctx.unscale_gradients(optimizer):\n                    mask.accumulate()",
                             "                if ctx.unscale_gradients(optimizer):\n                    pass"),
    # timesteps, sampling, schedule (issue 11)
    "one-timestep-per-step": (METHOD, "t = ctx.timesteps(B)  # t_i", "t = ctx.timesteps(1).expand(B)  # t_i"),
    "batches-not-paired": (METHOD, "pred = ctx.predict(model, x_in, t.repeat(len(inputs)), torch.cat(conds))",
                           "pred = ctx.predict(model, x_in, ctx.timesteps(len(x_in)), torch.cat(conds))"),
    "warmup-one-timestep": (METHOD, "        t = ctx.timesteps(len(x_c))\n        noise",
                            "        t = ctx.timesteps(1).expand(len(x_c))\n        noise"),
    "sampling-with-replacement": (METHOD, "x_c, c, s_c = ctx.concept_batch(B, replace=False)",
                                  "x_c, c, s_c = ctx.concept_batch(B, replace=True)"),
    "turnover-per-step": (METHOD, "return drop_ratio(e, E, cfg.drop_ratio) if",
                          "return drop_ratio(s, E * S, cfg.drop_ratio) if"),
    "updates-never-stop": (METHOD, "if s % K == 0 and e < stop else None", "if s % K == 0 else None"),
    "reference-warmup-outside": (METHOD, "    if cfg.reference:\n        return [Tick(",
                                 "    if False:\n        return [Tick("),
    # fp16 loss scaling
    "overflow-enters-importance": (METHOD, "if i <= last_read and ctx.unscale_gradients(optimizer):",
                                   "if i <= last_read and (ctx.unscale_gradients(optimizer) or True):"),
    "warmup-scaler-never-updates": (STAGE, "        if scaler is not None:\n            scaler.update()",
                                    "        if scaler is not None:\n            pass"),
    "importance-on-scaled-grads": (STAGE, "        scaler.unscale_(getattr(optimizer, \"optimizer\", optimizer))\n",
                                   "\n"),
    # stacking runs
    "stack-drops-freeze-mask": (ERASE, "        method.load_state_dict(stack.method_state)\n",
                                "        pass\n"),
    "stack-drops-distillation": (ERASE, "previous=[data[n] for n in carried + done]", "previous=[data[n] for n in done]"),
    "stack-restarts-seeds": (ERASE, "seed=cfg.seed + 1000 * (stack.stages + i)", "seed=cfg.seed + 1000 * i"),
}


def run_mutant(name: str, timeout: int) -> tuple[bool, float, str]:
    file, old, new = MUTANTS[name]
    path = ROOT / file
    original = path.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"mutant {name}: its snippet occurs {original.count(old)} times in {file}; update the list")
    path.write_text(original.replace(old, new))
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                           cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        killed = r.returncode != 0
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
        detail = failed[0].removeprefix("FAILED ").split(" - ")[0] if failed else ""
    except subprocess.TimeoutExpired:
        killed, detail = True, "timeout"
    finally:
        path.write_text(original)
    return killed, time.perf_counter() - t, detail


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", help="run these mutants only")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()
    names = args.only or list(MUTANTS)
    if args.list:
        print("\n".join(f"{n}: {MUTANTS[n][0]}" for n in names))
        return
    killed = 0
    for name in names:
        ok, seconds, detail = run_mutant(name, args.timeout)
        killed += ok
        print(f"{'killed  ' if ok else 'SURVIVED'} {name:<28} {seconds:5.0f}s  {detail}", flush=True)
    by_file = {}
    for name in names:
        by_file.setdefault(MUTANTS[name][0], []).append(name)
    print(f"\nmutation score: {killed}/{len(names)} killed ({', '.join(f'{Path(f).name}: {len(v)}' for f, v in by_file.items())})")


if __name__ == "__main__":
    main()
