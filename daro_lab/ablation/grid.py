"""Ablation grids: `experiments/ablations/NAME.toml` -> a validated plan of arms x seeds.

A grid file (every key but `arms` optional):

    description = "what the ablation asks"    # the parent run's note in the MLflow UI
    reference = "learned"                     # arm the paired tests compare against (default: first)
    seeds = 3                                 # default seed count (--seeds N overrides): seeds 0..N-1
                                              #   offset by the preset's `seed`; or a list [0, 1, 2]
    set = ["trainer.eval_every=10"]           # overrides for every arm, applied before the arms' own
    target_acc = "progress"                   # steps-to-target: 80% of the way from the mean starting accuracy
                                              #   to the best arm's mean final accuracy (the default, the
                                              #   convergence figure's too); a number; or "reference_final"
    init_seed = "shared"                      # "shared": every seed starts from one warm start (seeds vary the
                                              #   RL sampling only); "per_seed": model.init_seed = the seed
    balance_window = 10                       # last steps over which the loss-balance spread is averaged
    accuracy = "greedy"                       # held-out accuracy compared: "greedy" or "sampled" (avg@n), or
                                              #   "sampled:level_5": the level-5 held-out prompts only
    test = "t"                                # paired test against the reference: "t" or "wilcoxon"
    weight_stats = false                      # add weight variance / balance gap / stability columns
    num_cpus = 2                              # CPUs per arm: a Ray task's resources; process-pool size
    num_gpus = 1                              # GPUs per arm (Ray); default 1 for arms on trainer.device
                                              #   'cuda...', else 0. Arms on a GPU run one at a time locally

    [[arms]]
    name = "learned"                          # letters, digits, '-', '_', '.'; unique
    label = "DARO, learned weights"           # optional, shown in the summary and as a tag
    set = ["algo.method=daro"]                # the arm's config overrides

    [[arms]]
    name = "optimal-static"
    set = ["algo.method=static"]
    static_from = "learned"                   # frozen at the final weights of arm 'learned' (same seed)

Overrides are `section.key=value` (TOML values, as `--set`), or relative to the value before the
arm's overrides: `key*=2`, `key/=2` (integers stay integers; a non-integer result is an error).
The order is: preset file -> grid `set` -> command-line `--set`/`--steps` -> the arm's `set`; a
command-line override of a key that an arm sets is an error (it would silently undo the ablation).

Every error names the grid file and the key (or arm) at fault, and is raised before any run exists.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from daro_lab.ablation.summary import acc_key
from daro_lab.algorithms import METHODS
from daro_lab.config import Config, ConfigError, apply_overrides, build, check_ranges, config_from_dict, read_toml
from daro_lab.fields import REQUIRED, setting


class AblationError(ValueError):
    """A grid, preset, plan or resume that cannot be used; the message names the file, key or run."""


PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = PACKAGE_DIR.parent
TINY_PRESET = PACKAGE_DIR / "presets" / "demo.toml"  # the chain task
ARITHMETIC_PRESET = (
    PACKAGE_DIR / "presets" / "arithmetic.toml"
)  # the earlier demo task: a control without length structure
# `--preset paper` is the smallest model of the paper's setups; `paper/<model>` picks another one.
PAPER_DEFAULT_MODEL = "qwen2.5-math-1.5b"
PRESETS = ("tiny", "arithmetic", "paper")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class Arm:
    """One arm of a grid: a name, a label, its overrides, and where its frozen weights come from."""

    name: str
    label: str = ""
    set: list[str] = field(default_factory=list)
    static_from: str | None = None


@dataclass
class Grid:
    """A parsed grid file (see the module docstring)."""

    name: str
    path: str
    arms: list[Arm]
    description: str = ""
    reference: str = ""
    seeds: int | list[int] = 3
    set: list[str] = field(default_factory=list)
    target_acc: float | str = "progress"
    balance_window: int = 10
    test: str = "t"
    weight_stats: bool = False
    num_cpus: float = 2
    num_gpus: float | None = None
    accuracy: str = "greedy"
    init_seed: str = "shared"

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Finding files


def _experiments_dirs() -> list[Path]:
    """Where `experiments/` is looked for: the working directory, then the repository of this package."""
    out = [Path.cwd() / "experiments", REPO_DIR / "experiments"]
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    return uniq


def grid_path(name: str | Path) -> Path:
    """The grid file of ablation `name` (experiments/ablations/NAME.toml), or `name` itself if it is a file."""
    p = Path(name)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise AblationError(f"grid file not found: {p}")
        return p
    if not _NAME_RE.match(str(name)):
        raise AblationError(
            f"ablation name {str(name)!r} is not a file and not a grid name (letters, digits, '-', '_')"
        )
    tried = [d / "ablations" / f"{name}.toml" for d in _experiments_dirs()]
    for t in tried:
        if t.is_file():
            return t
    known = sorted({f.stem for d in _experiments_dirs() for f in (d / "ablations").glob("*.toml")})
    raise AblationError(
        f"no ablation grid {str(name)!r}: looked for {', '.join(str(t) for t in tried)} "
        f"(known grids: {', '.join(known) or 'none'})"
    )


def list_grids() -> list[str]:
    """Names of the grid files under experiments/ablations/."""
    return sorted({f.stem for d in _experiments_dirs() for f in (d / "ablations").glob("*.toml")})


def preset_path(preset: str | Path) -> Path:
    """The base config of a sweep: 'tiny' (the embedded demo preset, the chain task), 'arithmetic' (the tiny
    model on addition), 'paper' (the paper's setup of its smallest model,
    experiments/paper/qwen2.5-math-1.5b/daro.toml), 'paper/<model>' (experiments/paper/<model>/daro.toml),
    or a path to a TOML config."""
    s = str(preset)
    if s == "tiny":
        return TINY_PRESET
    if s == "arithmetic":
        return ARITHMETIC_PRESET
    if s == "paper" or s.startswith("paper/"):
        model = s.split("/", 1)[1] if "/" in s else PAPER_DEFAULT_MODEL
        tried = [d / "paper" / model / "daro.toml" for d in _experiments_dirs()]
        for t in tried:
            if t.is_file():
                return t
        have = sorted(
            {
                p.name
                for d in _experiments_dirs()
                if (d / "paper").is_dir()
                for p in (d / "paper").iterdir()
                if (p / "daro.toml").is_file()
            }
        )
        raise AblationError(
            f"preset {s!r}: no paper config at {', '.join(str(t) for t in tried)} "
            f"(paper models with a daro.toml: {', '.join(have) or 'none yet'}); "
            f"use --preset tiny, --preset paper/<model>, or a config path"
        )
    p = Path(s)
    if p.suffix == ".toml":
        if not p.is_file():
            raise AblationError(f"preset config file not found: {p}")
        return p
    raise AblationError(
        f"unknown preset {s!r}: use 'tiny', 'arithmetic', 'paper', 'paper/<model>' or a path to a .toml config"
    )


# --------------------------------------------------------------------------------------------
# Parsing a grid


@dataclass
class ArmSpec:
    """An `[[arms]]` table of a grid file, as written (checked by `daro_lab.config.build`)."""

    name: str = setting(REQUIRED, "letters, digits, '-', '_', '.'; unique in the grid")
    label: str = setting("", "shown in the summary and as a tag")
    set: list[str] = setting([], "the arm's config overrides, 'section.key=value' (or key*=x, key/=x)")
    static_from: str | None = setting(None, "an earlier arm: frozen at its final weights of the same seed")


@dataclass
class GridSpec:
    """A grid file, as written (the module docstring shows one)."""

    arms: list[ArmSpec] = setting(REQUIRED, "the arms, [[arms]] tables")
    description: str = setting("", "what the ablation asks: the parent run's note in the MLflow UI")
    reference: str = setting("", "arm the paired tests compare against (default: the first)")
    seeds: int | list[int] = setting(3, "seed count (seeds 0..N-1 offset by the preset's seed), or a list")
    set: list[str] = setting([], "overrides for every arm, applied before the arms' own")
    target_acc: float | Literal["progress", "reference_final"] = setting(
        "progress",
        "steps-to-target: 'progress' (summary.TARGET_FRACTION of the way from the mean starting accuracy to "
        "the best arm's mean final accuracy, as the convergence figure), an accuracy, or 'reference_final' (the "
        "reference arm's mean final accuracy: reached on a plateau, where crossing it is evaluation noise)",
        range="[0, 1]",
    )
    init_seed: Literal["shared", "per_seed"] = setting(
        "shared",
        "'shared': every seed starts from the preset's one warm start (model.init_seed), so seeds vary the "
        "RL sampling only; 'per_seed': model.init_seed = the seed, so the warm start varies with it too",
    )
    balance_window: int = setting(10, "last steps over which the loss-balance spread is averaged", range="[1, inf)")
    test: Literal["t", "wilcoxon"] = setting("t", "paired test against the reference: 't' or 'wilcoxon'")
    weight_stats: bool = setting(False, "add weight variance / balance gap / stability columns")
    num_cpus: float = setting(2, "CPUs per arm: a Ray task's resources; the process pool's size", range="(0, inf)")
    num_gpus: float | None = setting(
        None, "GPUs per arm (Ray); default 1 for arms on trainer.device 'cuda...', else 0", range="[0, inf)"
    )
    accuracy: str = setting(
        "greedy",
        "held-out accuracy compared: 'greedy' or 'sampled' (avg@n), over all held-out "
        "prompts, or 'greedy:level_N' / 'sampled:level_N' over the level-N prompts only "
        "(eval/<mode>_acc/level_N, e.g. the hardest level as the endpoint)",
    )


def _check_overrides(where: str, key: str, items: list) -> list[str]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or "=" not in item:
            raise AblationError(f"{where}: {key}[{i}] must be a string 'section.key=value', got {item!r}")
        out.append(item)
    return out


def parse_grid(data: dict[str, Any], name: str, path: str) -> Grid:
    """A Grid from the TOML data of `path`: types, choices and ranges by the config's typed builder (`GridSpec`),
    then the checks between keys; AblationError naming the file and key on any problem."""
    where = str(path)
    if not data.get("arms"):
        raise AblationError(f"{where}: the grid is empty: key 'arms' defines no arms (add [[arms]] tables)")
    try:
        spec = build(GridSpec, data, noun="grid key")
        check_ranges(spec, noun="grid key")
    except ConfigError as e:
        raise AblationError(f"{where}: {e}") from None
    try:
        acc_key(spec.accuracy)
    except ValueError as e:
        raise AblationError(f"{where}: key 'accuracy': {e}") from None
    arms: list[Arm] = []
    for i, a in enumerate(spec.arms):
        aw = f"{where}: arms[{i}] ('{a.name}')"
        if not _NAME_RE.match(a.name):
            raise AblationError(f"{aw}: key 'name' {a.name!r} must be letters, digits, '-', '_', '.'")
        if any(x.name == a.name for x in arms):
            raise AblationError(f"{aw}: key 'name': arm {a.name!r} is defined twice")
        src = a.static_from
        if src is not None and not any(x.name == src for x in arms):
            later = any(x.name == src for x in spec.arms)
            raise AblationError(
                f"{aw}: key 'static_from': arm {src!r} "
                + ("must come before this arm (it must finish first)" if later else "is not defined")
            )
        arms.append(Arm(a.name, a.label, _check_overrides(aw, "set", a.set), src))
    g = Grid(
        name=name,
        path=where,
        arms=arms,
        description=spec.description,
        reference=spec.reference or arms[0].name,
        seeds=spec.seeds,
        set=_check_overrides(where, "set", spec.set),
        target_acc=spec.target_acc,
        balance_window=spec.balance_window,
        test=spec.test,
        weight_stats=spec.weight_stats,
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        accuracy=spec.accuracy,
        init_seed=spec.init_seed,
    )
    if g.reference not in [a.name for a in arms]:
        raise AblationError(
            f"{where}: key 'reference': no arm named {g.reference!r} (arms: {', '.join(a.name for a in arms)})"
        )
    if isinstance(g.seeds, list):
        if not g.seeds:
            raise AblationError(f"{where}: key 'seeds' must be a positive integer or a non-empty list of integers")
        if len(set(g.seeds)) != len(g.seeds):
            raise AblationError(f"{where}: key 'seeds' lists a seed twice: {g.seeds}")
    elif g.seeds < 1:
        raise AblationError(f"{where}: key 'seeds' must be >= 1, got {g.seeds}")
    return g


def load_grid(name: str | Path) -> Grid:
    """Read and check the grid of ablation `name` (or a grid file path)."""
    path = grid_path(name)
    try:
        data = read_toml(path, "grid file")
    except ConfigError as e:
        raise AblationError(str(e)) from None
    stem = path.stem
    return parse_grid(data, stem, str(path))


# --------------------------------------------------------------------------------------------
# Overrides, including relative ones


_DEFAULTS = Config().flat()


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            if dotted in _DEFAULTS:
                return _DEFAULTS[dotted]
            raise ConfigError(f"unknown config key '{dotted}'")
        node = node[p]
    return node


def override_key(item: str) -> str:
    """The dotted key an override sets ('a.b*=2' -> 'a.b')."""
    return item.split("=", 1)[0].strip().rstrip("*/").strip()


def apply_arm_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`apply_overrides`, plus relative `key*=x` and `key/=x` against the value in `data` (or its default)."""
    plain: list[str] = []

    def flush() -> None:
        if plain:
            apply_overrides(data, list(plain))
            plain.clear()

    for item in overrides:
        head = item.split("=", 1)[0].rstrip()
        if "=" in item and head.endswith(("*", "/")):
            flush()
            key, op = head[:-1].strip(), head[-1]
            text = item.split("=", 1)[1].strip()
            try:
                factor = float(tomllib.loads(f"v = {text}")["v"])
            except (tomllib.TOMLDecodeError, TypeError, ValueError):
                raise ConfigError(f"override '{item}': {text!r} is not a number") from None
            cur = _get(data, key)
            if isinstance(cur, bool) or not isinstance(cur, (int, float)):
                raise ConfigError(f"override '{item}': config key '{key}' is not a number ({cur!r})")
            if op == "/" and factor == 0:
                raise ConfigError(f"override '{item}': division by zero")
            new = cur * factor if op == "*" else cur / factor
            if isinstance(cur, int):
                if not math.isclose(new, round(new)):
                    raise ConfigError(f"override '{item}': config key '{key}' is an integer; {cur} {op} {text} = {new}")
                new = int(round(new))
            apply_overrides(data, [f"{key}={json.dumps(new)}"])
        else:
            plain.append(item)
    flush()
    return data


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class PlannedArm:
    """An arm with its resolved config (seed left to the job)."""

    name: str
    label: str
    overrides: list[str]
    config: dict[str, Any]  # resolved Config.to_dict() with seed of the preset
    method: str
    static_from: str | None = None


@dataclass
class Plan:
    """Everything a sweep needs, JSON-serialisable: logged as the parent run's config.json, so
    that a resume runs exactly what was planned even if the grid or preset file changed since."""

    name: str
    grid_path: str
    preset: str
    preset_path: str
    seeds: list[int]
    steps: int | None
    cli_set: list[str]
    experiment: str
    arms: list[PlannedArm]
    reference: str
    description: str = ""
    target_acc: float | str = "reference_final"  # plans logged before 'progress' existed keep their target
    balance_window: int = 10
    test: str = "t"
    weight_stats: bool = False
    num_cpus: float = 2
    num_gpus: float | None = None  # None: 1 for arms on a CUDA device, else 0
    accuracy: str = "greedy"
    init_seed: str = "shared"  # or "per_seed": model.init_seed = the seed (GridSpec.init_seed)
    version: int = 1

    def gpus(self, arm: str) -> float:
        """GPUs one job of `arm` asks for (Ray resources)."""
        if self.num_gpus is not None:
            return float(self.num_gpus)
        return 1.0 if str(self.arm(arm).config["trainer"]["device"]).startswith("cuda") else 0.0

    def arm(self, name: str) -> PlannedArm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps({"daro_lab_ablation_plan": asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        if not isinstance(d, dict) or "daro_lab_ablation_plan" not in d:
            raise AblationError("not an ablation plan (config.json has no 'daro_lab_ablation_plan')")
        d = dict(d["daro_lab_ablation_plan"])
        d["arms"] = [PlannedArm(**a) for a in d["arms"]]
        return cls(**d)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return read_toml(path)
    except ConfigError as e:
        raise AblationError(str(e)) from None


def make_plan(
    grid: Grid | str | Path,
    preset: str = "tiny",
    seeds: int | list[int] | None = None,
    steps: int | None = None,
    overrides: list[str] | None = None,
    experiment: str | None = None,
    check_paths: bool = True,
    init_seed: str | None = None,
) -> Plan:
    """Resolve a grid against a preset: one validated Config per arm, and the seeds.

    `overrides` (the command line's `--set`) apply to every arm, before the arm's own overrides;
    overriding a key that an arm sets is an error. `steps` sets trainer.steps. `experiment` is the
    MLflow experiment (default `daro-lab-ablation-<name>-<preset>`, or tracking.experiment when an
    override sets it). `check_paths` checks model.path and the data files on this machine (turn it
    off when the arms run elsewhere, e.g. on a Ray cluster). `init_seed` ('shared' or 'per_seed') replaces the
    grid's `init_seed`.
    """
    g = grid if isinstance(grid, Grid) else load_grid(grid)
    if init_seed not in (None, "shared", "per_seed"):
        raise AblationError(f"--init-seed: expected 'shared' or 'per_seed', got {init_seed!r}")
    ppath = preset_path(preset)
    base = _read_toml(ppath)
    cli = list(overrides or [])
    if steps is not None:
        if steps < 1:
            raise AblationError(f"--steps must be >= 1, got {steps}")
        cli.append(f"trainer.steps={int(steps)}")
    arm_keys: dict[str, str] = {}
    for a in g.arms:
        for o in a.set:
            arm_keys.setdefault(override_key(o), a.name)
    for o in cli:
        k = override_key(o)
        if k in arm_keys:
            raise AblationError(
                f"override '{o}' sets '{k}', which arm '{arm_keys[k]}' of {g.path} sets: "
                f"it would undo the ablation; edit the grid instead"
            )
    try:
        common = apply_arm_overrides(copy.deepcopy(base), list(g.set))
    except ConfigError as e:
        raise AblationError(f"{g.path}: key 'set': {e}") from None
    try:
        common = apply_arm_overrides(common, cli)
        base_cfg = config_from_dict(copy.deepcopy(common))
    except ConfigError as e:
        raise AblationError(f"{e} (preset {ppath}, grid {g.path}, command-line overrides)") from None
    exp = experiment or (
        base_cfg.tracking.experiment
        if any(override_key(o) == "tracking.experiment" for o in cli)
        else f"daro-lab-ablation-{g.name}-{_slug(preset)}"
    )
    if isinstance(seeds, int):
        if seeds < 1:
            raise AblationError(f"--seeds must be >= 1, got {seeds}")
        seed_list = [base_cfg.seed + i for i in range(seeds)]
    elif seeds is not None:
        seed_list = [int(s) for s in seeds]
    elif isinstance(g.seeds, list):
        seed_list = list(g.seeds)
    else:
        seed_list = [base_cfg.seed + i for i in range(g.seeds)]
    bad = [x for x in seed_list if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**63]
    if bad:  # every child run would fail on config key 'seed': refused before any run exists
        where = "--seeds" if seeds is not None else f"{g.path}: key 'seeds'"
        raise AblationError(f"{where}: seeds must be integers in [0, 2^63) (config key 'seed'), got {bad[0]!r}")
    planned: list[PlannedArm] = []
    for a in g.arms:
        try:
            data = apply_arm_overrides(copy.deepcopy(common), list(a.set))
            data.setdefault("tracking", {})["experiment"] = exp
            cfg = config_from_dict(data)
        except ConfigError as e:
            raise AblationError(f"{g.path}: arm '{a.name}': {e}") from None
        if a.static_from is not None:
            src = next(p for p in planned if p.name == a.static_from)
            if METHODS[cfg.algo.method].weights != "frozen":
                raise AblationError(
                    f"{g.path}: arm '{a.name}': key 'static_from' needs algo.method = 'static', "
                    f"the arm has {cfg.algo.method!r}"
                )
            if METHODS[src.method].weights != "learned":
                raise AblationError(
                    f"{g.path}: arm '{a.name}': key 'static_from': arm '{src.name}' has method "
                    f"{src.method!r}; its weights are learned only with 'daro'"
                )
            if src.config["rollout"]["num_responses"] != cfg.rollout.num_responses:
                raise AblationError(f"{g.path}: arm '{a.name}': key 'static_from': arm '{src.name}' has a different K")
        if check_paths:
            _preflight(cfg, f"{g.path}: arm '{a.name}'")
        planned.append(
            PlannedArm(a.name, a.label, list(a.set), _absolute_paths(cfg).to_dict(), cfg.algo.method, a.static_from)
        )
    return Plan(
        name=g.name,
        grid_path=str(Path(g.path).resolve()),
        preset=str(preset),
        preset_path=str(ppath.resolve()),
        seeds=seed_list,
        steps=steps,
        cli_set=list(overrides or []),
        experiment=exp,
        arms=planned,
        reference=g.reference,
        description=g.description,
        target_acc=g.target_acc,
        balance_window=g.balance_window,
        test=g.test,
        weight_stats=g.weight_stats,
        num_cpus=float(g.num_cpus),
        num_gpus=None if g.num_gpus is None else float(g.num_gpus),
        accuracy=g.accuracy,
        init_seed=init_seed or g.init_seed,
    )


def _slug(text: str) -> str:
    s = Path(str(text)).stem if str(text).endswith(".toml") else str(text)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)


def _absolute_paths(cfg: Config) -> Config:
    """Relative directories resolved now, so every arm (in any worker, on resume) uses the same ones."""
    cfg.trainer.checkpoint_dir = str(Path(cfg.trainer.checkpoint_dir).resolve())
    cfg.model.cache_dir = str(Path(cfg.model.cache_dir).resolve())
    return cfg


def _preflight(cfg: Config, where: str) -> None:
    """Cheap checks of local paths, so that a missing model or data file fails before any run exists."""
    for key, value in (
        ("model.path", cfg.model.path),
        ("task.train_file", cfg.task.train_file),
        ("task.eval_file", cfg.task.eval_file),
    ):
        if value and not Path(value).exists():
            raise AblationError(
                f"{where}: config key '{key}': {value} does not exist on this machine "
                f"(point it elsewhere with --set {key}=...)"
            )
