r"""The MODEL_DIR layout, and what a later stage reads of an earlier run.

    run = RunDir(model_dir)
    run.config_gin           # MODEL_DIR/config.gin: the run's gin config
    run.step_dir(300)        # MODEL_DIR/checkpoints/300
    run.latest_step(best=True)

Every path inside a MODEL_DIR is spelled here and nowhere else:

  config.gin              the gin config, written once the run has restored
  metrics.jsonl           one JSON object per logged step
  tensorboard/            TensorBoard event files
  checkpoints/<step>/     Orbax steps (items "state" and "extra"), latest kept
  best/<step>/            the step with the best eval metric (1 kept)
  corrupt/<dir>-<step>/   steps that failed to restore, moved aside
  input_state/<step>/     the input pipeline's position at each kept step
  export/                 merged full weights: the next stage's base
  export_peft/            the adapter in PEFT's format (Hugging Face bases)
  eval_samples/           decoded held-out samples of an RL run
  .lock                   the run that owns the directory

`RecordedConfig` reads an earlier run's config.gin without touching gin's
global state (the later stage's own config is being parsed or used), so a
stage can take, e.g., the reward model's LoRA settings from the run that
trained it instead of repeating them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

CONFIG_GIN = "config.gin"
METRICS_JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"
CORRUPT = "corrupt"
INPUT_STATE = "input_state"
EXPORT = "export"
EXPORT_PEFT = "export_peft"
EVAL_SAMPLES = "eval_samples"
LOCK = ".lock"
# The Orbax item of a checkpoint step holding the flat train state.
STATE_ITEM = "state"


@dataclasses.dataclass(frozen=True)
class RunDir:
  """The files and directories of one run's MODEL_DIR (local or gs://)."""

  path: str

  def _join(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  @property
  def config_gin(self) -> str:
    return self._join(CONFIG_GIN)

  @property
  def metrics_jsonl(self) -> str:
    return self._join(METRICS_JSONL)

  @property
  def tensorboard(self) -> str:
    return self._join(TENSORBOARD)

  @property
  def checkpoints(self) -> str:
    return self._join(CHECKPOINTS)

  @property
  def best(self) -> str:
    return self._join(BEST)

  @property
  def corrupt(self) -> str:
    return self._join(CORRUPT)

  @property
  def input_states(self) -> str:
    return self._join(INPUT_STATE)

  @property
  def export(self) -> str:
    return self._join(EXPORT)

  @property
  def export_peft(self) -> str:
    return self._join(EXPORT_PEFT)

  @property
  def eval_samples(self) -> str:
    return self._join(EVAL_SAMPLES)

  @property
  def lock(self) -> str:
    return self._join(LOCK)

  def input_state(self, step: int, process: int) -> str:
    """The prefix of `process`'s saved input position at `step`."""
    return self._join(INPUT_STATE, str(step), f"process_{process}")

  def step_dir(self, step: int, *, best: bool = False) -> str:
    return os.path.join(self.best if best else self.checkpoints, str(step))

  def state_item(self, step: int, *, best: bool = False) -> str:
    """The Orbax item of `step` that holds the flat train state."""
    return os.path.join(self.step_dir(step, best=best), STATE_ITEM)

  def steps(self, *, best: bool = False) -> list[int]:
    """Saved steps, oldest first (Orbax's unfinished tmp dirs excluded)."""
    root = self.best if best else self.checkpoints
    if not os.path.isdir(root):
      return []
    return sorted(int(s) for s in os.listdir(root) if s.isdigit())

  def latest_step(self, *, best: bool = False) -> int | None:
    steps = self.steps(best=best)
    return steps[-1] if steps else None

  def latest_state_item(self, *, best_first: bool = True) -> str | None:
    """The state item of the newest step in best/ (if `best_first` and it
    holds one), else in checkpoints/; None when neither holds a step."""
    for best in ((True, False) if best_first else (False,)):
      step = self.latest_step(best=best)
      if step is not None:
        return self.state_item(step, best=best)
    return None


# An earlier run's recorded config
# ------------------------------------------------------------------------------


class RecordedConfigError(ValueError):
  """An earlier run's config.gin is missing or lacks a needed binding."""


@dataclasses.dataclass(frozen=True)
class Reference:
  """`@scope/name()` (evaluated) or `@scope/name` in a recorded config."""

  name: str
  scope: str = ""
  evaluate: bool = True


_UNBOUND = object()


@dataclasses.dataclass(frozen=True)
class _Macro:
  name: str


def _parser_delegate():
  from gin import config_parser  # pylint: disable=g-import-not-at-top

  class Delegate(config_parser.ParserDelegate):
    """Keeps references and macros as data: nothing is looked up in gin."""

    def configurable_reference(self, scoped_name, evaluate):
      scope, _, name = scoped_name.rpartition("/")
      return Reference(name=name, scope=scope, evaluate=evaluate)

    def macro(self, macro_name):
      return _Macro(macro_name)

  return Delegate()


def _matches(selector: str, name: str) -> bool:
  """Gin writes the shortest unambiguous selector ("LoRAConfig" or
  "config.LoRAConfig" for perl.models.config.LoRAConfig): compare on a
  dotted suffix either way."""
  return (selector == name or name.endswith("." + selector)
          or selector.endswith("." + name))


class RecordedConfig:
  """The bindings of MODEL_DIR/config.gin, macros resolved, read as data."""

  def __init__(self, path: str, bindings: dict[tuple[str, str, str], Any]):
    self.path = path
    # (scope, selector, arg) -> value; macros are ("", NAME, "").
    self.bindings = bindings

  @classmethod
  def read(cls, model_dir: str, *, what: str = "MODEL_DIR") -> RecordedConfig:
    """Parses `model_dir`'s config.gin; `what` names the setting that
    pointed here (e.g. "REWARD_CHECKPOINT") in errors."""
    path = RunDir(model_dir).config_gin
    if not os.path.isfile(path):
      raise RecordedConfigError(
          f"{path} does not exist: {what} must be the MODEL_DIR of a perl run"
          " that started training (it writes config.gin then).")
    from gin import config_parser  # pylint: disable=g-import-not-at-top
    with open(path) as f:
      text = f.read()
    bindings = {}
    try:
      for statement in config_parser.ConfigParser(text, _parser_delegate()):
        if isinstance(statement, config_parser.BindingStatement):
          key = (statement.scope, statement.selector, statement.arg_name)
          bindings[key] = statement.value
    except SyntaxError as e:
      raise RecordedConfigError(
          f"{path} does not parse as gin (line {e.lineno}: {e.msg}); rerun"
          f" the run that wrote it or point {what} at another run.") from None
    return cls(path, bindings)

  def _resolve(self, value: Any, seen: frozenset = frozenset()) -> Any:
    if isinstance(value, _Macro):
      if value.name in seen:
        raise RecordedConfigError(f"{self.path}: macro %{value.name} refers to"
                                  " itself.")
      scope, _, name = value.name.rpartition("/")
      if (scope, name, "") not in self.bindings:
        raise RecordedConfigError(
            f"{self.path} uses macro %{value.name} but never binds it.")
      return self._resolve(self.bindings[scope, name, ""], seen | {value.name})
    if isinstance(value, (list, tuple)):
      return type(value)(self._resolve(v, seen) for v in value)
    if isinstance(value, dict):
      return {k: self._resolve(v, seen) for k, v in value.items()}
    return value

  def find(self, configurable: str, arg: str, *, scope: str = "",
           default: Any = None) -> Any:
    """The value bound to `configurable.arg` (a dotted suffix) in `scope`,
    falling back to enclosing scopes as gin does; `default` if unbound."""
    scopes = [""] + ["/".join(scope.split("/")[:i + 1])
                     for i in range(len(scope.split("/")))] if scope else [""]
    found = default
    for s in scopes:  # innermost last: it wins
      for (b_scope, selector, b_arg), value in self.bindings.items():
        if b_scope == s and b_arg == arg and _matches(selector, configurable):
          found = self._resolve(value)
    return found

  def arguments(self, reference: Reference) -> dict[str, Any]:
    """{arg: value} bound for the configurable `reference` calls."""
    args = {b_arg for (_, selector, b_arg) in self.bindings
            if b_arg and _matches(selector, reference.name)}
    found = {a: self.find(reference.name, a, scope=reference.scope,
                          default=_UNBOUND) for a in sorted(args)}
    return {a: v for a, v in found.items() if v is not _UNBOUND}

  def bound_to(self, arg: str) -> list[tuple[str, Any]]:
    """(selector, value) of every unscoped binding of an argument `arg`."""
    return [(selector, self._resolve(value))
            for (b_scope, selector, b_arg), value in self.bindings.items()
            if b_arg == arg and not b_scope]


def recorded_reward_lora(reward_checkpoint: str):
  """The LoRAConfig a LoRA reward-model run trained its adapter with.

  Read from REWARD_CHECKPOINT/config.gin: the stage's `lora` argument (a
  LoRAConfig reference) and that configurable's bindings, with LoRAConfig's
  defaults for what the run left unbound. Raises RecordedConfigError (one
  line, naming the file and the fix) when the file is missing, the run
  trained every parameter (finetune='full'), or it binds no LoRA adapter.
  """
  from perl.models.config import LoRAConfig  # pylint: disable=g-import-not-at-top
  recorded = RecordedConfig.read(reward_checkpoint, what="REWARD_CHECKPOINT")
  fix = ("point REWARD_CHECKPOINT at a LoRA reward-model run, or bind the"
         " policy stage's reward_lora explicitly")
  finetunes = {v for _, v in recorded.bound_to("finetune")}
  if finetunes - {"lora"}:
    raise RecordedConfigError(
        f"{recorded.path} records finetune={sorted(finetunes)[0]!r}: that run"
        " trained no LoRA adapter to share the policy's backbone; give"
        " REWARD_MODEL_CONFIG to load its export/ as a separate backbone.")
  loras = {v for _, v in recorded.bound_to("lora")
           if isinstance(v, Reference) and _matches(v.name, "LoRAConfig")}
  if len(loras) != 1:
    raise RecordedConfigError(
        f"{recorded.path} binds {'no' if not loras else len(loras)} stage"
        f" `lora` LoRAConfig ({', '.join(sorted(r.name for r in loras))}"
        f"): {fix}.")
  return LoRAConfig(**recorded.arguments(loras.pop()))
