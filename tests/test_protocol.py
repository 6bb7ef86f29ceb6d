"""The fair-benchmark protocol: fixed in a file, checked before any run, the same budget for every
method, a selection rule stated in advance, intervals over seeds and classes."""

from pathlib import Path

import pytest
import yaml

from sculpt.emoji.taxonomy import load_taxonomy
from sculpt.methods import available_methods
from sculpt.protocol import ProtocolError, bootstrap_interval, load_protocol, select

PROTOCOL = Path(__file__).resolve().parents[1] / "benchmarks" / "protocol.yaml"


def test_the_committed_protocol_tunes_every_method_with_the_same_budget_off_the_test_set():
    tax = load_taxonomy()
    p = load_protocol(PROTOCOL, tax.names)
    assert set(p.grids) == set(available_methods())  # the paper's method is tuned like every other
    assert all(len(p.settings(m)) == p.settings_per_method == 8 for m in p.grids)
    assert set(p.test_concepts) == set(tax.target_names) and not set(p.dev_concepts) & set(tax.target_names)
    dev_kept, test_kept = p.kept_split(tax.names)
    assert not set(dev_kept) & set(test_kept) and not (set(dev_kept) | set(test_kept)) & set(p.dev_concepts)


def _write(tmp_path, **changes):
    raw = yaml.safe_load(PROTOCOL.read_text())
    for key, value in changes.items():
        raw[key] = value
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_bad_protocol_is_refused_with_the_method_and_field_named(tmp_path):
    raw = yaml.safe_load(PROTOCOL.read_text())
    grids = {**raw["grids"], "uce": {"lamda": [0.1, 0.5, 1.0, 2.0], "preserve_superclasses": [True, False]}}
    with pytest.raises(ProtocolError, match=r"grids\.uce\.lamda: not a setting of uce"):
        load_protocol(_write(tmp_path, grids=grids))
    grids = {**raw["grids"], "sculpting": {"lambda_kd": [0.25, 0.5, 1.0, 2.0, 4.0], "lr": [1e-4, 3e-4]}}
    with pytest.raises(ProtocolError, match=r"grids\.sculpting: 10 settings, .* 8"):
        load_protocol(_write(tmp_path, grids=grids))
    with pytest.raises(ProtocolError, match="overlap: poodle"):
        load_protocol(_write(tmp_path, dev_concepts=["poodle", "rabbit"]))
    with pytest.raises(ProtocolError, match="dev_concepts: not in the benchmark: unicorn"):
        load_protocol(_write(tmp_path, dev_concepts=["unicorn"]), load_taxonomy().names)


def test_the_selection_rule_keeps_the_best_preserver_among_those_that_forget():
    results = [
        {"name": "a", "total_acc": 0.05, "kept_acc": 0.90, "coherence": 0.5},
        {"name": "b", "total_acc": 0.08, "kept_acc": 0.95, "coherence": 0.4},
        {"name": "c", "total_acc": 0.02, "kept_acc": 0.95, "coherence": 0.9},  # ties b on kept: coherence wins
        {"name": "d", "total_acc": 0.30, "kept_acc": 0.99, "coherence": 1.0},  # keeps most, forgets too little
    ]
    assert select(results)["name"] == "c"
    assert select([r for r in results if r["name"] in "bd"])["name"] == "b"
    assert select([{"name": "e", "total_acc": 0.4, "kept_acc": 0.9}, {"name": "f", "total_acc": 0.2, "kept_acc": 0.5}])[
        "name"] == "f"  # none forgets enough: the one that forgets most


def test_bootstrap_intervals_over_seeds_and_classes():
    same = {(s, c): 0.25 for s in range(3) for c in "abcd"}
    assert bootstrap_interval(same) == (0.25, 0.25, 0.25)
    spread = {(s, c): float(c in "ab") for s in range(3) for c in "abcd"}  # half the classes erased, half not
    mean, lo, hi = bootstrap_interval(spread, seed=1)
    assert mean == 0.5 and 0.0 <= lo < 0.5 < hi <= 1.0
    assert bootstrap_interval(spread, seed=1) == (mean, lo, hi)  # deterministic for a seed
