"""Weight-sharing training strategies of Klein et al. (2024).

- ``standard``: fine-tune the full network only.
- ``random``: one uniformly random sub-network per step.
- ``sandwich``: largest + smallest + k random sub-networks per step (gradients summed).
- ``kd``: sandwich; the largest learns from the labels, the others from the largest's (detached) predictions
  (in-place distillation).
- ``full``: sandwich + kd, where the smaller networks mix the label loss and the distillation loss 50/50.

Determinism and resume: the data order of epoch ``e`` comes from ``seed + e``; the sub-networks and the dropout of
step ``s`` come from generators seeded by ``(seed, s)``. A checkpoint therefore only needs the weights, the optimizer
and scheduler state and the step; a run killed mid-epoch resumes from its last checkpoint and ends where an
uninterrupted run ends. Checkpoints: ``model.safetensors`` + ``optimizer.pt`` (tensors only, loaded with
``weights_only=True``) + ``state.json``, written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import logging
import math
import dataclasses
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from toolchain.core.atomic import write_json_atomic
from toolchain.core.data import batches
from toolchain.core.distill import distill_loss
from toolchain.core.search_space import SearchSpace
from toolchain.core.supernet import SuperNetwork

log = logging.getLogger(__name__)

STRATEGIES = ("standard", "random", "sandwich", "kd", "full")


class CheckpointError(RuntimeError):
    pass


class TrainingError(ValueError):
    """Training settings that cannot be used (unknown strategy, a count or rate that is not positive)."""


@dataclass
class TrainConfig:
    strategy: str = "kd"  # the CLI's default too
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accumulation: int = 1
    num_random: int = 2  # k random sub-networks per step (sandwich, kd, full)
    temperature: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps
    max_grad_norm: float = 1.0
    group_by_length: bool = True  # batches of similar length (data.batches): 2-3x fewer padded tokens on SST-2

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise TrainingError(f"unknown strategy '{self.strategy}'; choose one of: {', '.join(STRATEGIES)}")
        if self.epochs <= 0 or self.batch_size < 1 or self.grad_accumulation < 1 or self.learning_rate <= 0:
            raise TrainingError("epochs, batch size, gradient accumulation and learning rate must be positive")


def step_loss(supernet: SuperNetwork, space: SearchSpace, batch: dict, cfg: TrainConfig, step: int) -> float:
    """Forward + backward of one micro-batch under the strategy; returns the summed loss value."""
    regression = supernet.config.problem_type == "regression"
    rng = np.random.default_rng([cfg.seed, step])
    if cfg.strategy == "standard":
        plan = [(None, "label")]
    elif cfg.strategy == "random":
        plan = [(space.sample(rng), "label")]
    else:
        smaller = [space.smallest()] + [space.sample(rng) for _ in range(cfg.num_random)]
        mode = {"sandwich": "label", "kd": "kd", "full": "mix"}[cfg.strategy]
        plan = [(space.largest(), "label")] + [(s, mode) for s in smaller]
    teacher = None
    total = 0.0
    for subnet, mode in plan:
        out = supernet(subnet, **batch)
        if mode == "label":
            loss = out.loss
        else:
            kd = distill_loss(out.logits, teacher, regression, cfg.temperature)
            loss = kd if mode == "kd" else 0.5 * out.loss + 0.5 * kd
        if teacher is None:
            teacher = out.logits.detach()
        (loss / cfg.grad_accumulation).backward()
        total += loss.item()
    return total


def optimizer_and_schedule(model: torch.nn.Module, lr: float, weight_decay: float, warmup_ratio: float,
                           total_steps: int, fused: bool = True):
    """AdamW (no decay on biases and LayerNorm) and a linear warm-up then linear decay to 0 over ``total_steps``.
    Fused by default: torch's default on a CPU is a loop over the parameters one tensor at a time, slower for the
    same result (``benchmarks/bench_optimizer.py`` measures one against the other); ``fused=False``: that loop."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # (frozen ones left out)
    decay = [p for name, p in trained if not (name.endswith("bias") or "LayerNorm" in name)]
    no_decay = [p for name, p in trained if name.endswith("bias") or "LayerNorm" in name]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=fused,
                                  foreach=None if fused else False)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    write_json_atomic(tmp / "state.json", state, indent=1)  # last: a .tmp with it is complete
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _finish_interrupted_save(folder: Path) -> None:
    """A kill between the two renames of :func:`save_checkpoint` leaves no ``folder`` but a complete ``.tmp`` (the
    new checkpoint) and ``.old`` (the previous one): finish the swap instead of restarting from step 0."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if folder.exists():
        return
    for cand in (tmp, old):  # the newer first; a .tmp is complete once its state.json exists (written last)
        if (cand / "state.json").is_file():
            log.warning("checkpoint %s: finishing a save that was interrupted (using %s)", folder, cand.name)
            cand.rename(folder)
            return


def ckpt_exists(folder: Path) -> bool:
    """Whether a checkpoint is there to resume from (after finishing a save that a kill interrupted)."""
    _finish_interrupted_save(folder)
    return folder.exists()


def load_checkpoint(folder: Path, model, optimizer=None, scheduler=None) -> dict:
    """Restore a checkpoint written by :func:`train`; a damaged one is a :class:`CheckpointError`."""
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / "state.json").read_text())
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        if optimizer is not None:
            opt = torch.load(folder / "optimizer.pt", weights_only=True)
            optimizer.load_state_dict(opt["optimizer"])
            scheduler.load_state_dict(opt["scheduler"])
    except Exception as e:  # noqa: BLE001 - any damage is reported the same way
        raise CheckpointError(
            f"checkpoint {folder} is damaged or incomplete ({type(e).__name__}: {e}); "
            "delete it to restart training from scratch"
        ) from None
    return state


def train(supernet: SuperNetwork, space: SearchSpace, encoded: dict[str, torch.Tensor], cfg: TrainConfig,
          checkpoint_dir: str | Path | None = None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train the super-network in place. Resumes from ``checkpoint_dir/last`` when it exists.

    ``stop_after`` (steps) interrupts the run as a kill would, after a checkpoint (tests).
    Returns training statistics (steps, wall time, final loss).
    """
    model = supernet.model
    n = len(encoded["input_ids"])
    micro_per_epoch = math.ceil(n / cfg.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accumulation)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    optimizer, scheduler = optimizer_and_schedule(model, cfg.learning_rate, cfg.weight_decay, cfg.warmup_ratio,
                                                  total_steps)
    step, losses = 0, []
    ckpt = Path(checkpoint_dir) / "last" if checkpoint_dir else None
    if ckpt is not None and ckpt_exists(ckpt):
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        if state.get("config") != asdict(cfg):
            raise CheckpointError(f"checkpoint {ckpt} was written with other training settings; use a new run "
                                  "folder or --overwrite")
        step, losses = state["step"], state["losses"]
        log.info("resuming training from step %d/%d", step, total_steps)

    model.train()
    t0 = time.time()
    bar = tqdm(total=total_steps, initial=step, desc=f"train ({cfg.strategy})", disable=not progress)
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        order = batches(encoded, cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed + epoch), group_by_length=cfg.group_by_length)
        micro = list(order)[within * cfg.grad_accumulation:]
        for start in range(0, len(micro) - cfg.grad_accumulation + 1, cfg.grad_accumulation):
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout of this step
            loss = sum(step_loss(supernet, space, b, cfg, step) for b in micro[start:start + cfg.grad_accumulation])
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss / cfg.grad_accumulation)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            done = step >= total_steps
            if ckpt is not None and (step % cfg.checkpoint_every == 0 or done or step == stop_after):
                save_checkpoint(ckpt, model, optimizer, scheduler,
                                 {"step": step, "total_steps": total_steps, "losses": losses, "config": asdict(cfg)})
            if stop_after is not None and step >= stop_after and not done:
                bar.close()
                raise KeyboardInterrupt(f"stopped after step {step}")
            if done or step % steps_per_epoch == 0:
                break
    bar.close()
    model.eval()
    return {"steps": step, "total_steps": total_steps, "seconds": round(time.time() - t0, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else None}


class WholeModel:
    """What :func:`train` uses of a super-network, for a model that is trained whole (a sliced network, say)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def config(self):
        return self.model.config

    def __call__(self, subnet=None, **batch):
        return self.model(**batch)


def fine_tune(model: torch.nn.Module, encoded: dict[str, torch.Tensor], cfg: TrainConfig,
              checkpoint_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Standard fine-tuning of any model of the family, sliced ones included (in place; resumable from
    ``checkpoint_dir``). Returns the training statistics of :func:`train`."""
    cfg = dataclasses.replace(cfg, strategy="standard")
    return train(WholeModel(model), None, encoded, cfg, checkpoint_dir, progress=progress)
