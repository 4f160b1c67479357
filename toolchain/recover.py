"""Recovery stage (issue #17): a sub-network about to be exported is sliced from the weight-sharing super-network,
distilled from the super-network's full network, and validated again, so that shipped points lose less accuracy.

The teacher (the full network) labels text, so recovery may use all of the task's training text, not only the
subset the super-network trained on (``DataSettings.max_train_samples`` does not apply; a ``holdout`` split stays
out, since a search scores candidates on it). ``RecoverSettings.samples`` training texts are drawn (seeded) from
it. The loss mixes ``alpha`` x distillation (KL to the teacher's softened logits; MSE to its output for a regression
task such as STS-B) with ``1 - alpha`` x the label loss (cross-entropy; MSE to the label for regression), plus
``hidden_weight`` x a hidden-state term (:func:`toolchain.core.distill.hidden_loss`; off by default: no gain on three
points of a default compile for a third more time, docs/benchmarks.md).

Everything is cached beside the super-network (``<folder of supernet/>``, i.e. the run folder, or ``cache_dir``):

    teacher/<key>.npy              the full network's logits on the recovery texts: computed once per data
                                   selection, max_length and super-network weights, shared by every point
    recovered/<key>/model.safetensors, info.json
                                   a recovered point; complete only when info.json exists. ``<key>`` is
                                   ``<subnet.key()>-<hash of super-network identity, settings.key(), data selection>``
    recovered/<key>/checkpoint/    while it trains: model + optimizer + scheduler + step (resume), removed when done
    recovered/<key>/screen.json    the validation score after the first ``settings.screen`` share of the steps
                                   (:func:`screen_point`), recorded by every recovery that passes that step

Determinism and resume follow :mod:`toolchain.training`: the data order of epoch ``e`` comes from ``seed + e`` and
the dropout of step ``s`` from ``(seed, s)``, so an interrupted recovery resumed from its checkpoint ends where an
uninterrupted one ends. Files are written to a temporary name and moved into place with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from toolchain.core.atomic import write_atomic, write_json_atomic
from toolchain.core.data import TextDataset, batches
from toolchain.core.distill import hidden_loss, recovery_loss
from toolchain.core.subnetwork import SubNetwork
from toolchain.evaluation import Evaluator, score_model
from toolchain.run import Run
from toolchain.training import CheckpointError, ckpt_exists, load_checkpoint, optimizer_and_schedule, save_checkpoint

log = logging.getLogger(__name__)

# fields of RecoverSettings that do not change the recovered weights (left out of ``key()``)
_NOT_IN_KEY = ("checkpoint_every", "screen")


#: what :attr:`RecoverSettings.teacher` may be
TEACHERS = ("supernet", "recovered")


class RecoverError(ValueError):
    """Recovery settings that cannot work (the user's to fix)."""


@dataclass
class RecoverSettings:
    samples: int | None = 12000  # training texts used (seeded subset of the full training split; None: all)
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 32
    alpha: float = 0.5  # weight of the distillation loss; 1 - alpha on the label loss
    temperature: float = 1.0
    seed: int = 0
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # batches of similar length (data.batches): 1.85x faster on SST-2, so twice the texts in the same time; on three
    # points of a default compile's front, 12000 texts in grouped batches recovered +3.7 to +4.0 points where 6000
    # in random batches gave +0.8 to +2.9 (bench_recovery_settings); at equal texts (6000) grouped batches ended
    # lower on one point (bench_grouping)
    group_by_length: bool = True
    # weight of a hidden-state term (CoFi's and TinyBERT's layer distillation): the mean squared difference between
    # the student's hidden states (embeddings and every kept layer's output) and the full network's at the same
    # layers, over real tokens; the teacher runs beside the student at every step. 0: off
    hidden_weight: float = 0.0
    # keep the word embeddings as the super-network has them (half of all-MiniLM-L6-v2's weights: their gradient and
    # AdamW update are a large share of a step); bench_recovery_settings compares it with training them
    freeze_embeddings: bool = False
    # optimizer steps (does not change the result, so not part of key()); a checkpoint of all-MiniLM-L6-v2 with its
    # optimizer state is 260 MB, 0.3-2.5 s to write here: every 125 steps of a 375-step recovery, not every 50
    checkpoint_every: int = 125
    # the share of the steps after which a recovery's validation score is recorded (screen.json), to rank candidates
    # before recovering only the best of them to the end (toolchain.twins); does not change the weights
    screen: float = 0.25
    # whose logits a point distils: "supernet", the super-network's full network as trained; "recovered", the full
    # network after its own recovery (the unpruned reference; it is recovered from the super-network's, once)
    teacher: str = "supernet"

    def __post_init__(self):
        if self.samples is not None and self.samples < 1:
            raise RecoverError(f"--recover-samples must be positive, got {self.samples}")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1 or self.temperature <= 0:
            raise RecoverError("recovery epochs, lr, batch_size and temperature must be positive")
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise RecoverError("recovery alpha must be in [0, 1] and warmup_ratio in [0, 1)")
        if self.checkpoint_every < 1:
            raise RecoverError("recovery checkpoint_every must be >= 1")
        if self.hidden_weight < 0:
            raise RecoverError("recovery hidden_weight must be >= 0")
        if not 0.0 < self.screen <= 1.0:
            raise RecoverError(f"recovery screen must be in (0, 1], got {self.screen}")
        if self.teacher not in TEACHERS:
            raise RecoverError(f"recovery teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.teacher != "supernet" and self.hidden_weight > 0:
            raise RecoverError("recovery hidden_weight distils the super-network's hidden states: it needs teacher "
                               "'supernet'")

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """A short stable hash of the settings that change the recovered weights."""
        d = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}
        if d["teacher"] == "supernet":  # the default: the key of the settings before the option existed
            del d["teacher"]
        for name in ("hidden_weight", "freeze_embeddings"):  # off: the key of the settings before the option
            if not d[name]:  # existed (caches stay valid)
                del d[name]
        return _hash(d)


@dataclass
class RecoveredPoint:
    model: torch.nn.Module  # the sliced model with recovered weights (eval mode), ready for export
    info: dict = field(default_factory=dict)  # metric before/after, seconds, cached, ...
    path: Path | None = None  # the point's folder in the cache


def _hash(obj, n: int = 12) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ------------------------------------------------------------------------------------------------ cache layout
def cache_root(run: Run, cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else the folder that holds the super-network (``<run>/`` or a compile's cached super-network)."""
    return Path(cache_dir) if cache_dir is not None else run.cache_folder


def _selection(run: Run, settings: RecoverSettings) -> dict:
    """What decides the recovery texts, their tokenization and the teacher's logits on them."""
    data = {k: v for k, v in run.data.to_dict().items() if k not in ("max_train_samples", "max_eval_samples")}
    out = {"data": data, "samples": settings.samples, "seed": settings.seed, "supernet": run.weights_stamp()}
    if settings.teacher != "supernet":  # (the default: the key of the logits before the option existed)
        out["teacher"] = {"kind": settings.teacher, "recovered": _teacher_settings(settings).key()}
    return out


def _teacher_settings(settings: RecoverSettings) -> RecoverSettings:
    """The settings of the full network's recovery when it is the teacher (``teacher="recovered"``): the same,
    distilled from the super-network's full network."""
    return replace(settings, teacher="supernet")


def teacher_path(run: Run, settings: RecoverSettings | None = None, *, cache_dir: str | Path | None = None) -> Path:
    settings = settings or RecoverSettings()
    return cache_root(run, cache_dir) / "teacher" / f"{_hash(_selection(run, settings))}.npy"


def point_dir(run: Run, subnet: SubNetwork, settings: RecoverSettings | None = None, *,
              cache_dir: str | Path | None = None) -> Path:
    """The cache folder of a recovered point."""
    settings = settings or RecoverSettings()
    h = _hash({"selection": _selection(run, settings), "settings": settings.key(), "subnet": subnet.key()}, 8)
    return cache_root(run, cache_dir) / "recovered" / f"{subnet.key()}-{h}"


# ---------------------------------------------------------------------------------------------- data, teacher
def recovery_data(run: Run, settings: RecoverSettings | None = None) -> TextDataset:
    """The recovery texts: a seeded subset of ``settings.samples`` examples of the task's full training split
    (without ``max_train_samples``; without the ``holdout`` split when the run has one), in file order."""
    settings = settings or RecoverSettings()
    return replace(run.data, max_train_samples=None).load("train").sample(settings.samples, settings.seed)


def recovery_encoded(run: Run, settings: RecoverSettings) -> dict:
    """:func:`recovery_data` tokenized, once per run and selection (:meth:`toolchain.run.Run.encode`)."""
    return run.encode(("recovery", settings.samples, settings.seed), lambda: recovery_data(run, settings))


@torch.no_grad()
def _logits(model: torch.nn.Module, encoded: dict[str, torch.Tensor], batch_size: int = 64,
            desc: str | None = None, progress: bool = False) -> np.ndarray:
    """Logits of ``model`` on ``encoded`` in its row order (batched by length, so batches pad little)."""
    device = next(model.parameters()).device
    inputs = {k: v for k, v in encoded.items() if k != "labels"}
    order = torch.argsort(inputs["attention_mask"].sum(1))
    inputs = {k: v[order] for k, v in inputs.items()}
    out = []
    n = len(order)
    for b in tqdm(batches(inputs, batch_size), total=math.ceil(n / batch_size), desc=desc, disable=not progress,
                  leave=False):
        out.append(model(**{k: v.to(device) for k, v in b.items()}).logits.float().cpu())
    logits = torch.cat(out).numpy()
    result = np.empty_like(logits)
    result[order.numpy()] = logits
    return result


def teacher_logits(run: Run, settings: RecoverSettings | None = None, *, cache_dir: str | Path | None = None,
                   progress: bool = True, encoded: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """The teacher's logits on :func:`recovery_data` (float32, one row per text), computed once and cached in
    :func:`teacher_path`: the super-network's full network, or (``settings.teacher == "recovered"``) the full network
    after its own recovery (:func:`recover_point`, cached as any point). ``encoded``: the tokenized recovery data,
    when the caller has it already."""
    settings = settings or RecoverSettings()
    path = teacher_path(run, settings, cache_dir=cache_dir)
    if encoded is None:
        encoded = recovery_encoded(run, settings)
    n = len(encoded["input_ids"])
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape[0] == n:
                return cached
            log.warning("teacher logits %s hold %d rows for %d texts; recomputed", path, cached.shape[0], n)
        except (ValueError, OSError) as e:
            log.warning("teacher logits %s are unreadable (%s); recomputed", path, e)
    supernet = run.supernet
    supernet.model.eval()
    if settings.teacher == "recovered":
        full = recover_point(run, supernet.full(), _teacher_settings(settings), cache_dir=cache_dir, progress=progress)
        logits = _logits(full.model, encoded, desc="teacher", progress=progress).astype(np.float32)
    else:
        with supernet.use(supernet.full()) as model:
            logits = _logits(model, encoded, desc="teacher", progress=progress).astype(np.float32)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, logits, allow_pickle=False)

    write_atomic(path, save)
    return logits


# ---------------------------------------------------------------------------------------------------- recovery
def _load_point(run: Run, subnet: SubNetwork, folder: Path) -> RecoveredPoint | None:
    """A finished point from the cache (the sliced architecture rebuilt, then the recovered weights loaded)."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    info_path = folder / "info.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
        model = run.supernet.slice(subnet)
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    except Exception as e:  # noqa: BLE001 - a damaged point is recomputed
        log.warning("recovered point %s is damaged (%s: %s); recovering it again", folder, type(e).__name__, e)
        info_path.unlink(missing_ok=True)
        return None
    info.update(cached=True, load_seconds=round(time.perf_counter() - t0, 3))
    return RecoveredPoint(model.eval(), info, folder)


def recover_point(run: Run, subnet: SubNetwork, settings: RecoverSettings | None = None, *,
                  cache_dir: str | Path | None = None, progress: bool = True,
                  on_step: Callable[[int], None] | None = None) -> RecoveredPoint:
    """Slice ``subnet`` from the run's super-network, distil it from the full network, validate it before and after.

    Cached by (super-network weights, ``subnet.key()``, ``settings.key()``, data selection) in :func:`point_dir`: a
    second call loads the recovered weights instead of training (``info["cached"]`` is True). An interrupted
    recovery resumes from the checkpoint in the point's folder. ``on_step(step)`` is called after each optimizer
    step (and its checkpoint, if one is due); an exception it raises interrupts the recovery.

    ``info``: ``metric_before`` (shared weights) and ``metric_after`` (recovered), each the task's metrics on the
    run's validation split with ``score`` = the official metric, ``score_before`` / ``score_after``, ``steps``,
    ``resumed_from``, ``examples``, ``seconds`` (of the recovery), ``cached`` (+ ``load_seconds`` when it is), ...
    """
    settings = settings or RecoverSettings()
    if settings.teacher == "recovered" and subnet == run.supernet.full():  # the teacher itself: from the super-network
        settings = _teacher_settings(settings)
    folder = point_dir(run, subnet, settings, cache_dir=cache_dir)
    done = _load_point(run, subnet, folder)
    if done is not None:
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # left by a screening after the point was done
        return done
    return _recover(run, subnet, settings, folder, cache_dir=cache_dir, progress=progress, on_step=on_step)


def screen_step(settings: RecoverSettings, total_steps: int) -> int:
    """The step after which a recovery of ``total_steps`` records its screening score."""
    return min(total_steps, max(1, round(settings.screen * total_steps)))


def _read_screen(folder: Path) -> dict:
    try:
        return json.loads((folder / "screen.json").read_text())
    except (OSError, ValueError):
        return {}


def screen_point(run: Run, subnet: SubNetwork, settings: RecoverSettings | None = None, *,
                 cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """The validation metrics of ``subnet`` after the first ``settings.screen`` share of its recovery's steps.

    The recovery trains to that step (resuming from a checkpoint), records the score in ``screen.json`` and keeps
    its checkpoint there, so that :func:`recover_point` goes on from it to the same weights a recovery without the
    stop ends with; a point scored before (by a screening or a whole recovery) is not trained again. Returns
    ``step``, ``total_steps``, ``score`` (the official metric), ``metric`` (all of the task's), ``cached``.
    """
    settings = settings or RecoverSettings()
    folder = point_dir(run, subnet, settings, cache_dir=cache_dir)
    for _ in range(2):
        screen = _read_screen(folder)
        if screen:
            step = screen_step(settings, screen["total_steps"])
            if str(step) in screen["scores"]:
                return {**screen["scores"][str(step)], "step": step, "total_steps": screen["total_steps"],
                        "cached": True}
        result = _recover(run, subnet, settings, folder, cache_dir=cache_dir, progress=progress, screen_only=True)
        if result is not None:
            return {**result, "cached": False}
    raise RecoverError(f"the screening of {folder} did not record its score")  # not reached


def drop_checkpoint(run: Run, subnet: SubNetwork, settings: RecoverSettings | None = None, *,
                    cache_dir: str | Path | None = None) -> None:
    """Remove the checkpoint a screening left in ``subnet``'s folder (its ``screen.json`` stays)."""
    shutil.rmtree(point_dir(run, subnet, settings, cache_dir=cache_dir) / "checkpoint", ignore_errors=True)


def _recover(run: Run, subnet: SubNetwork, settings: RecoverSettings, folder: Path, *,
             cache_dir: str | Path | None, progress: bool, on_step: Callable[[int], None] | None = None,
             screen_only: bool = False) -> RecoveredPoint | dict | None:
    """Train (or go on training) one recovery; ``screen_only``: stop after its screening step and return the
    screening's result, ``None`` when the checkpoint is already past that step (the checkpoint is then removed)."""
    from safetensors.torch import save_file

    t0 = time.time()
    key = folder.name
    spec = run.spec
    regression = spec.is_regression
    validation = run.encoded("validation")
    before = Evaluator(run.supernet, validation, spec, param_count=run.space.num_parameters,
                       store=run.evaluation_store("validation"))(subnet)

    encoded = recovery_encoded(run, settings)
    teacher = torch.from_numpy(teacher_logits(run, settings, cache_dir=cache_dir, progress=progress,
                                              encoded=encoded))
    n = len(encoded["input_ids"])
    encoded["index"] = torch.arange(n)

    model = run.supernet.slice(subnet)
    if settings.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    device = next(model.parameters()).device
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total_steps = max(1, round(settings.epochs * steps_per_epoch))
    optimizer, scheduler = optimizer_and_schedule(model, settings.lr, settings.weight_decay, settings.warmup_ratio,
                                                  total_steps)

    ckpt = folder / "checkpoint"
    step, losses, resumed_from = 0, [], None
    screen = screen_step(settings, total_steps)
    if ckpt_exists(ckpt):
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        if state.get("key") != key or state.get("total_steps") != total_steps:
            raise CheckpointError(f"checkpoint {ckpt} belongs to another recovery; delete it to start again")
        step, losses, resumed_from = state["step"], state["losses"], state["step"]
        if screen_only and step > screen:  # past the step to score (by an older version): start again
            shutil.rmtree(ckpt)
            return None
        if screen_only and step == screen:  # stopped there before its score was recorded
            return _record_screen(folder, model, validation, spec, step, total_steps)
        log.info("resuming recovery %s from step %d/%d", key, step, total_steps)

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"recover {key}", disable=not progress)
    layered = settings.hidden_weight > 0  # the full network runs beside the student (its hidden states)
    stack = contextlib.ExitStack()
    full = stack.enter_context(run.supernet.use(None)) if layered else None
    if full is not None:
        full.eval()
    try:
        while step < total_steps:
            epoch, within = divmod(step, steps_per_epoch)
            order = batches(encoded, settings.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(settings.seed + epoch),
                            group_by_length=settings.group_by_length)
            for i, b in enumerate(order):
                if i < within:
                    continue
                torch.manual_seed(settings.seed * 1_000_003 + step)  # dropout of this step
                idx, labels = b.pop("index"), b.pop("labels")
                inputs = {k: v.to(device) for k, v in b.items()}
                out = model(**inputs, output_hidden_states=layered)
                loss = recovery_loss(out.logits, teacher[idx].to(device), labels.to(device), regression,
                                     settings.alpha, settings.temperature)
                if full is not None:
                    with torch.no_grad():
                        reference = full(**inputs, output_hidden_states=True).hidden_states
                    loss = loss + settings.hidden_weight * hidden_loss(out.hidden_states, reference, subnet.kept_layers,
                                                                       inputs["attention_mask"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.item()))
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                stop = screen_only and step == screen
                if (step % settings.checkpoint_every == 0 and step < total_steps) or stop:  # the last: the weights
                    save_checkpoint(ckpt, model, optimizer, scheduler,
                                     {"step": step, "total_steps": total_steps, "losses": losses, "key": key,
                                      "settings": settings.to_dict()})
                if step == screen:
                    scored = _record_screen(folder, model, validation, spec, step, total_steps)
                    if stop:
                        return scored
                if on_step is not None:
                    on_step(step)
                if step >= total_steps or step % steps_per_epoch == 0:
                    break
    finally:
        bar.close()
        stack.close()
    model.eval()

    after = score_model(model, validation, spec)
    info = {
        "key": key,
        "subnetwork": subnet.to_dict(),
        "subnetwork_key": subnet.key(),
        "settings": settings.to_dict(),
        "settings_key": settings.key(),
        "supernet": str(run.weights.parent),
        "supernet_identity": run.weights_stamp(),
        "teacher": str(teacher_path(run, settings, cache_dir=cache_dir)),
        "examples": n,
        "validation_examples": len(validation["labels"]),
        "metric": spec.metric,
        "metric_before": before,
        "metric_after": after,
        "score_before": before["score"],
        "score_after": after["score"],
        "steps": step,
        "total_steps": total_steps,
        "resumed_from": resumed_from,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "seconds": round(time.time() - t0, 2),
    }
    state = {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}
    write_atomic(folder / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_json_atomic(folder / "info.json", info)  # the point is complete from here on
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info("recovered %s: %s %.4f -> %.4f (%d steps, %.1f s)", key, spec.metric, before["score"],
             after["score"], step, info["seconds"])
    return RecoveredPoint(model, {**info, "cached": False}, folder)


def _record_screen(folder: Path, model: torch.nn.Module, validation: dict, spec, step: int, total_steps: int) -> dict:
    """Score the model in training on the validation set and add it to ``screen.json`` (the model stays in training
    mode; the dropout of each step is seeded, so scoring changes nothing that follows)."""
    model.eval()
    metric = score_model(model, validation, spec)
    model.train()
    screen = _read_screen(folder)
    if screen.get("total_steps") != total_steps:
        screen = {"total_steps": total_steps, "scores": {}}
    screen["scores"][str(step)] = {"score": metric["score"], "metric": metric}
    write_json_atomic(folder / "screen.json", screen, indent=1)
    log.info("screening %s: %s %.4f after %d of %d steps", folder.name, spec.metric, metric["score"], step,
             total_steps)
    return {"score": metric["score"], "metric": metric, "step": step, "total_steps": total_steps}


def recovery_summary(point: RecoveredPoint) -> dict:
    """What ``nasprune.json`` (``extra.recovery``), the manifest and the report say about a recovered point."""
    i = point.info
    return {"metric": i["metric"], "score_before": i["score_before"], "score_after": i["score_after"],
            "examples": i["examples"], "steps": i["steps"], "seconds": i["seconds"], "cached": i.get("cached", False),
            "settings_key": i["settings_key"], "cache": str(point.path)}
