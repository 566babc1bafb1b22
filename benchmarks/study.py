"""Stability over seeds: BCR vs explicit length penalties, each trained from the same SFT model.

``python -m benchmarks.study [key=value ...] [demo.<section>.<key>=value ...]`` (``--help`` lists
the options). For every seed it trains (or reuses) the demo's SFT model of that seed (at the shipped
model's settings, seed 0 of the defaults, the demo's stage copies that model; ``demo.train_sft=true``
trains it), then every
method from it with the demo's own stage functions: ``bcr`` (accuracy only) and ``kimi@w`` /
``linear@w`` (accuracy + w x the length term, like for like with bcr: same N mix, budget, steps).
After training it evaluates every final model, the SFT one included, at N = 1 on the seed's
held-out problems with the demo's eval settings, and writes into ``output_dir``:

- ``curves_<method>.png`` (training accuracy and tokens per problem over steps, seeds overlaid)
  and ``curves.png`` (the mean over seeds of every method);
- ``study.json`` / ``study.md``: per method the N = 1 accuracy and tokens per problem (mean over
  seeds, [min, max], per seed), how many runs collapsed (:func:`collapse`), the wall time of every
  unit and in total.

Layout: ``<output_dir>/seed<s>/{sft,bcr,kimi@w,linear@w}/`` (each a demo stage directory with its
``stage.json``) and ``<output_dir>/seed<s>/eval/<method>/``. Every finished unit gets a
``study_unit.json`` marker holding its settings and a run id; a later run skips a unit whose marker
matches (a unit whose input was re-trained re-runs), so an interrupted study resumes where it stopped.
``study_config.json`` holds the settings of the study; a restart in the same directory with other
settings is refused. ``study_log.jsonl`` gets one line per unit per invocation (ran or reused).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bcr.demo.config import SET_BY_DEMO, DemoConfig
from bcr.demo.stages import STAGE_FILE, _fresh_dir, eval_config, read_stage, run_bcr, run_length, run_sft
from bcr.demo.summary import collapse, moving_average  # the collapse rule, shared with the demo's RL seeds
from bcr.demo.task import make_task
from bcr.eval.sweep import evaluate_scaling
from bcr.runtime.dataclass_cli import ConfigError, check_fields, parse_cli
from bcr.runtime.io import atomic_write_json, atomic_write_text, check_output_dir
from bcr.runtime.metrics import progress_bar

from . import harness

CONFIG_FILE = "study_config.json"
UNIT_FILE = "study_unit.json"
LOG_FILE = "study_log.jsonl"
#: fields of ``demo`` the study sets itself, and from what
SET_BY_STUDY = {"output_dir": "output_dir/seed<s>", "seed": "seeds", "from_stage": "the study's units",
                "stop_after": "the study's units", "length_baseline": "kimi_weights / linear_weights",
                "length.method": "the method (kimi@w, linear@w)", "length.penalty_weight": "the method's weight"}
#: settings that change how a run looks, not its numbers (left out of the comparison on restart)
NOT_COMPARED = ("output_dir", "progress", "demo.progress", "demo.threads")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class StudyConfig:
    """The study: seeds x methods, each method an RL run from the SFT model of its seed."""

    output_dir: str = _help("study directory (one seed<s>/ per seed, the plots and study.json/.md)",
                            default="runs/study")
    seeds: list[int] = _help("seeds; each trains its own SFT model, problems and rollouts",
                             default_factory=lambda: [0, 1, 2])
    kimi_weights: list[float] = _help("weights of the Kimi-1.5 length reward; one run kimi@w each ([] for none)",
                                      default_factory=lambda: [0.25, 0.5, 1.0])
    linear_weights: list[float] = _help("weights of the -length / budget penalty; one run linear@w each ([] for none)",
                                        default_factory=lambda: [0.25, 0.5, 1.0])
    eval_problems: int | None = _help("held-out problems of the final N = 1 evaluation (None: demo.task.num_eval_problems)",
                                      default=None)
    progress: bool = _help("show the study's progress bar (demo.progress: the bars of each stage)", default=True)
    demo: DemoConfig = _help("the demo's settings of every stage, as demo.<section>.<key>=value "
                             "(e.g. demo.rl.max_steps=20); see bcr demo --help", default_factory=DemoConfig)

    def __post_init__(self) -> None:
        check_fields(self)  # types from the annotations
        self.seeds = _unique("seeds", [self.seeds] if isinstance(self.seeds, int) else self.seeds)
        for name in ("kimi_weights", "linear_weights"):
            value = getattr(self, name)
            value = _unique(name, [value] if isinstance(value, float) else value)
            if any(w < 0 for w in value):
                raise ConfigError(f"{name}={value!r}: weights must be >= 0")
            setattr(self, name, value)
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds={self.seeds!r}: give one or more seeds >= 0")
        if self.eval_problems is not None and self.eval_problems < 1:
            raise ConfigError(f"eval_problems={self.eval_problems!r}: must be >= 1 (or None)")
        _check_set_by_study(self.demo)

    @property
    def methods(self) -> list[str]:
        """The RL methods of every seed: ``bcr``, then ``kimi@w`` and ``linear@w`` per weight."""
        return ["bcr", *(f"kimi@{w:g}" for w in self.kimi_weights), *(f"linear@{w:g}" for w in self.linear_weights)]

    @property
    def num_eval_problems(self) -> int:
        return self.eval_problems or self.demo.task.num_eval_problems


def _unique(name: str, values: list) -> list:
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}={values!r}: a value repeats")
    return list(values)


def _check_set_by_study(demo: DemoConfig) -> None:
    """A clear error for a ``demo.`` option the study sets for each unit."""
    default = DemoConfig()
    for key, source in SET_BY_STUDY.items():
        value, wanted = demo, default
        for part in key.split("."):
            value, wanted = getattr(value, part), getattr(wanted, part)
        if value != wanted:
            raise ConfigError(f"demo.{key}={value!r}: the study sets this for each unit ({source}); leave it out")


def study_help(prog: str = "python -m benchmarks.study") -> str:
    """The study's own options, then the ``demo.`` options with the demo's defaults."""
    lines = [f"usage: {prog} [--config FILE.yaml] [key=value ...] [demo.<section>.<key>=value ...]",
             "", "options (key=value):"]
    cfg = StudyConfig()
    for f in dataclasses.fields(cfg):
        if f.name != "demo":
            lines.append(f"  {f.name} = {getattr(cfg, f.name)!r}\n      {f.metadata['help']}")
    lines += ["", "demo options (demo.key=value, demo.<section>.<key>=value; the defaults of bcr demo, "
              "whose --help describes each one):"]
    for f in dataclasses.fields(cfg.demo):
        value = getattr(cfg.demo, f.name)
        if not dataclasses.is_dataclass(value):
            if f.name not in SET_BY_STUDY:
                lines.append(f"  demo.{f.name} = {value!r}")
            continue
        skip = set(SET_BY_DEMO.get(f.name, {})) | {k.split(".")[1] for k in SET_BY_STUDY if k.startswith(f"{f.name}.")}
        lines += [f"  demo.{f.name}.{s.name} = {getattr(value, s.name)!r}" for s in dataclasses.fields(value)
                  if s.name not in skip]
    lines += ["", f"set by the study for each unit: {', '.join('demo.' + k for k in SET_BY_STUDY)}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Units: the SFT model, the RL runs and the N = 1 evaluations of one seed
# ----------------------------------------------------------------------------------------------
@dataclass
class Unit:
    """One resumable piece of the study: ``kind`` is sft, rl or eval; ``needs`` the units it reads."""

    name: str
    kind: str
    seed: int
    method: str
    path: Path
    needs: list[str]


def seed_config(cfg: StudyConfig, seed: int) -> DemoConfig:
    """The demo config of one seed: its stages live in ``<output_dir>/seed<s>/``."""
    return dataclasses.replace(cfg.demo, output_dir=str(Path(cfg.output_dir) / f"seed{seed}"), seed=seed)


def plan_units(cfg: StudyConfig) -> list[Unit]:
    """Every unit in order: all the training (per seed: SFT, then the methods), then the evaluations."""
    train, evals = [], []
    for seed in cfg.seeds:
        root = Path(cfg.output_dir) / f"seed{seed}"
        sft = f"seed{seed}/sft"
        train.append(Unit(sft, "sft", seed, "sft", root / "sft", []))
        evals.append(Unit(f"seed{seed}/eval/sft", "eval", seed, "sft", root / "eval" / "sft", [sft]))
        for method in cfg.methods:
            train.append(Unit(f"seed{seed}/{method}", "rl", seed, method, root / method, [sft]))
            evals.append(Unit(f"seed{seed}/eval/{method}", "eval", seed, method, root / "eval" / method,
                              [f"seed{seed}/{method}"]))
    return train + evals


def _jsonable(obj) -> Any:
    """``obj`` as it reads back from JSON (dict keys become strings), for comparisons with files."""
    return json.loads(json.dumps(obj, default=str))


def unit_settings(unit: Unit, cfg: StudyConfig, run_ids: dict[str, str]) -> dict:
    """What decides a unit's result: its own settings and the run ids of the units it reads."""
    demo = dataclasses.asdict(seed_config(cfg, unit.seed))
    if unit.kind == "sft":
        own = {k: demo[k] for k in ("seed", "task", "model", "sft")}
    elif unit.kind == "rl":
        own = {"seed": unit.seed, "method": unit.method, "rl": demo["rl"]}
        if unit.method != "bcr":
            own["length_max_completion_length"] = demo["length"]["max_completion_length"]
    else:
        own = {"seed": unit.seed, "method": unit.method, "eval": demo["eval"], "eval_problems": cfg.num_eval_problems}
    return _jsonable({"kind": unit.kind, **own, "inputs": {n: run_ids.get(n) for n in unit.needs}})


def finished_unit(unit: Unit, settings: dict) -> dict | None:
    """The marker of a finished unit whose settings match, else None (the unit must run)."""
    marker = unit.path / UNIT_FILE
    if not marker.is_file() or (unit.kind != "eval" and not (unit.path / STAGE_FILE).is_file()):
        return None
    record = json.loads(marker.read_text())
    return record if record.get("settings") == settings else None


def train_length(dcfg: DemoConfig, method: str, console: Console) -> dict:
    """The demo's stage length for one ``family@weight``, in the stage directory named ``method``."""
    family, weight = method.split("@")
    dcfg = dataclasses.replace(dcfg, length=dataclasses.replace(dcfg.length, method=family,
                                                                penalty_weight=float(weight)))
    return run_length(dcfg, console, stage=method)


def evaluate_n1(dcfg: DemoConfig, method: str, model: str, num_problems: int, out: Path) -> dict:
    """One model at N = 1 on the seed's first ``num_problems`` held-out problems, with the demo's eval
    settings (no plots); returns the summary row's numbers."""
    task = dataclasses.replace(dcfg.task, num_eval_problems=num_problems)
    _, problems = make_task(dataclasses.replace(dcfg, task=task, eval=dataclasses.replace(dcfg.eval, n_values=[1])))
    config = dataclasses.replace(eval_config(dcfg, out), n_values=[1], baseline=None, plots=False)
    summary = evaluate_scaling({method: model}, problems, config=config)
    row = next(r for r in summary["rows"] if r["n_problems"] == 1)
    keys = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "tokens_per_problem", "tokens_per_problem_ci_low",
            "tokens_per_problem_ci_high", "truncation_rate", "num_problems")
    return {k: row.get(k) for k in keys}


def run_unit(unit: Unit, cfg: StudyConfig, console: Console) -> dict:
    """Run one unit from scratch; returns ``{"seconds", ...}`` (the eval numbers for an eval unit)."""
    dcfg = seed_config(cfg, unit.seed)
    t0 = time.perf_counter()
    if unit.kind == "sft":
        run_sft(dcfg, console)
        return {"seconds": time.perf_counter() - t0}
    if unit.kind == "rl":
        record = run_bcr(dcfg, console) if unit.method == "bcr" else train_length(dcfg, unit.method, console)
        return {"seconds": time.perf_counter() - t0, "steps": record.get("steps")}
    model = read_stage(dcfg, unit.method)["model"]
    result = evaluate_n1(dcfg, unit.method, model, cfg.num_eval_problems, _fresh_dir(unit.path))
    return {"seconds": time.perf_counter() - t0, "eval": result}


# ----------------------------------------------------------------------------------------------
# The study: settings check, the unit loop, the outputs
# ----------------------------------------------------------------------------------------------
def study_settings(cfg: StudyConfig) -> dict:
    """The settings a restart must repeat (everything but where and how the study is shown)."""
    settings = _jsonable(dataclasses.asdict(cfg))
    for name in NOT_COMPARED:
        *parents, last = name.split(".")
        node = settings
        for p in parents:
            node = node[p]
        node.pop(last, None)
    return settings


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_study_config(cfg: StudyConfig) -> None:
    """Write ``study_config.json``, or refuse when the one already there holds other settings."""
    path = Path(cfg.output_dir) / CONFIG_FILE
    settings = study_settings(cfg)
    if path.is_file():
        old = json.loads(path.read_text()).get("settings")
        if old != settings:
            changed = _differences(old or {}, settings)
            raise ConfigError(f"{cfg.output_dir} holds a study with other settings ({path}); changed: "
                              f"{'; '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}. Re-run with the same "
                              "settings to resume it, or choose another output_dir")
        return
    atomic_write_json(path, {"settings": settings, "created": _now()})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _log(cfg: StudyConfig, row: dict) -> None:
    path = Path(cfg.output_dir) / LOG_FILE
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def run_study(cfg: StudyConfig, console: Console | None = None) -> dict:
    """Train and evaluate every unit (reusing finished ones), then write the plots and the summary."""
    console = console or Console()
    check_output_dir(cfg.output_dir)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    check_study_config(cfg)
    if cfg.demo.threads:
        torch.set_num_threads(cfg.demo.threads)
    t0 = time.perf_counter()
    units = plan_units(cfg)
    records: dict[str, dict] = {}
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("study", total=len(units), info="")
        for unit in units:
            bar.update(task, info=unit.name)
            records[unit.name] = _do_unit(unit, cfg, records, bar.console)
            bar.advance(task)
    summary = summarize(cfg, units, records, time.perf_counter() - t0)
    write_outputs(cfg, summary)
    console.print(f"study done in {summary['wall_seconds']:.0f} s ({summary['unit_seconds']:.0f} s of unit time): "
                  f"{Path(cfg.output_dir) / 'study.md'}")
    return summary


def _do_unit(unit: Unit, cfg: StudyConfig, records: dict[str, dict], console: Console) -> dict:
    """Reuse ``unit`` when its marker matches, else run it and write the marker; prints one line."""
    settings = unit_settings(unit, cfg, {n: records[n]["run_id"] for n in unit.needs})
    record = finished_unit(unit, settings)
    if record is not None:
        console.print(f"  {unit.name:<24} reused  ({record['seconds']:.1f} s when it ran)")
        _log(cfg, {"unit": unit.name, "action": "reused", "seconds": record["seconds"], "time": _now()})
        return {**record, "reused": True}
    console.print(f"[bold]{unit.name}[/] ...")
    result = run_unit(unit, cfg, console)
    record = {"unit": unit.name, "settings": settings, "run_id": uuid.uuid4().hex, "finished": _now(),
              **result, "seconds": round(result["seconds"], 2)}
    atomic_write_json(unit.path / UNIT_FILE, record)
    console.print(f"  {unit.name:<24} [green]done[/]    {record['seconds']:.1f} s")
    _log(cfg, {"unit": unit.name, "action": "ran", "seconds": record["seconds"], "time": _now()})
    return {**record, "reused": False}


def read_curves(path: Path) -> dict[str, list[float]]:
    """Steps, training accuracy and tokens per problem of one RL run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get("accuracy"), (int, float))]
    return {"step": [r["step"] for r in rows], "accuracy": [r["accuracy"] for r in rows],
            "tokens_per_problem": [r.get("tokens_per_problem", float("nan")) for r in rows]}


def _spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def summarize(cfg: StudyConfig, units: list[Unit], records: dict[str, dict], wall: float) -> dict:
    """``study.json``: per method the N = 1 numbers over seeds, the collapses, the curves, the times."""
    methods = {}
    for method in ["sft", *cfg.methods]:
        per_seed = {}
        for seed in cfg.seeds:
            row = {**records[f"seed{seed}/eval/{method}"]["eval"]}
            if method != "sft":
                curves = read_curves(Path(cfg.output_dir) / f"seed{seed}" / method)
                row.update(train=collapse(curves["accuracy"]), curves=curves)
            per_seed[str(seed)] = row
        entry = {"accuracy": _spread([r["accuracy"] for r in per_seed.values()]),
                 "tokens_per_problem": _spread([r["tokens_per_problem"] for r in per_seed.values()]),
                 "per_seed": per_seed}
        if method != "sft":
            entry["collapses"] = sum(r["train"]["collapsed"] for r in per_seed.values())
        methods[method] = entry
    unit_times = {u.name: {"seconds": records[u.name]["seconds"], "reused": records[u.name]["reused"]} for u in units}
    return {"seeds": cfg.seeds, "methods": methods, "eval_problems": cfg.num_eval_problems,
            "rl_steps": cfg.demo.rl.max_steps, "sft_steps": cfg.demo.sft.steps,
            "unit_seconds": round(sum(t["seconds"] for t in unit_times.values()), 2),
            "wall_seconds": round(wall, 2), "units": unit_times, "settings": study_settings(cfg)}


# ----------------------------------------------------------------------------------------------
# Outputs: plots, study.json, study.md
# ----------------------------------------------------------------------------------------------
def _two_panels(title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, label in zip(axes, ("training accuracy", "tokens per problem")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    fig.suptitle(title)
    return fig, axes


def _mean_curve(runs: list[dict], key: str) -> tuple[list, list]:
    """Steps every run has, and the mean over runs of their moving average of ``key``."""
    window = max(1, min(len(r["step"]) for r in runs) // 10)
    smooth = [dict(zip(r["step"][window - 1:], moving_average(r[key], window))) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in smooth)))
    return steps, [sum(s[t] for s in smooth) / len(smooth) for t in steps]


def write_plots(cfg: StudyConfig, summary: dict) -> list[str]:
    """``curves_<method>.png`` per method (seeds overlaid; raw faint, moving average solid) and
    ``curves.png`` (the mean over seeds of every method's moving average)."""
    out, files = Path(cfg.output_dir), []
    rl = {m: e for m, e in summary["methods"].items() if m != "sft"}
    for method, entry in rl.items():
        fig, axes = _two_panels(f"{method}: {len(cfg.seeds)} seeds")
        for i, (seed, row) in enumerate(entry["per_seed"].items()):
            c, window = row["curves"], row["train"]["window"]
            for ax, key in zip(axes, ("accuracy", "tokens_per_problem")):
                ax.plot(c["step"], c[key], color=f"C{i % 10}", alpha=0.25, lw=0.8)
                ax.plot(c["step"][window - 1:], moving_average(c[key], window), color=f"C{i % 10}",
                        label=f"seed {seed}" + (" (collapsed)" if row["train"]["collapsed"] else ""))
        axes[0].legend(fontsize=8)
        harness.save_figure(fig, out / f"curves_{method}.png")
        files.append(f"curves_{method}.png")
    fig, axes = _two_panels(f"mean over seeds {cfg.seeds} (moving average)")
    for i, (method, entry) in enumerate(rl.items()):
        runs = [row["curves"] for row in entry["per_seed"].values()]
        for ax, key in zip(axes, ("accuracy", "tokens_per_problem")):
            ax.plot(*_mean_curve(runs, key), color=f"C{i % 10}", label=method)
    axes[0].legend(fontsize=8)
    harness.save_figure(fig, out / "curves.png")
    return [*files, "curves.png"]


def _range(spread: dict, scale: float = 1.0, digits: int = 1) -> str:
    if spread["mean"] is None:
        return "-"
    return f"{scale * spread['mean']:.{digits}f} [{scale * spread['min']:.{digits}f}, {scale * spread['max']:.{digits}f}]"


def render_markdown(cfg: StudyConfig, summary: dict, plots: list[str]) -> str:
    """``study.md``: the method table, the per-seed numbers, the plots and the unit times."""
    seeds = cfg.seeds
    lines = ["# Stability over seeds: BCR vs explicit length penalties", "",
             f"Seeds {seeds}; SFT {summary['sft_steps']} steps, RL {summary['rl_steps']} steps per run; N = 1 "
             f"evaluation on {summary['eval_problems']} held-out problems per seed (the demo's eval settings). "
             "Mean over seeds [min, max]. A run collapses when its training accuracy (moving average over "
             "max(1, steps // 10) steps) falls below half of its peak and is still below it at the last step.", "",
             "| method | accuracy % | tokens / problem | collapses | accuracy % per seed | tokens per seed |",
             "|---|---|---|---|---|---|"]
    for method, e in summary["methods"].items():
        acc = ", ".join(f"{100 * r['accuracy']:.1f}" for r in e["per_seed"].values())
        tok = ", ".join(f"{r['tokens_per_problem']:.1f}" for r in e["per_seed"].values())
        collapses = f"{e['collapses']} / {len(seeds)}" if "collapses" in e else "-"
        lines.append(f"| {method} | {_range(e['accuracy'], 100)} | {_range(e['tokens_per_problem'])} | {collapses} "
                     f"| {acc} | {tok} |")
    lines += ["", *(f"![{p}]({p})" for p in plots), "",
              f"Wall time {summary['wall_seconds']:.0f} s this invocation; {summary['unit_seconds']:.0f} s of unit "
              "time in all (reused units count the time they took when they ran).", "",
              "| unit | seconds | this invocation |", "|---|---|---|"]
    for name, t in summary["units"].items():
        lines.append(f"| {name} | {t['seconds']:.1f} | {'reused' if t['reused'] else 'ran'} |")
    return "\n".join(lines) + "\n"


def write_outputs(cfg: StudyConfig, summary: dict) -> None:
    """The plots, ``study.json`` and ``study.md`` in ``output_dir``."""
    plots = write_plots(cfg, summary)
    atomic_write_json(Path(cfg.output_dir) / "study.json", {**summary, "plots": plots})
    atomic_write_text(Path(cfg.output_dir) / "study.md", render_markdown(cfg, summary, plots))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.study [key=value ...] [demo.<section>.<key>=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(study_help())
        return 0
    try:
        cfg = parse_cli(StudyConfig, argv, prog="python -m benchmarks.study")
        run_study(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
