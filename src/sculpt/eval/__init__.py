"""Evaluation: did the model forget, what did the erasure break, does a forgotten concept come back.

    from sculpt.eval import evaluate, EvalSettings
    metrics = evaluate("emoji", patches=["runs/demo/patch.safetensors"], out="runs/demo/eval")
    metrics["forgetting"]["total_acc"], metrics["preservation"]["drop"]

Layers: sampling.py (batched, seeded, cached sampling), metrics.py (the numbers, one function each),
classifiers.py / detectors.py (what reads the pictures), benchmark.py (what is asked for),
evaluate.py (the whole evaluation), commands.py (`sculpt eval`, `sculpt report`).
"""

from sculpt.eval.benchmark import Benchmark, EvalClass, emoji_benchmark, folder_reference, imagenette_benchmark
from sculpt.eval.classifiers import Classifier, EmojiWorldClassifier, TransformersClassifier, TransformersCLIPScorer
from sculpt.eval.detectors import ClassifierDetector, Detector, NudeNetDetector, read_prompt_csv
from sculpt.eval.evaluate import EvalSettings, evaluate
from sculpt.eval.sampling import ImageCache, Job, SamplerSettings, generate

__all__ = [
    "Benchmark", "EvalClass", "emoji_benchmark", "folder_reference", "imagenette_benchmark",
    "Classifier", "EmojiWorldClassifier", "TransformersClassifier", "TransformersCLIPScorer",
    "ClassifierDetector", "Detector", "NudeNetDetector", "read_prompt_csv",
    "EvalSettings", "evaluate", "ImageCache", "Job", "SamplerSettings", "generate",
]
