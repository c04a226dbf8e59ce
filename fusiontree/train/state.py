"""The state a training run carries from step to step and across a resume: counters and RNGs.

The token clock is the loader's (`TrainLoader.tokens_seen`): it moves the curriculum, so it
is kept once, there, and saved with the loader state. `TrainState` holds the step counters;
`rng_state()` / `set_rng_state()` the random generators of torch (CPU and CUDA), Python and
NumPy, saved beside it in every rank's trainer file.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (applied or skipped)
    applied_steps: int = 0  # steps whose update was applied (drives the lr schedule)
    skipped_steps: int = 0
    consecutive_bad: int = 0
    last_checkpoint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        """Trainer files that also hold `tokens_seen` (the loader's clock, restored with the
        loader state) load too."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"tokens_seen"}
        if unknown:
            raise ValueError(f"trainer state has unknown fields {sorted(unknown)}; is the checkpoint from "
                             "another version of the trainer?")
        return cls(**{k: v for k, v in d.items() if k in names})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
