"""How a round is sampled: the knobs (`RoundOptions`), resolved once from the config and what the caller asked
(sample.py's flags, the app's controls, the evaluation's protocol), then passed whole; and the seed rule.

Owns: `RoundOptions` (max_new_tokens, temperature, top_p, num_steps, visual_scale, identity_scale, force_image),
`RoundOptions.resolve` (unset knobs take the config's `sample` / `diffusion` values) and `round_seed` (which
seed round r of a conversation, candidate k, samples with). Does not own: sampling itself (`session.py`,
`decode.py`, `draw.py`), which rounds are sampled (`complete.py`), the flags (`cli.py`).
"""
from __future__ import annotations

import dataclasses

from cig_jax.config import Config

CANDIDATE_SEEDS = 1_000_003  # candidate k of a round samples with round_seed(...) + k * this


@dataclasses.dataclass(frozen=True)
class RoundOptions:
    """Everything a round is sampled with besides its seed (hashable: frozen). Saved with each sampled round
    (`metadata.sample`), in this order."""

    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    num_steps: int  # diffusion steps
    visual_scale: float  # guidance on the visual embeddings
    identity_scale: float  # guidance on the identities
    force_image: bool = False  # draw even when the model does not open <img>

    @classmethod
    def resolve(cls, cfg: Config, *, max_new_tokens=None, temperature=None, top_p=None, num_steps=None,
                visual_scale=None, identity_scale=None, force_image=False) -> "RoundOptions":
        """The options a caller asked for, the config's `sample` / `diffusion` values where it gave None
        (num_steps 0 also means the config's)."""
        s, d = cfg.sample, cfg.diffusion
        return cls(max_new_tokens=int(s.max_new_tokens if max_new_tokens is None else max_new_tokens),
                   temperature=float(s.temperature if temperature is None else temperature),
                   top_p=float(s.top_p if top_p is None else top_p),
                   num_steps=int(num_steps or d.num_steps),
                   visual_scale=float(d.visual_guidance_scale if visual_scale is None else visual_scale),
                   identity_scale=float(d.identity_guidance_scale if identity_scale is None else identity_scale),
                   force_image=bool(force_image))

    def as_metadata(self) -> dict:
        """How the round was made, as saved with the history (plus the seed, which the caller adds)."""
        return dataclasses.asdict(self)


def round_seed(seed: int, r: int, candidate: int = 0) -> int:
    """The one seed rule: round r of a conversation sampled from base seed `seed` uses seed + r, candidate k of
    it seed + r + k * CANDIDATE_SEEDS. sample.py gives every conversation base --seed (a conversation's images
    depend on nothing else); the evaluation gives conversation i base seed + 1000 i."""
    return int(seed) + int(r) + int(candidate) * CANDIDATE_SEEDS
