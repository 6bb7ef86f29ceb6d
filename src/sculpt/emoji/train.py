"""Train the emoji world's models from scratch on CPU, resumably. The full recipe is scripts/emoji_train.sh.

    python -m sculpt.emoji.train classifier --out .cache/emoji_train/classifier --steps 1500 --batch 128
    python -m sculpt.emoji.train scorer     --out .cache/emoji_train/scorer     --steps 1500 --batch 128
    python -m sculpt.emoji.train vae        --out .cache/emoji_train/vae        --steps 2000 --batch 64
    python -m sculpt.emoji.train unet       --out .cache/emoji_train/unet       --steps 30000 --batch 32 \
        --vae .cache/emoji_train/vae
    python -m sculpt.emoji.train export unet --out .cache/emoji_train/unet --vae .cache/emoji_train/vae

Every stage reads the deterministic data stream of EmojiDataset (batch at step s = samples s*B .. s*B+B-1),
checkpoints model + optimizer + step + RNG states atomically every few minutes into --out, resumes from
that checkpoint when run again, appends its losses to --out/log.txt, and at the end exports its weights
into src/sculpt/emoji/weights/ (fp16). Running a finished stage again does nothing; `export` re-exports.
"""

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file

from sculpt.emoji import classifier as classifier_lib
from sculpt.emoji import scorer as scorer_lib
from sculpt.emoji.dataset import EmojiDataset, all_captions, class_prompt, render_batch
from sculpt.emoji.pipeline import (
    PIPELINE_DIR, build_pipeline, new_unet, new_vae, save_emoji_pipeline, train_scheduler,
)
from sculpt.emoji.taxonomy import load_taxonomy
from sculpt.io import atomic_write, optimizer_state_from_tensors, optimizer_state_to_tensors
from sculpt.emoji.text_encoder import encode_prompts, load_text_encoder, load_tokenizer, sentence_embeddings

# Held-out renders use a seed no training run uses; the training stream uses --seed (small numbers).
HELDOUT_SEED = 10_000
HELDOUT_PER_CLASS = 16


# ----------------------------------------------------------------------------------------------------
# Resumable training loop shared by all stages


class Run:
    """A training run's folder: checkpoint.safetensors (atomic; tensors + JSON, no pickle), log.txt, and the
    stage's final outputs."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out / "checkpoint.safetensors"  # tensors + JSON: nothing is unpickled

    def log(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        # Write aside, then rename: a run killed mid-write leaves the previous checkpoint intact.
        tensors, meta = training_state(step, modules, optimizer)
        atomic_write(self.checkpoint_path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))

    def finished(self, steps: int) -> bool:
        """True when an earlier invocation trained this run to `steps` and exported it. A finished stage is
        skipped rather than re-exported: rewriting identical weights still changes the files' bytes."""
        marker = self.out / "finished"
        done = marker.exists() and int(marker.read_text()) >= steps
        if done:
            self.log(f"already finished at step {marker.read_text()}; `python -m sculpt.emoji.train export` re-exports")
        return done

    def mark_finished(self, steps: int) -> None:
        (self.out / "finished").write_text(str(steps))

    def resume(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
        """Load the latest checkpoint if there is one; return the step to continue from."""
        if not self.checkpoint_path.exists():
            return 0
        state = read_training_state(self.checkpoint_path)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.log(f"resumed from step {state['step']}")
        return state["step"]


def training_state(step: int, modules: dict[str, torch.nn.Module],
                   optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """A training checkpoint as safetensors tensors plus JSON metadata: module weights, optimiser
    state, step and the torch / numpy / Python RNG states."""
    tensors = {f"modules/{name}/{k}": v.detach().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    meta = {"step": step, "optimizer": opt_meta,
            "rng": {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), py_gauss]}}
    return tensors, meta


def read_training_state(path: Path) -> dict:
    """The inverse of training_state: {"step", "modules", "optimizer", "rng"} (no pickle involved)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: not a safetensors checkpoint; pickled checkpoints are not loaded")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith("modules/"):
            _, name, k = key.split("/", 2)
            modules.setdefault(name, {})[k] = value
    kind, keys, pos, has_gauss, gauss = meta["rng"]["numpy"]
    version, internal, py_gauss = meta["rng"]["python"]
    return {"step": meta["step"], "modules": modules,
            "optimizer": optimizer_state_from_tensors(tensors, meta["optimizer"]),
            "rng": {"torch": tensors["rng/torch"], "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss),
                    "python": (version, tuple(internal), py_gauss)}}


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup, then cosine decay to 10% ("cosine") or a constant rate ("constant")."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(run: Run, args, dataset: EmojiDataset, modules: dict[str, torch.nn.Module], params, loss_fn,
               on_step=None, schedule: str = "cosine", warmup: int = 100) -> None:
    """The shared loop: loss_fn(batch, step) -> (loss, {name: value}); on_step(step) runs after each step."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = run.resume(modules, optimizer)
    for m in modules.values():
        m.train()
    last_save, t0, window = time.time(), time.time(), []
    for step in range(start, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, warmup, args.steps, schedule)
        loss, metrics = loss_fn(dataset.batch(step * args.batch, args.batch), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        window.append({"loss": loss.item(), **metrics})
        if on_step is not None:
            on_step(step + 1)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            rate = (time.time() - t0) / len(window)
            run.log(f"step {step + 1}/{args.steps} " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    + f" lr {optimizer.param_groups[0]['lr']:.2e} {rate * 1000:.0f} ms/step")
            window, t0 = [], time.time()
        if time.time() - last_save > 60 * args.checkpoint_minutes or step + 1 == args.steps:
            run.save(step + 1, modules, optimizer)
            last_save = time.time()


def heldout_renders() -> tuple[torch.Tensor, torch.Tensor]:
    """HELDOUT_PER_CLASS renders of every class, from augmentations no training stream draws."""
    n = len(load_taxonomy())
    labels = torch.arange(n).repeat(HELDOUT_PER_CLASS)
    return render_batch(labels.tolist(), seed=HELDOUT_SEED), labels


def degrade(images: torch.Tensor) -> torch.Tensor:
    """Blur and noise some pictures, so the evaluators also read the softer pictures a 32 px latent
    diffusion model draws, not only crisp renders."""
    b = images.shape[0]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    use_blur = (torch.rand(b, 1, 1, 1) < 0.4).float()
    images = use_blur * blurred + (1 - use_blur) * images
    noise_std = torch.rand(b, 1, 1, 1) * 0.06 * (torch.rand(b, 1, 1, 1) < 0.4).float()
    return (images + noise_std * torch.randn_like(images)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# Classifier: cross-entropy over all classes


def train_classifier(args) -> None:
    run = Run(args.out)
    if run.finished(args.steps):
        return
    model = classifier_lib.EmojiClassifier(num_classes=len(load_taxonomy()))

    def loss_fn(batch, step):
        logits = model(degrade(batch["pixel_values"]))
        labels = batch["class_id"]
        return F.cross_entropy(logits, labels, label_smoothing=0.05), {"acc": (logits.argmax(-1) == labels).float().mean().item()}

    train_loop(run, args, EmojiDataset(seed=args.seed), {"model": model}, list(model.parameters()), loss_fn)
    export_classifier(run, model, args.export_dir)
    run.mark_finished(args.steps)


def export_classifier(run: Run, model, export_dir: Path) -> None:
    images, labels = heldout_renders()
    acc = (model.predict(images).argmax(-1) == labels).float().mean().item()
    run.log(f"classifier held-out accuracy {acc:.4f} on {len(labels)} renders")
    export_dir.mkdir(parents=True, exist_ok=True)
    classifier_lib.save_classifier(model, export_dir / "classifier.safetensors")
    run.log(f"exported {export_dir / 'classifier.safetensors'}")


# ----------------------------------------------------------------------------------------------------
# Scorer: contrastive image encoder against locked sentence embeddings


def caption_describes(class_ids: torch.Tensor, levels: list[str]) -> torch.Tensor:
    """[B, B] bool: caption j truly describes picture i. "a fish" (superclass level, or the class named
    like its superclass) describes every fish; other captions only their own class."""
    tax = load_taxonomy()
    superclass = torch.tensor([tax.superclasses.index(tax[int(k)].superclass) for k in class_ids])
    names_superclass = torch.tensor(
        [levels[j] == "superclass" or tax[int(k)].name == tax[int(k)].superclass for j, k in enumerate(class_ids)])
    same_class = class_ids[:, None] == class_ids[None, :]
    return same_class | ((superclass[:, None] == superclass[None, :]) & names_superclass[None, :])


def train_scorer(args) -> None:
    run = Run(args.out)
    if run.finished(args.steps):
        return
    encoder = scorer_lib.ImageEncoder()
    text_encoder, tokenizer = load_text_encoder(), load_tokenizer()
    captions = all_captions()
    caption_index = {c: i for i, c in enumerate(captions)}
    # The text side is locked: embed every caption the dataset can produce once.
    text_table = torch.cat([sentence_embeddings(captions[i:i + 256], text_encoder, tokenizer)
                            for i in range(0, len(captions), 256)])

    def loss_fn(batch, step):
        image_emb = encoder(degrade(batch["pixel_values"]))
        text_emb = text_table[[caption_index[c] for c in batch["caption"]]]
        logits = encoder.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
        # Other captions that also describe the picture are not negatives: leave them out of the softmax.
        describes = caption_describes(batch["class_id"], batch["caption_level"])
        off_diagonal = describes & ~torch.eye(len(logits), dtype=torch.bool)
        logits = logits.masked_fill(off_diagonal, float("-inf"))
        targets = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        return loss, {"acc": (logits.argmax(-1) == targets).float().mean().item()}

    # Every picture needs a caption to be contrasted with: no empty captions here.
    dataset = EmojiDataset(seed=args.seed, empty_caption_prob=0.0)
    train_loop(run, args, dataset, {"encoder": encoder}, list(encoder.parameters()), loss_fn)
    export_scorer(run, encoder, args.export_dir)
    run.mark_finished(args.steps)


def export_scorer(run: Run, encoder, export_dir: Path) -> None:
    scorer = scorer_lib.EmojiScorer(encoder)
    images, labels = heldout_renders()
    names = [class_prompt(c.name) for c in load_taxonomy().classes]
    top1 = (scorer.similarity(images, names).argmax(-1) == labels).float().mean().item()
    run.log(f"scorer held-out top-1 {top1:.4f} ranking {len(names)} class captions")
    export_dir.mkdir(parents=True, exist_ok=True)
    scorer_lib.save_scorer(encoder, export_dir / "scorer.safetensors")
    run.log(f"exported {export_dir / 'scorer.safetensors'}")


# ----------------------------------------------------------------------------------------------------
# VAE: reconstruction + a light KL, then measure the latent scaling factor


def train_vae(args) -> None:
    run = Run(args.out)
    if run.finished(args.steps):
        return
    vae = new_vae()

    def loss_fn(batch, step):
        x = batch["pixel_values"] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        l1 = F.l1_loss(recon, x)
        kl = posterior.kl().mean()
        return mse + l1 + args.kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}

    train_loop(run, args, EmojiDataset(seed=args.seed), {"vae": vae}, list(vae.parameters()), loss_fn)
    finish_vae(run, vae, args.seed)
    run.mark_finished(args.steps)


@torch.no_grad()
def finish_vae(run: Run, vae: AutoencoderKL, seed: int) -> None:
    """Set scaling_factor = 1 / std of training latents (SD's 0.18215 is the same measurement) and save."""
    vae.eval()
    x = EmojiDataset(seed=seed + 1).batch(0, 2048)["pixel_values"] * 2 - 1
    latents = torch.cat([vae.encode(x[i:i + 256]).latent_dist.sample() for i in range(0, len(x), 256)])
    scaling_factor = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    images, _ = heldout_renders()
    recon = torch.cat([vae(images[i:i + 256] * 2 - 1, sample_posterior=False).sample for i in range(0, len(images), 256)])
    mse = F.mse_loss((recon.clamp(-1, 1) + 1) / 2, images).item()
    run.log(f"vae latent mean {latents.mean():.4f} std {latents.std():.4f} -> scaling_factor {scaling_factor:.5f}; "
            f"held-out recon MSE {mse:.5f} (pixels in [0,1], PSNR {10 * math.log10(1 / mse):.2f} dB)")
    vae.save_pretrained(run.out / "final")
    run.log(f"saved {run.out / 'final'}")


# ----------------------------------------------------------------------------------------------------
# UNet: epsilon prediction on VAE latents, text states from the frozen encoder, EMA weights exported


def kept_class_ids(leave_out: str | None) -> list[int] | None:
    """The classes the UNet's training stream shows: all of them, or all but `leave_out` (comma-separated
    class names, or the name of a concept list of sculpt.emoji.lists). Leaving classes out is the
    retrained reference ("oracle"): the stream stays class-balanced, so each kept class is shown
    N / (N - k) times as often; the captions and words of the left-out classes stay in the frozen text
    encoder, and their pictures never reach the UNet."""
    if not leave_out:
        return None
    from sculpt.emoji.lists import load_lists

    tax = load_taxonomy()
    lists = load_lists()
    names = lists.get(leave_out) if leave_out in lists.names() else [n.strip() for n in leave_out.split(",")]
    out = {tax[n].id for n in names}  # KeyError names an unknown class
    return [c.id for c in tax.classes if c.id not in out]


def load_trained_vae(path: str | Path) -> AutoencoderKL:
    """The VAE stage's run folder (its final/ export) or a diffusers VAE folder (e.g. the shipped
    pipeline's vae/, stored in fp16 and loaded here in fp32)."""
    path = Path(path)
    folder = path / "final" if (path / "final").is_dir() else path
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).float().eval()


def train_unet(args) -> None:
    if args.leave_out and Path(args.export_dir).resolve() == classifier_lib.WEIGHTS_PATH.parent.resolve():
        raise SystemExit("--leave-out trains a reference model: give it its own --export-dir; the shipped "
                         "weights are never overwritten")
    run = Run(args.out)
    if run.finished(args.steps):
        return
    vae = load_trained_vae(args.vae).requires_grad_(False)
    unet = new_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = train_scheduler()
    text_encoder, tokenizer = load_text_encoder(), load_tokenizer()
    captions = all_captions()
    caption_index = {c: i for i, c in enumerate(captions)}
    # The encoder is frozen and the captions are a closed set: embed them all once ([N, 16, 384]).
    state_table = torch.cat([encode_prompts(captions[i:i + 256], text_encoder, tokenizer)
                             for i in range(0, len(captions), 256)])
    sf = vae.config.scaling_factor
    alphas_cumprod = scheduler.alphas_cumprod

    def loss_fn(batch, step):
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"] * 2 - 1).latent_dist.sample() * sf
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        states = state_table[[caption_index[c] for c in batch["caption"]]]
        pred = unet(noisy, t, encoder_hidden_states=states).sample
        return F.mse_loss(pred, noise), {}

    def on_step(step):
        # EMA with a warmup, so early exports are not dominated by the random init.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % args.export_every == 0 and step < args.steps:
            export_unet(run, vae, ema, args.export_dir, step)

    train_loop(run, args, EmojiDataset(seed=args.seed, classes=kept_class_ids(args.leave_out)),
               {"unet": unet, "ema": ema}, list(unet.parameters()), loss_fn, on_step, schedule="constant", warmup=500)
    export_unet(run, vae, ema, args.export_dir, args.steps)
    run.mark_finished(args.steps)


@torch.no_grad()
def export_unet(run: Run, vae: AutoencoderKL, unet: UNet2DConditionModel, export_dir: Path, step: int) -> None:
    """Write the pipeline (fp16) and check it: a sample grid, and how often the classifier recognises
    what a class prompt drew."""
    was_training = unet.training
    out = save_emoji_pipeline(vae, unet, export_dir / PIPELINE_DIR.name)
    run.log(f"step {step}: exported {out}")
    rng_state = torch.get_rng_state()  # sampling must not shift the training stream
    pipe = build_pipeline(vae, unet.eval())
    pipe.set_progress_bar_config(disable=True)
    tax = load_taxonomy()
    prompts = [class_prompt(c.name) for c in tax.classes] * 2
    images = pipe(prompts, num_inference_steps=25, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    labels = torch.arange(len(tax)).repeat(2)
    grid = images[: len(tax)]
    rows = math.ceil(len(tax) / 8)
    canvas = torch.ones(rows * 8, 3, 32, 32)
    canvas[: len(grid)] = grid
    canvas = canvas.view(rows, 8, 3, 32, 32).permute(2, 0, 3, 1, 4).reshape(3, rows * 32, 8 * 32)
    Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(run.out / f"samples_{step:06d}.png")
    clf_path = export_dir / classifier_lib.WEIGHTS_PATH.name
    if not clf_path.exists():  # an oracle's folder holds no classifier: judge with the shipped one
        clf_path = classifier_lib.WEIGHTS_PATH
    if clf_path.exists():
        acc = (classifier_lib.load_classifier(clf_path).predict(images).argmax(-1) == labels).float().mean().item()
        run.log(f"step {step}: classifier accuracy on {len(images)} generated class pictures {acc:.4f}")
    torch.set_rng_state(rng_state)
    unet.train(was_training)


# ----------------------------------------------------------------------------------------------------
# Command line


def export_stage(args) -> None:
    """Re-export a stage's weights from its latest checkpoint (e.g. a UNet still training)."""
    run = Run(args.out)
    state = read_training_state(run.checkpoint_path)
    if args.stage == "classifier":
        model = classifier_lib.EmojiClassifier(num_classes=len(load_taxonomy()))
        model.load_state_dict(state["modules"]["model"])
        export_classifier(run, model, args.export_dir)
    elif args.stage == "scorer":
        encoder = scorer_lib.ImageEncoder()
        encoder.load_state_dict(state["modules"]["encoder"])
        export_scorer(run, encoder, args.export_dir)
    elif args.stage == "vae":
        vae = new_vae()
        vae.load_state_dict(state["modules"]["vae"])
        finish_vae(run, vae, args.seed)
    else:
        vae = load_trained_vae(args.vae)
        ema = new_unet()
        ema.load_state_dict(state["modules"]["ema"])
        export_unet(run, vae, ema, args.export_dir, state["step"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sculpt.emoji.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"classifier": (1500, 128, 2e-3), "scorer": (1500, 128, 1e-3), "vae": (2000, 64, 1e-3),
                "unet": (30000, 32, 2e-4)}
    for name, (steps, batch, lr) in defaults.items():
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, log, samples")
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--weight-decay", type=float, default=0.0 if name == "unet" else 1e-4)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--log-every", type=int, default=50)
        p.add_argument("--checkpoint-minutes", type=float, default=3.0)
        p.add_argument("--export-dir", type=Path, default=classifier_lib.WEIGHTS_PATH.parent)
        if name == "vae":
            p.add_argument("--kl-weight", type=float, default=1e-6)
        if name == "unet":
            p.add_argument("--vae", type=Path, required=True, help="the vae stage's run folder")
            p.add_argument("--ema-decay", type=float, default=0.999)
            p.add_argument("--export-every", type=int, default=2000)
            p.add_argument("--leave-out", default=None,
                           help="train without these classes' pictures (comma-separated names, or a list "
                                "of sculpt.emoji.lists, e.g. sealed): the retrained reference")
    p = sub.add_parser("export")
    p.add_argument("stage", choices=list(defaults))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vae", type=Path, help="the vae stage's run folder (unet only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-dir", type=Path, default=classifier_lib.WEIGHTS_PATH.parent)
    args = parser.parse_args(argv)

    torch.manual_seed(getattr(args, "seed", 0))
    np.random.seed(getattr(args, "seed", 0))
    random.seed(getattr(args, "seed", 0))
    {"classifier": train_classifier, "scorer": train_scorer, "vae": train_vae, "unet": train_unet,
     "export": export_stage}[args.command](args)


if __name__ == "__main__":
    main()
