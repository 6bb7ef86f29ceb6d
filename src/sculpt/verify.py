"""`sculpt verify RUN`: do a run's erasure claims still hold?

1. the ledger's hash chain is intact and every file it names has the recorded sha256;
2. the final patch is what the ledger says (concepts, hashes);
3. base model + patch reproduces the recorded result hash (the weights are the audited ones);
4. with `remeasure`: a small fixed sample is re-generated and forgetting / preservation are
   re-measured against the last recorded evaluation (same seeds, fewer images, a tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sculpt import ledger


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    run: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def lines(self) -> list[str]:
        out = [f"{'ok ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        verdict = "the recorded claims hold" if self.ok else "the recorded claims do NOT hold"
        return out + [f"{self.run}: {verdict}"]


def verify_run(run: str | Path, remeasure: bool = False, n: int = 8, tolerance: float = 0.25,
               pipe=None) -> VerifyReport:
    from sculpt.patch import PatchError, apply_patch, load_patch

    run = Path(run)
    report = VerifyReport(run)
    problems = ledger.check_chain(run / "ledger.jsonl")
    if not report.add("ledger", not problems, "; ".join(problems) or "hash chain intact, every named file unchanged"):
        return report
    entries = ledger.read_ledger(run / "ledger.jsonl")
    start = entries[0]
    final = next((e for e in reversed(entries) if e["event"] == "final"), None)
    if not report.add("complete", final is not None, "the run finished" if final else "the run has no final patch yet"):
        return report

    try:
        patch = load_patch(run / "patch.safetensors")
    except PatchError as exc:
        report.add("patch", False, str(exc))
        return report
    erased = [c for e in entries if e["event"] == "stage" for c in e["concepts"]]
    same = patch.concepts == erased == final["concepts"] and patch.metadata.get("result_hash") == final["result_hash"]
    report.add("patch", same, f"erases {', '.join(patch.concepts)}" if same else
               "the patch's concepts or result hash differ from the ledger")

    from sculpt.models.loading import load_pipeline, model_hash

    try:
        pipe = pipe if pipe is not None else load_pipeline(start["base_model"])
    except Exception as exc:  # noqa: BLE001 - report, don't crash: the other checks still stand
        report.add("weights", False, f"cannot load the base model {start['base_model']!r}: {exc}")
        return report
    base = model_hash(pipe)
    if not report.add("base model", base == start["base_hash"],
                      f"hash {base[:16]}... " + ("matches" if base == start["base_hash"] else
                                                 f"!= recorded {start['base_hash'][:16]}...")):
        return report
    apply_patch(pipe, patch)
    result = model_hash(pipe)
    report.add("weights", result == final["result_hash"],
               "base + patch reproduces the recorded result hash" if result == final["result_hash"]
               else f"base + patch gives {result[:16]}..., recorded {final['result_hash'][:16]}...")

    if remeasure:
        _remeasure(report, run, entries, pipe, n, tolerance)
    return report


def _remeasure(report, run, entries, pipe, n, tolerance) -> None:
    from sculpt.eval.evaluate import EvalSettings, evaluate

    claims = [e for e in entries if e["event"] == "evaluation"]
    if not claims:
        report.add("remeasure", False, "no recorded evaluation to re-check (run `sculpt eval --run` first)")
        return
    claim = claims[-1]
    # Back to the base model: evaluate applies the patch itself, and measures the base too.
    start = entries[0]
    from sculpt.models.loading import load_pipeline

    from sculpt.eval.sampling import SamplerSettings, default_sampler

    base = load_pipeline(start["base_model"], device=pipe.device)
    # The sampler the claim was measured with (older ledgers: the model's default).
    sampler = SamplerSettings(**claim["sampler"]) if claim.get("sampler") else default_sampler(start["base_model"])
    settings = EvalSettings(n=n, seed=claim["seed"], paraphrases=False, unsafe=False, quality=False, sampler=sampler)
    m = evaluate(model=start["base_model"], pipe=base, patches=[run / "patch.safetensors"], settings=settings,
                 cache=False)
    total, kept = m["forgetting"]["total_acc"], m["preservation"]["acc"]
    report.add("forgetting", total <= claim["total_acc"] + tolerance,
               f"Total Acc {total:.2f} on {n} images/concept (recorded {claim['total_acc']:.2f}, tolerance {tolerance})")
    report.add("preservation", kept >= claim["kept_acc"] - tolerance,
               f"kept-class accuracy {kept:.2f} (recorded {claim['kept_acc']:.2f}, tolerance {tolerance})")
