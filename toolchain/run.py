"""A run folder: what the stages (train, evaluate, search, export) share on disk.

    <run>/run.json               settings of the run (model, task/data, space, strategy, seed, budgets, dims)
    <run>/supernet/              the trained super-network: config.json, model.safetensors, tokenizer, importance.json
    <run>/checkpoints/last/      the latest training checkpoint (resume)
    <run>/search_history.csv     every evaluated candidate (search stage)
    <run>/pareto.json            the search result
    <run>/points/<id>/           exported artifacts; manifest.json, pareto.png, report.html
    <run>/.nasprune-run          the marker: nasprune made this folder (only such a folder is ever replaced)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from toolchain.core.atomic import write_json_atomic
from toolchain.core.data import TaskSpec, TextDataset, get_task, load_custom, load_task, tokenize
from toolchain.core.modeling import ModelDims, check_max_length, load_config, load_model, set_label_names
from toolchain.core.search_space import SPACE_NAMES, SearchSpace, fixed_parameters, make_space
from toolchain.core.supernet import SuperNetwork
from toolchain.training import TrainConfig, train

log = logging.getLogger(__name__)


class RunError(ValueError):
    pass


@dataclass
class DataSettings:
    """Where the task's data comes from (a GLUE task, or custom files)."""

    task: str = "sst2"
    data_dir: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    label_column: str = "label"
    regression: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128
    seed: int = 0
    # fraction of the training data held out (seeded by ``seed``) as split "holdout": the data a search scores
    # candidates on when the validation (dev) set is kept as a test set; ``max_train_samples`` then draws from the rest
    holdout: float | None = None

    def to_dict(self) -> dict:
        """The settings as stored in run.json and cache keys (``holdout`` only when set, so runs and caches made
        before it existed keep their keys)."""
        d = asdict(self)
        if d["holdout"] is None:
            del d["holdout"]
        return d

    @property
    def name(self) -> str:
        """What the data is called in settings, reports and folder names: the GLUE task, or ``custom`` for files."""
        return "custom" if self.train_file or self.validation_file else self.task

    def describe(self) -> str:
        """For tables and messages: the GLUE task, or ``custom (train.csv, dev.csv)`` (the files' names)."""
        files = [Path(f).name for f in (self.train_file, self.validation_file) if f]
        return f"custom ({', '.join(files)})" if files else self.task

    def spec(self) -> TaskSpec:
        if self.train_file or self.validation_file:
            return self.load("validation").spec
        return get_task(self.task)

    def load(self, split: str) -> TextDataset:
        """``train``, ``validation`` or ``holdout`` (needs ``holdout``; then ``train`` is what is left of it)."""
        if split == "holdout" and not self.holdout:
            raise RunError("the holdout split needs DataSettings.holdout (a fraction of the training data)")
        if split in ("train", "holdout") and self.holdout:
            rest, held = self._load_full("train").split(self.holdout, seed=self.seed)
            if split == "holdout":
                return held
            return _limit(rest, self.max_train_samples, self.seed)
        limit = self.max_train_samples if split == "train" else self.max_eval_samples
        return _limit(self._load_full(split), limit, self.seed)  # GLUE and custom files alike: a seeded subset

    def _load_full(self, split: str) -> TextDataset:
        if self.train_file or self.validation_file:
            path = self.train_file if split == "train" else self.validation_file
            if not path:
                raise RunError(f"custom data needs --{'train' if split == 'train' else 'validation'}-file")
            names = None
            if split != "train" and self.train_file:
                names = load_custom(self.train_file, tuple(self.text_columns), self.label_column, self.regression).spec.label_names
            return load_custom(path, tuple(self.text_columns), self.label_column, self.regression, label_names=names)
        return load_task(self.task, split, data_dir=self.data_dir)


def _limit(ds: TextDataset, limit: int | None, seed: int) -> TextDataset:
    """:meth:`TextDataset.sample`, with a bad limit reported as a :class:`RunError`."""
    if limit is not None and limit <= 0:
        raise RunError(f"a sample limit must be positive, got {limit}")
    return ds.sample(limit, seed)


@dataclass
class Run:
    folder: Path
    settings: dict
    supernet: SuperNetwork
    tokenizer: object
    space: SearchSpace
    data: DataSettings

    @property
    def spec(self) -> TaskSpec:
        return self.data.spec()

    #: what :meth:`encode` tokenized, by key (per Run: recoveries, screenings and evaluations share it)
    _encoded: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def encoded(self, split: str = "validation", max_samples: int | None = None, seed: int = 0) -> dict:
        """A seeded subset of ``split`` tokenized at the run's ``max_length`` (:meth:`encode`)."""
        return self.encode(("split", split, max_samples, seed), lambda: self.data.load(split).sample(max_samples, seed))

    def encode(self, key, texts: Callable[[], TextDataset]) -> dict:
        """``texts()`` tokenized at the run's ``max_length``, once per ``key`` and Run; a new dict of the same
        tensors each call (add keys to it freely; the tensors are shared, do not change them in place)."""
        if key not in self._encoded:
            self._encoded[key] = tokenize(texts(), self.tokenizer, self.data.max_length)
        return dict(self._encoded[key])

    @property
    def weights(self) -> Path:
        """The super-network's weights file (a compile's run shares a cached one)."""
        return Path(self.settings.get("supernet_dir") or self.folder / "supernet") / "model.safetensors"

    @property
    def cache_folder(self) -> Path:
        """The folder that holds the super-network: where what is derived from its weights is kept."""
        return self.weights.parent.parent

    def weights_stamp(self) -> str:
        """Which weights these are (the file's size and modification time): caches named after it never meet
        re-trained weights."""
        st = self.weights.stat()
        return hashlib.sha1(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()[:10]

    def evaluation_store(self, split: str = "validation", max_samples: int | None = None, seed: int = 0,
                         dtype: str = "fp32") -> Path:
        """Where the metrics of sub-networks on this data are kept for reuse: beside the super-network's weights
        (shared by every compile that uses them), named after the data subset, :meth:`weights_stamp` and the
        evaluations' ``dtype`` (bf16 results apart from fp32 ones)."""
        suffix = "" if dtype == "fp32" else f"-{dtype}"
        return (self.cache_folder / "evaluations"
                / f"{split}-{max_samples or 'all'}-seed{seed}-{self.weights_stamp()}{suffix}.jsonl")


# ------------------------------------------------------------------------------------------------ run folders
#: the file that says "nasprune made this folder": only a folder holding it is ever deleted or replaced
RUN_MARKER = ".nasprune-run"
RUN_MARKER_FORMAT = {"format": "nasprune-run", "version": 1}


def is_run_folder(folder: str | Path) -> bool:
    return (Path(folder) / RUN_MARKER).is_file()


def make_run_folder(folder: Path, kind: str) -> Path:
    """Create ``folder`` (a ``kind`` run: ``compile``, ``train``) with its marker. A folder that exists already and
    holds files but no marker is used as it is, unmarked: nasprune never deletes what it did not make."""
    existed = folder.is_dir() and any(folder.iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    if not existed and not is_run_folder(folder):
        write_json_atomic(folder / RUN_MARKER, {**RUN_MARKER_FORMAT, "kind": kind})
    return folder


def check_replaceable(folder: Path, option: str = "--overwrite") -> None:
    """A :class:`RunError` unless ``folder`` is absent or a run folder nasprune made (its marker)."""
    if folder.exists() and not is_run_folder(folder):
        raise RunError(f"{folder} is not a folder nasprune made (no {RUN_MARKER} in it), so {option} leaves it and "
                       "its files untouched; choose another output folder, or move it away yourself")


def remove_run_folder(folder: Path, option: str = "--overwrite") -> None:
    """Delete ``folder`` if nasprune made it; otherwise raise (:func:`check_replaceable`) and touch nothing."""
    check_replaceable(folder, option)
    if folder.exists():
        shutil.rmtree(folder)


def check_output(out: Path, resume: bool, overwrite: bool) -> Path:
    """The ``<out>.partial`` folder a compile builds ``out`` in, after checking that it may start or resume there;
    nothing is created or removed yet (:func:`start_output`). Only folders nasprune made (their marker) are ever
    replaced; anything else is refused and left untouched."""
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        if not overwrite:
            raise RunError(f"{out} already holds a finished run; pass --overwrite to replace it, or --output")
        check_replaceable(out)
    if partial.exists() and resume:
        if not (partial / "run.json").is_file():
            raise RunError(f"{partial} holds no run to resume (no run.json); start again without --resume")
    elif partial.exists():
        if not overwrite:
            raise RunError(f"{partial} holds an unfinished run; pass --resume to continue it, or --overwrite to "
                           "start again")
        check_replaceable(partial)
    return partial


def start_output(partial: Path, resume: bool) -> Path:
    """The ``.partial`` folder to build the run in: kept (``resume``), or made anew with its marker."""
    if not resume:
        remove_run_folder(partial)
    return make_run_folder(partial, "compile")


def finish_output(partial: Path, out: Path) -> None:
    """Rename the finished ``partial`` to ``out``; a previous run there (``--overwrite``) goes only once the new one
    is in place."""
    old = out.with_name(f".{out.name}.old")
    remove_run_folder(old)
    if out.exists():
        check_replaceable(out)
        out.rename(old)
    partial.rename(out)
    remove_run_folder(old)


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "this folder"):
    """Hold an exclusive lock on ``<folder>.lock`` (``fcntl.flock``, POSIX; elsewhere nothing is locked) while
    the block runs: a second process waits, with a message, until the first one is done with ``what``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another nasprune process that works on %s (%s)", what, folder)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


INITS = ("pretrained", "finetuned")


def default_init(strategy: str) -> str:
    """Where a super-network starts unless told: from a standard fine-tuning (docs/benchmarks.md measures what that
    buys), or from the pre-trained model when the strategy is plain fine-tuning itself."""
    return "pretrained" if strategy == "standard" else "finetuned"


def train_run(folder: str | Path, *, model: str | None = None, data: DataSettings | None = None,
              space: str = "medium", train_config: TrainConfig | None = None, reorder: bool = True,
              init: str | None = None, overwrite: bool = False, progress: bool = True,
              stop_after: int | None = None) -> Run:
    """Stage ``train``: load, (re-order), train the super-network, save it in ``folder/supernet``.

    ``init="finetuned"`` first fine-tunes the full network the standard way (same data, epochs and batch size) in
    ``folder/finetuned`` and starts the super-network from it: with ``strategy="kd"`` every sub-network then learns
    from a trained teacher from the first step (docs/benchmarks.md measures what that buys).

    If ``folder`` holds an unfinished run with the same settings, training resumes from its checkpoint; a finished
    one is returned as is. Other settings in an existing folder need ``overwrite``.
    """
    folder = Path(folder)
    data = data or DataSettings()
    cfg = train_config or TrainConfig()
    init = init or default_init(cfg.strategy)
    if init not in INITS:
        raise RunError(f"unknown init '{init}'; choose one of: {', '.join(INITS)}")
    if init == "finetuned" and cfg.strategy == "standard":
        raise RunError("init 'finetuned' starts a super-network from a fine-tuned model; the 'standard' strategy "
                       "only fine-tunes, so use init 'pretrained' with it")
    spec = data.spec()  # everything that can be refused is checked before the folder exists
    check_max_length(load_config(model, spec.num_labels, spec.is_regression)[1], data.max_length)
    if space.lower() not in SPACE_NAMES:
        raise RunError(f"unknown search space '{space}'; choose one of: {', '.join(SPACE_NAMES)}")
    train_data = data.load("train")
    settings = {"model": model, "data": data.to_dict(), "space": space, "train": asdict(cfg), "reorder": reorder}
    if init != "pretrained":  # only then, so run folders made before the option keep matching
        settings["init"] = init
    run_json = folder / "run.json"
    if run_json.exists():
        try:
            old = json.loads(run_json.read_text())
        except ValueError as e:
            raise RunError(f"{run_json} is damaged ({e}); delete {folder} and run the same command again to train "
                           "anew") from None
        same = {k: old.get(k) for k in settings} == settings and old.get("init", "pretrained") == init
        if not same and not overwrite:
            raise RunError(f"{folder} holds a run with other settings; pass --overwrite to replace it, "
                           "or choose another output folder")
        if not same:
            remove_run_folder(folder)
        elif old.get("status") == "trained" and (folder / "supernet" / "model.safetensors").exists():
            log.info("super-network already trained in %s", folder)
            return load_run(folder)
    make_run_folder(folder, "train")
    write_json_atomic(run_json, {**settings, "status": "training"})

    source, finetune_s = model, None
    if init == "finetuned":
        base = train_run(folder / "finetuned", model=model, data=data, space=space,
                         train_config=replace(cfg, strategy="standard"), reorder=False, progress=progress)
        source, finetune_s = str(base.folder / "supernet"), base.settings["train_stats"]["seconds"]
    # a fresh head (and pooler, for a checkpoint without one) is drawn from torch's global generator: seed it, or
    # the same settings train another network whenever something earlier in the process (the profile stage's random
    # models, a retaken measurement) has drawn a different amount from it
    torch.manual_seed(cfg.seed)
    net, tokenizer = load_model(source, num_labels=spec.num_labels, regression=spec.is_regression,
                                label_names=spec.label_names)
    supernet = SuperNetwork(net)
    dims = supernet.dims
    search_space = make_space(space, dims, fixed_parameters(net))
    encoded = tokenize(train_data, tokenizer, data.max_length)
    importance = None
    if reorder and not (folder / "checkpoints" / "last").exists():
        importance = reorder_cached(supernet, encoded, folder, progress)
    stats = train(supernet, search_space, encoded, cfg, folder / "checkpoints", progress=progress, stop_after=stop_after)
    if finetune_s is not None:
        stats["finetune_seconds"] = finetune_s

    out = folder / "supernet"
    tmp = folder / "supernet.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from toolchain.core.slicing import save_sliced  # a full "slice" is the same file layout

    net.config.nasprune_heads = [dims.num_heads] * dims.num_layers
    net.config.nasprune_units = [dims.intermediate_size] * dims.num_layers
    save_sliced(net, tmp, tokenizer)
    if importance is not None or (folder / "importance.json").exists():
        shutil.copy(folder / "importance.json", tmp / "importance.json")
    write_json_atomic(tmp / "train_stats.json", {**stats, "train_examples": len(train_data)})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    write_json_atomic(run_json, {**settings, "status": "trained", "dims": dims.to_dict(),
                                 "fixed_params": search_space.fixed_params, "train_stats": stats})
    return load_run(folder)


def reorder_cached(supernet: SuperNetwork, encoded: dict, folder: Path, progress: bool) -> dict:
    from toolchain.importance import reorder_by_importance

    path = folder / "importance.json"
    if path.exists():
        imp = json.loads(path.read_text())
        supernet.reorder_(imp["head_order"], imp["unit_order"])
    else:
        imp = reorder_by_importance(supernet, encoded, progress=progress)
        write_json_atomic(path, imp)
    return imp


def read_json(path: Path, missing: str, remedy: str):
    """A run file's content; a :class:`RunError` saying ``missing`` when it is not there, or that it is damaged and
    ``remedy`` when it cannot be read."""
    if not path.exists():
        raise RunError(missing)
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RunError(f"{path} is damaged ({e}); {remedy}") from None


def load_run(folder: str | Path) -> Run:
    """Open a trained run folder (the super-network is loaded from safetensors)."""
    from toolchain.core.slicing import load_sliced

    folder = Path(folder)
    settings = read_json(folder / "run.json", f"{folder} is not a nasprune run folder (no run.json); create it "
                         "with `nasprune train`", f"delete {folder} to train it anew")
    if settings.get("status") != "trained":
        raise RunError(f"the super-network in {folder} is not trained yet (status: {settings.get('status')}); "
                       "run `nasprune train` again with the same options to resume")
    from transformers import AutoTokenizer

    supernet_dir = Path(settings.get("supernet_dir") or folder / "supernet")  # compile runs share a cached one
    if not supernet_dir.is_dir():
        raise RunError(f"the super-network of {folder} ({supernet_dir}) is gone; run the command that trained it "
                       "again (a compile trains it anew with the same options)")
    try:
        net = load_sliced(supernet_dir)
    except Exception as e:  # noqa: BLE001 - any damage is reported the same way
        raise RunError(f"cannot load the super-network in {supernet_dir} ({type(e).__name__}: {e}); it is damaged: "
                       f"delete {supernet_dir.parent} and run the command that trained it again") from None
    tokenizer = AutoTokenizer.from_pretrained(supernet_dir)
    data = DataSettings(**settings["data"])
    set_label_names(net.config, data.spec().label_names)  # also for super-networks saved before configs had them
    supernet = SuperNetwork(net)
    space = make_space(settings["space"], ModelDims(**settings["dims"]), settings["fixed_params"])
    return Run(folder, settings, supernet, tokenizer, space, data)
