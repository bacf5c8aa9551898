"""Task kinds and the task registry: what `tasks/` registers into and what
the pipeline, inspect and prepare look tasks up in.

A kind (sft / preference / pointwise / prompts) fixes a task's text fields,
its output features and so its feature converter. `register_task` adds a
SeqIO task of a kind over any data source; the lookups (`get_task`,
`task_kind`, `vocabulary`, `member_tasks`) load the registrations on first
use by importing the modules that register them, t5x-style: by default the
repository's `tasks` package, or the list bound in gin,

    --gin.perl.data.registry.import_modules.modules="['tasks', 'my_tasks']"

Nothing here imports a task module by name; a module listed there imports
this one to register.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import gin
import seqio
import tensorflow as tf

from perl.data import preprocessors

SFT = "sft"
PREFERENCE = "preference"
POINTWISE = "pointwise"
PROMPTS = "prompts"
KINDS = (SFT, PREFERENCE, POINTWISE, PROMPTS)

# Text fields each kind's records hold (label, a float, besides).
TEXT_FIELDS = {
    SFT: ("inputs", "targets"),
    PREFERENCE: ("prompt", "chosen", "rejected"),
    POINTWISE: ("prompt", "response"),
    PROMPTS: ("prompt",),
}
# Fields that get an EOS appended: the ones the model must learn to end.
EOS_FIELDS = ("targets", "chosen", "rejected", "response")


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def output_features(kind: str, vocabulary: seqio.Vocabulary
                    ) -> Dict[str, seqio.Feature]:
  check_kind(kind)
  features = {
      name: seqio.Feature(vocabulary=vocabulary, add_eos=name in EOS_FIELDS)
      for name in TEXT_FIELDS[kind]
  }
  if kind == POINTWISE:
    # A rank-0 float passes through tokenization untouched; listing it here
    # keeps it alive through seqio.Mixture's feature filter.
    features["label"] = seqio.Feature(
        vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False,
        dtype=tf.float32, rank=0)
  return features


def kind_of(features: Mapping[str, seqio.Feature]) -> str:
  """The kind of a task or mixture, from its output feature names."""
  for kind in (PREFERENCE, POINTWISE, SFT, PROMPTS):
    if set(TEXT_FIELDS[kind]) <= set(features):
      return kind
  raise ValueError(f"no task kind has features {sorted(features)}")


@dataclasses.dataclass(frozen=True)
class TaskRecords:
  """What a registered upstream task reads: the TFDS builders
  (`tasks.tfds_builders`) prepare exactly these records."""
  # sft / preference / pointwise / prompts.
  kind: str
  # The splits the task has.
  splits: Tuple[str, ...]
  # split -> records as the readers yield them (before the quality checks).
  records_fn: Callable[[str], Iterable[dict]]
  # split -> None; checks the split's files exist and open (None: no check).
  preflight: Optional[Callable[[str], None]] = None


# Every task registered with its records, by name.
RECORDS: Dict[str, TaskRecords] = {}

# Feature lengths a task suggests for tools that need some (inspect), by name.
SUGGESTED_LENGTHS: Dict[str, Dict[str, int]] = {}

# Python errors raised inside a source's generator, newest last: tf.data
# turns them into an OpError carrying a traceback; `pipeline.numpy_iterator`
# re-raises the original instead.
READER_ERRORS: List[BaseException] = []


def pop_reader_error() -> Optional[BaseException]:
  return READER_ERRORS.pop() if READER_ERRORS else None


def register_task(
    name: str, *, kind: str, source: seqio.DataSource,
    vocabulary: seqio.Vocabulary, metric_fns: Sequence[Callable] = (),
    records: Optional[TaskRecords] = None,
    suggested_lengths: Optional[Mapping[str, int]] = None,
) -> seqio.Task:
  """Registers (or re-registers, so importing twice is safe) one task.

  records: what `source` reads, for the TFDS builders that prepare it.
  suggested_lengths: feature lengths that fit the task's rows, for tools
  run without explicit lengths (`python -m perl.data.inspect`).
  """
  check_kind(kind)
  if records is not None:
    RECORDS[name] = records
  if suggested_lengths is not None:
    SUGGESTED_LENGTHS[name] = dict(suggested_lengths)
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[preprocessors.tokenize_in_batches,
                     preprocessors.prepend_bos,
                     seqio.preprocessors.append_eos],
      output_features=output_features(kind, vocabulary),
      metric_fns=list(metric_fns),
  )


def register_mixture(name: str, tasks_and_rates: Sequence) -> seqio.Mixture:
  """Registers a mixture of (task name, rate) pairs; idempotent."""
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks_and_rates))


# The repository's registrations (its top-level `tasks` package).
DEFAULT_MODULES = ("tasks",)


@gin.configurable(module="perl.data.registry")
def import_modules(modules: Sequence[str] = DEFAULT_MODULES) -> Tuple[str, ...]:
  """Imports the modules whose import registers tasks; returns their names."""
  if isinstance(modules, str):
    modules = (modules,)
  for module in modules:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if not (module == e.name or module.startswith(f"{e.name}.")):
        raise  # the module exists; something it imports does not
      raise ModuleNotFoundError(
          f"task module {module!r} (perl.data.registry.import_modules.modules"
          f"={list(modules)}) is not importable: run from the repository root "
          "or put it on PYTHONPATH, or bind the modules that register your "
          "tasks.") from e
  return tuple(modules)


def get_task(name: str):
  """A registered task or mixture; loads the registrations on first use."""
  if name not in seqio.TaskRegistry.names() and (
      name not in seqio.MixtureRegistry.names()):
    import_modules()
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    known = sorted(seqio.TaskRegistry.names()) + sorted(
        seqio.MixtureRegistry.names())
    raise ValueError(
        f"unknown task or mixture {name!r}; known: {known}. Tasks register "
        "when the modules bound to perl.data.registry.import_modules.modules "
        f"(default {list(DEFAULT_MODULES)}) are imported: add the module that "
        "registers it.") from e


def task_kind(name: str) -> str:
  return kind_of(get_task(name).output_features)


def vocabulary(name: str) -> seqio.Vocabulary:
  """The vocabulary of a task's text features."""
  features = get_task(name).output_features
  key = next(k for k in ("prompt", "inputs", "targets") if k in features)
  return features[key].vocabulary


def member_tasks(name: str) -> list:
  """The tasks a mixture samples from (nested mixtures flattened), in order;
  a task is its own only member."""
  source = get_task(name)
  if isinstance(source, seqio.Mixture):
    return [task.name for task in source.tasks]
  return [name]
