"""Ring-A-Bell (Tsai, Hsu et al., ICLR 2024; github chiayi-hsu/Ring-A-Bell): model-agnostic -- it
needs only the text encoder. The concept is a direction in the encoder's output space, from pairs of
prompts with and without it; a prompt embedding pushed along that direction is drawn.

With E(p) the prompt embedding [L, D] (every token state, as the UNet reads it), pairs
(p_i with the concept, q_i without), a neutral prompt n and a strength eta:

    c      = (1/N) sum_i ( E(p_i) - E(q_i) )          the concept vector              (concept_direction)
    e_adv  = E(n) + eta c                             continuous variant: drawn as is
    s*     = argmin_s || E(s) - e_adv ||^2_F          discrete variant: a K-token prompt found by a
                                                      genetic search                  (genetic_search)

E is the PUBLIC text encoder, the base model's (sculpt.attacks.run hands its embeddings over in
target.text_states): the attacker needs nothing of the erased model, and an erasure that changed
the text encoder (the shallow calibration of `sculpt attack --calibrate`) does not blunt the vector;
the moved embedding is then drawn by the erased model. For a UNet-only erasure the two encoders are
the same. Here p_i are the concept's evaluation prompt and its synonym prompts ("a photo of a poodle", "a
photo of a white poodle", ...) and q_i = n, the neutral prompt, its superclass's ("a photo of a
dog"): each pair differs only in the words for the concept.

Published: concept vectors from about 30 (violence) to 200+ (nudity) hand-made scene pairs; the
attacked prompts are unsafe I2P prompts with eta = 3 (nudity) or 5-5.5 (violence); the search is a
genetic algorithm over K = 16 CLIP tokens (or 75), population 200, 3000 generations, selection of the
best half, single-point crossover with probability 0.5, one random token mutated with probability
0.25, fitness the squared distance to e_adv over all 77 token states. Deviations here:
- the pairs are the benchmark's prompts for the concept against one neutral prompt, not scene pairs;
- the embedding moved is the neutral prompt's (issue 13), not an unsafe prompt's;
- the continuous variant (drawing e_adv itself) is the default; the published discrete search is
  `discrete=True` and uses the published search settings unless the world's budget says otherwise;
- special tokens are left out of the search's vocabulary (the published one excludes only its ends).
Emoji world budget: eta = 2; K = 14 (the encoder reads 16 tokens, two of them begin / end),
population 50, 100 generations. eta was chosen on three development classes (trumpet, rabbit, bus;
none a target), base model, 20 pictures each, as the largest of {1, 1.5, 2, 3} whose attack success
stays within 0.1 of the plain prompt's: 1.0 / 0.95 / 0.9 plain -> eta 2: 1.0 / 0.95 / 0.95, eta 3:
0.55 / 0.75 / 0.25 (pushed that far, this small encoder's embedding leaves what the UNet knows). At
that budget the discrete search fails on the same classes (0 / 20 pictures each, 30-40 s a class):
its gibberish prompts stay far from the goal, which is why it is off by default.
"""

from __future__ import annotations

import torch
from pydantic import Field

from sculpt.attacks.base import Attack, AttackConfig, AttackTarget, Sampling, Timer, frozen, register
from sculpt.attacks.embeddings import SlotPrompt, allowed_tokens, draw, encode
from sculpt.eval.sampling import PromptEmbeddings


class RingABellConfig(AttackConfig):
    eta: float = Field(3.0, gt=0, description="strength along the concept direction (published: 3 nudity, 5.5 violence)")
    discrete: bool = Field(False, description="search a real K-token prompt near the moved embedding")
    length: int = Field(16, ge=1, description="K, tokens of the discrete prompt (published 16)")
    population: int = Field(200, ge=4, description="genetic search: prompts per generation")
    generations: int = Field(3000, ge=1, description="genetic search: generations")
    crossover_rate: float = Field(0.5, ge=0, le=1)
    mutation_rate: float = Field(0.25, ge=0, le=1)


@torch.no_grad()
def concept_direction(pipe, with_concept: list[str], without_concept: list[str]) -> torch.Tensor:
    """c = (1/N) sum_i (E(with_i) - E(without_i)), [L, D], over paired prompts."""
    if len(with_concept) != len(without_concept) or not with_concept:
        raise ValueError(f"concept direction: need as many prompts without the concept ({len(without_concept)}) "
                         f"as with it ({len(with_concept)}), at least one")
    with frozen(pipe.text_encoder):
        embed = PromptEmbeddings(pipe)
        return (embed(list(with_concept)) - embed(list(without_concept))).float().mean(0)


@torch.no_grad()
def genetic_search(pipe, goal: torch.Tensor, length: int, population: int, generations: int,
                   crossover_rate: float, mutation_rate: float, generator: torch.Generator):
    """The K-token prompt whose embedding is nearest `goal` [L, D] (squared Frobenius distance) that a
    genetic search finds: returns (its SlotPrompt, its tokens [K], best distance per generation)."""
    template = SlotPrompt.build(pipe.tokenizer, " ".join(["{}"] * length))
    vocab = allowed_tokens(pipe.tokenizer)

    def random_tokens(*shape):
        return vocab[torch.randint(0, len(vocab), shape, generator=generator)]

    def distance(tokens: torch.Tensor) -> torch.Tensor:
        out = [(encode(pipe, template, tokens=chunk).float() - goal).square().sum((1, 2))
               for chunk in tokens.split(256)]
        return torch.cat(out)

    pool, best = random_tokens(population, length), []
    with frozen(pipe.text_encoder):
        for generation in range(generations):
            fitness = distance(pool)
            order = fitness.argsort()
            pool = pool[order[: population // 2]]  # selection: the better half
            best.append(float(fitness[order[0]]))
            if generation == generations - 1:
                break
            children = []
            for i in range(len(pool)):  # single-point crossover with a random mate
                if float(torch.rand((), generator=generator)) < crossover_rate:
                    j = int(torch.randint(0, len(pool), (), generator=generator))
                    cut = int(torch.randint(0, length, (), generator=generator))
                    children += [torch.cat([pool[i, :cut], pool[j, cut:]]), torch.cat([pool[j, :cut], pool[i, cut:]])]
            pool = torch.cat([pool, torch.stack(children)]) if children else pool.clone()
            mutate = torch.rand(len(pool), generator=generator) < mutation_rate  # one random token each
            where = torch.randint(0, length, (len(pool),), generator=generator)
            fresh = random_tokens(len(pool))
            pool[mutate, where[mutate]] = fresh[mutate]
    return template, pool[0], best


@register
class RingABell(Attack):
    """Ring-A-Bell: a neutral prompt's embedding moved along the concept's direction in text space."""

    name = "ring-a-bell"
    config_class = RingABellConfig
    world_budgets = {"emoji": {"eta": 2.0, "length": 14, "population": 50, "generations": 100}}

    def pairs(self, target: AttackTarget) -> tuple[list[str], list[str]]:
        """Prompts with the concept, and for each the neutral prompt without it."""
        with_concept = list(dict.fromkeys([target.prompt, *target.synonyms]))
        return with_concept, [target.neutral_prompt] * len(with_concept)

    def texts_needed(self, target: AttackTarget) -> list[str]:
        with_concept, without = self.pairs(target)
        return list(dict.fromkeys([*with_concept, *without]))

    def run(self, pipe, target: AttackTarget, sampling: Sampling, seed: int):
        cfg = self.config
        timer = Timer()
        with_concept, without = self.pairs(target)
        public = all(t in target.text_states for t in self.texts_needed(target))
        if public:  # the base (public) text encoder's embeddings, as the published attack uses them
            device = pipe.text_encoder.device
            embed = lambda texts: torch.stack([target.text_states[t] for t in texts]).to(device)  # noqa: E731
            direction = (embed(with_concept) - embed(without)).mean(0)
            neutral = embed([target.neutral_prompt])
        else:  # no base embeddings given (a direct library call): the attacked pipeline's own encoder
            direction = concept_direction(pipe, with_concept, without)
            with torch.no_grad(), frozen(pipe.text_encoder):
                neutral = PromptEmbeddings(pipe)([target.neutral_prompt]).float()
        goal = neutral + cfg.eta * direction
        details = {"pairs": len(with_concept), "direction_norm": float(direction.norm()), "eta": cfg.eta,
                   "neutral_prompt": target.neutral_prompt,
                   "text_encoder": "base (public)" if public else "attacked model's"}
        text, steps, losses, cond = None, 0, [], goal
        if cfg.discrete:
            template, tokens, losses = genetic_search(pipe, goal, cfg.length, cfg.population, cfg.generations,
                                                      cfg.crossover_rate, cfg.mutation_rate,
                                                      self.generator(seed, target))
            with torch.no_grad(), frozen(pipe.text_encoder):
                cond = encode(pipe, template, tokens=tokens).float()
            text, steps = template.text(pipe.tokenizer, tokens), cfg.generations
            details["distance_to_goal"] = losses[-1]
        seconds = timer()
        timer = Timer()
        images = draw(pipe, cond, sampling)
        return self.result(target, sampling, seed, images=images, steps=steps, seconds=seconds,
                           sampling_seconds=timer(), prompt=text, embeddings=cond.detach().cpu(),
                           losses=losses, details=details)
