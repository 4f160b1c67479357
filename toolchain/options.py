"""What a compile (or one stage command) is asked to do: :class:`CompileOptions`, the budget ``PRESETS``, and the
errors a compile reports to the user."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from latency_models.grid import check_sequence_length
from latency_models.lookup_table import LatencyTable
from targets import Target, load_target
from toolchain.core.modeling import ModelDims, check_max_length, load_config
from toolchain.core.search_space import SPACE_NAMES
from toolchain.evaluation import DTYPES
from toolchain.latency_settings import at_length, parse_sequence_length, sequence_length_for
from toolchain.recover import RecoverSettings
from toolchain.run import DataSettings, Run, default_init
from toolchain.search.executors import check_executor
from toolchain.search.objectives import METHODS, check_constraints, check_objectives
from toolchain.training import TrainConfig

PRESETS: dict[str, dict] = {
    # budgets sized for a 2-core CPU: quick ~5 min, default within 20 min (first run, profiling and recovery
    # included: benchmarks/bench_compile.py, README "A real run"); 10 end-to-end sub-networks each to calibrate and
    # to validate the latency table (each is exported and measured beside the unpruned one, about 9 s: 16 did not
    # fit; refitted on 10 of their 12 samples, 13 tables predicted their held-out sub-networks as well as on 12, on 8
    # worse: benchmarks/bench_calibration_size.py)
    "quick": dict(max_train_samples=1500, epochs=1.0, n_evals=60, pop_size=12, search_eval_samples=200, n_export=2,
                  unit_step=384, calibration_samples=8, validation_samples=8, rfp_samples=256,
                  recover_samples=3000, selection_samples=500),
    "default": dict(max_train_samples=6000, epochs=1.0, n_evals=200, pop_size=20, search_eval_samples=400, n_export=4,
                    unit_step=128, calibration_samples=10, validation_samples=10, rfp_samples=512,
                    recover_samples=12000, selection_samples=2000),
    "paper": dict(max_train_samples=None, epochs=5.0, n_evals=1000, pop_size=50, search_eval_samples=None, n_export=5,
                  unit_step=64, calibration_samples=30, validation_samples=30, rfp_samples=2048,
                  recover_samples=None, selection_samples=5000),
}


class CompileError(RuntimeError):
    pass


class InfeasibleError(CompileError):
    """No evaluated sub-network meets the constraints (the message shows the closest ones)."""


@dataclass
class CompileOptions:
    model: str | None = None
    data: DataSettings = field(default_factory=DataSettings)
    target: str = "cpu"
    latency_table: str | None = None
    precision: str | None = None
    max_latency: float | None = None  # ms
    max_memory: float | None = None  # MB
    max_params: float | None = None
    objectives: tuple[str, ...] = ("error", "latency")
    space: str = "medium"
    strategy: str | None = None  # None: "standard" with method "rfp" (it prunes a plain fine-tuning), else "kd"
    method: str = "nsga2"
    preset: str = "default"
    n_evals: int | None = None
    max_search_seconds: float | None = None
    search_eval_samples: int | None = None
    n_export: int | None = None
    max_train_samples: int | None = None
    epochs: float | None = None
    rfp_samples: int | None = None  # --method rfp: training examples for the mask gradients and the rescaling
    # end-to-end sub-networks a new latency table is calibrated and validated on (toolchain.tables; None: preset)
    calibration_samples: int | None = None
    validation_samples: int | None = None
    reorder: bool = True
    init: str | None = None  # where the super-network starts (run.train_run); None: run.default_init(strategy)
    output: str | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    executor: str = "local"  # where search candidates are evaluated: local | ray (docs/scaling.md)
    workers: int | None = None  # Ray workers (default: the cluster's CPUs)
    ray_address: str | None = None  # an existing Ray cluster (default: a local instance)
    search_batch_size: int | None = None  # random / local search: candidates per batch
    measured: str | None = None  # nasprune export: figures measured on the device (run_profile.py --measure-points)
    max_accuracy_drop: float | None = None  # points of the task metric (x100) below the unpruned model's, at most
    min_metric: float | None = None  # the task metric every shipped point must reach (e.g. 0.85 accuracy)
    recover: bool = True  # distil every exported point from the full network first (toolchain.recover)
    recover_samples: int | None = None  # training texts for recovery (preset; the preset "paper": all of them)
    # unused training examples the export scores every model on besides dev, to choose by (toolchain.heldout; 0: dev)
    selection_samples: int | None = None
    # recover each point's uniform twin too and export the better of the two (toolchain.twins)
    uniform_twin: bool = True
    # and its Fisher twin (retraining-free pruning's mask at the point's latency, gradients on rfp_samples texts)
    fisher_twin: bool = True
    # the length latency is predicted and measured at: N tokens, or "data" (a quantile of the training lengths);
    # None: the target's (toolchain.latency_settings)
    sequence_length: int | str | None = None
    sequence_length_quantile: float | None = None  # with "data": this quantile (default 0.95)
    # the search's latency limit holds for the table's upper bound at this confidence (LatencyTable.latency_bound);
    # None: for its point prediction
    latency_confidence: float | None = None
    # the search's shared-weight evaluations: auto = bf16 autocast where the CPU has native bf16 (1.55x faster on
    # this project's AVX512-BF16 machine, scores within 0.0075 of fp32, 0.0007 on average, rank correlation 0.9994:
    # benchmarks/bench_search_dtype.py), else fp32
    search_dtype: str = "auto"

    def __post_init__(self):
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 100:
            raise CompileError(f"--max-accuracy-drop must be between 0 and 100 points, got {self.max_accuracy_drop:g}")
        if self.latency_confidence is not None and not 0 < self.latency_confidence < 1:
            raise CompileError(f"--latency-confidence must be between 0 and 1 (e.g. 0.95), got "
                               f"{self.latency_confidence:g}")
        for flag, value in (("--selection-samples", self.selection_samples),
                            ("--calibrate-samples", self.calibration_samples),
                            ("--validate-samples", self.validation_samples)):
            if value is not None and value < 0:
                raise CompileError(f"{flag} must be 0 or more, got {value}")
        if self.search_dtype not in DTYPES:
            raise CompileError(f"search dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got "
                               f"{self.search_dtype!r}")
        self.sequence_length = parse_sequence_length(self.sequence_length)
        if self.strategy is None:
            self.strategy = "standard" if self.method == "rfp" else "kd"

    def metric_floor(self, unpruned_metric: float | None) -> float | None:
        """The metric a shipped point must reach: ``min_metric`` and/or the unpruned model's metric minus
        ``max_accuracy_drop`` points, whichever is higher; ``None`` without an accuracy limit."""
        floors = [self.min_metric] if self.min_metric is not None else []
        if self.max_accuracy_drop is not None:
            if unpruned_metric is None:
                raise CompileError("--max-accuracy-drop needs the unpruned model's metric, and it has none")
            floors.append(unpruned_metric - self.max_accuracy_drop / 100.0)
        return max(floors) if floors else None

    def budget(self, key: str):
        """An explicit option wins over the preset."""
        if self.preset not in PRESETS:
            raise CompileError(f"unknown preset '{self.preset}'; choose one of: {', '.join(PRESETS)}")
        value = getattr(self, key, None)
        return PRESETS[self.preset][key] if value is None else value

    def resolved_init(self) -> str:
        """Where the super-network starts: ``init``, else :func:`toolchain.run.default_init` of the strategy."""
        return self.init or default_init(self.strategy)

    def constraints(self, table=None) -> dict[str, float]:
        """The search's constraints: ``{"latency": ms, "memory": MB, "params": n}``, those that are set. With
        ``latency_confidence`` and the latency ``table``, the latency limit holds for the table's upper bound at that
        confidence, a candidate's prediction times one factor (:meth:`LatencyTable.latency_bound`): the limit on
        the prediction is then ``max_latency / factor``."""
        latency = self.max_latency
        if latency is not None and self.latency_confidence is not None and table is not None:
            latency = latency / table.latency_bound(self.latency_confidence)["factor"]
        return {k: v for k, v in (("latency", latency), ("memory", self.max_memory),
                                  ("params", self.max_params)) if v is not None}

    def sequence_length_choice(self) -> tuple[int | None, str | None]:
        """``(length, why)`` of ``--sequence-length`` (``data``: of the training texts the run trains on)."""
        data = replace(self.data, max_train_samples=self.data.max_train_samples or self.budget("max_train_samples"),
                       seed=self.seed)
        return sequence_length_for(self.sequence_length, data, self.model, self.sequence_length_quantile)

    def resolved_target(self, target: Target | str | None = None) -> Target:
        """``target`` (default: ``self.target``) at the sequence length asked for; ``data``'s choice is printed."""
        n, why = self.sequence_length_choice()
        if self.sequence_length == "data" and self.progress:
            print(f"sequence length {n}: {why}", flush=True)
        return at_length(load_target(target or self.target), n)

    def check(self) -> tuple[Target, str]:
        """Everything a compile can be refused for, checked before any folder exists (so the corrected command
        needs no ``--resume`` / ``--overwrite``): preset, search, target and precision (profiled here, or brought
        with ``--latency-table``), executor, task, data files and columns, model, lengths, training settings.
        Returns the target and the precision."""
        for key in PRESETS["default"]:
            self.budget(key)  # unknown preset
        check_objectives(self.objectives)
        check_constraints(self.constraints())
        if self.method not in (*METHODS, "rfp"):
            raise CompileError(f"unknown method '{self.method}'; choose one of: {', '.join(METHODS)}, rfp")
        target = load_target(self.target)
        precision = target.check_precision(self.precision)
        table = LatencyTable.load(self.latency_table) if self.latency_table else None
        if table is None:
            target.check_host()  # profiled here: e.g. --target arm64 on an x86_64 machine is refused
        target.check_available()  # export runs here: e.g. --target cuda without a GPU
        check_executor(self.executor, self.workers, self.ray_address)
        spec = self.data.spec()  # unknown task
        self.data.load("validation")  # data files, columns
        self.data.load("train")
        config = load_config(self.model, spec.num_labels, spec.is_regression)[1]  # the model exists and loads
        check_max_length(config, self.data.max_length)
        target = self.resolved_target(target)  # --sequence-length (data: once the data and the model are checked)
        check_sequence_length(config, target)
        if table is not None:
            table.check_model(ModelDims.from_config(config))
        if self.space.lower() not in SPACE_NAMES:
            raise CompileError(f"unknown search space '{self.space}'; choose one of: {', '.join(SPACE_NAMES)}")
        TrainConfig(strategy=self.strategy, epochs=self.budget("epochs"), seed=self.seed)
        self.recover_settings()
        return target, precision

    def recover_settings(self) -> RecoverSettings:
        """How each exported point is recovered (:mod:`toolchain.recover`): the preset's number of texts."""
        return RecoverSettings(samples=self.budget("recover_samples"), seed=self.seed)

    def default_output(self) -> Path:
        target = Path(self.target).stem
        budget = f"-{self.max_latency:g}ms" if self.max_latency else ""
        return Path("nasprune-out") / f"{self.data.name}-{target}{budget}"

    def for_run(self, run: Run) -> CompileOptions:
        """These options over a trained run folder (``nasprune search`` / ``export``): model, data, search space and
        training as the run was made, and the sequence length it was compiled at (unless given)."""
        s, compiled = run.settings, run.settings.get("compile") or {}
        length = compiled.get("sequence_length") if compiled.get("sequence_length_from") else None  # else the target's
        return replace(self, model=self.model or s.get("model"), data=run.data, space=s.get("space", self.space),
                       strategy=(s.get("train") or {}).get("strategy", self.strategy),
                       init=s.get("init", "pretrained"), reorder=s.get("reorder", self.reorder),
                       sequence_length=self.sequence_length or length)
