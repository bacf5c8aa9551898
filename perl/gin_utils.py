"""Gin flag handling in t5x's manner (`--gin_file`, `--gin.NAME=VALUE`).

Gin's own errors are accurate but verbose and sometimes obscure (an unset
`%gin.REQUIRED` macro is reported as 'X/macro.value'); `parse_gin_flags`
re-raises them as one `GinConfigError` line naming the binding and the fix.
Gin itself accepts a macro that nothing uses (`--gin.TRAIN_STEP=5` for
TRAIN_STEPS); `parse_gin_flags` rejects one set by a binding, naming the
close match.
"""
from __future__ import annotations

import ast
import importlib.util  # noqa: F401  gin uses importlib.util without importing it
import os
import re
import tokenize
from collections.abc import Sequence

import gin

from perl.run_dir import RunDir

GIN_ARG_PREFIX = '--gin.'


class GinConfigError(ValueError):
  """A gin file or binding is missing, misspelt or incomplete."""


def _tolerant(exists):
  """Gin's package-path reader, minus a crash on plain directories.

  For `include 'runs/x.gin'` gin asks importlib for a package `runs`; a plain
  directory of that name on sys.path (e.g. ./runs, a MODEL_DIR parent, with
  cwd on sys.path under `python -m`) is a namespace package with no origin,
  and gin 0.5.0 raises TypeError instead of trying the next search path.
  """

  def check(path: str) -> bool:
    try:
      return exists(path)
    except TypeError:
      return False

  check.perl_tolerant = True
  return check


def _patch_gin_file_readers() -> None:
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, exists) in enumerate(readers):
    if not getattr(exists, 'perl_tolerant', False):
      readers[i] = (reader, _tolerant(exists))


_patch_gin_file_readers()


def _maybe_quote(value: str) -> str:
  """Quotes bare strings so that `--gin.MODEL_DIR=/tmp/x` just works.

  Values that are already gin syntax (numbers, True/None, quoted strings,
  @references, %macros, lists/tuples/dicts) are left alone.
  """
  v = value.strip()
  if not v or v[0] in '\'"@%[({' or v in ('True', 'False', 'None'):
    return value
  try:
    ast.literal_eval(v)
    return value
  except (ValueError, SyntaxError):
    return repr(v)


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
  """Rewrites `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE`."""
  def rewrite(arg: str) -> str:
    if not arg.startswith(GIN_ARG_PREFIX):
      return arg
    if '=' not in arg:
      raise GinConfigError(
          f"Gin bindings must look like '--gin.NAME=VALUE', got {arg!r}.")
    name, value = arg[len(GIN_ARG_PREFIX):].split('=', 1)
    return f'--gin_bindings={name} = {_maybe_quote(value)}'
  return [rewrite(a) for a in args]


def _resolve_gin_file(path: str, search_paths: Sequence[str]) -> str:
  if os.path.exists(path):
    return path
  for root in search_paths:
    if os.path.exists(os.path.join(root, path)):
      return path  # gin finds it through the search path
  raise GinConfigError(
      f'Gin file {path!r} not found (searched the working directory and'
      f' --gin_search_paths={list(search_paths)}).')


def _explain(err: Exception) -> str | None:
  """One-line explanation of a gin error, or None if not recognised."""
  msg = str(err)
  if m := re.search(r"(\S+?)/(?:gin\.)?macro\.value set to `%gin\.REQUIRED`",
                    msg):
    return (f'Gin macro {m.group(1)} is %gin.REQUIRED but was never set: pass'
            f' --gin.{m.group(1)}=<value> or bind it in a gin file.')
  if m := re.search(r'(\S+) set to `%gin\.REQUIRED`', msg):
    return (f'Gin parameter {m.group(1)} is %gin.REQUIRED but was never set:'
            f' pass --gin.{m.group(1)}=<value> or bind it in a gin file.')
  if m := re.search(r"No bindings specified for '(\w+)/gin\.macro'", msg):
    return (f'Gin macro %{m.group(1)} is used but never defined: add'
            f' `{m.group(1)} = <value>` or pass --gin.{m.group(1)}=<value>.')
  if m := re.search(
      r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", msg):
    return (f'Gin binding {m.group(1)}.{m.group(2)}: {m.group(1)!r} has no'
            f' parameter {m.group(2)!r} (misspelt?).{_params_hint(m[1], m[2])}')
  if m := re.search(r"No configurable matching '([\w./]+)'", msg):
    return (f'Gin binding refers to unknown configurable {m.group(1)!r}:'
            ' misspelt, or its module is not imported (add `import <module>`'
            ' to the gin file).')
  if m := re.search(r'Unable to open file: (\S+?)\.? Searched', msg):
    return f'Gin file {m.group(1)} not found. {msg}'
  return None


def _params_hint(configurable: str, wrong: str) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top
  try:
    fn = gin.config._REGISTRY.get_match(configurable).wrapped  # pylint: disable=protected-access
    params = list(inspect.signature(fn).parameters)
  except Exception:  # pylint: disable=broad-except
    return ''
  close = difflib.get_close_matches(wrong, params, n=1)
  return f' Did you mean {close[0]!r}?' if close else (
      f' Parameters: {params}.')


def explain_gin_error(err: Exception) -> Exception:
  """Turns a recognised gin error into a GinConfigError (cause chained)."""
  text = _explain(err)
  if text is None:
    return err
  new = GinConfigError(text)
  new.__cause__ = err
  return new


_MACRO_BINDING = re.compile(r'^\s*([A-Za-z_]\w*)\s*=')


def _referenced_macros() -> set[str]:
  """Names of the macros some binding (or another macro) refers to."""
  found = set()

  def walk(value):
    if isinstance(value, gin.config.ConfigurableReference):
      scope, selector = value.config_key
      if selector == 'gin.macro':
        found.add(scope.rsplit('/', 1)[-1])
    elif isinstance(value, dict):
      for v in value.values():
        walk(v)
    elif isinstance(value, (list, tuple, set)):
      for v in value:
        walk(v)

  for params in gin.config._CONFIG.values():  # pylint: disable=protected-access
    for v in params.values():
      walk(v)
  return found


def check_macros_used(gin_bindings: Sequence[str]) -> None:
  """GinConfigError for a binding `NAME = ...` whose macro nothing uses."""
  import difflib  # pylint: disable=g-import-not-at-top
  used = _referenced_macros()
  for binding in gin_bindings:
    for line in binding.splitlines():
      m = _MACRO_BINDING.match(line)
      if not m or m.group(1) in used:
        continue
      name = m.group(1)
      close = difflib.get_close_matches(name, sorted(used), n=3)
      hint = (f" Did you mean {' or '.join(close)}?" if close
              else f" Macros in use: {sorted(used)}.")
      raise GinConfigError(
          f'Gin macro {name} is set (--gin.{name}=...) but no binding uses'
          f' %{name}: misspelt?{hint}')


def _unparsable_binding(bindings: Sequence[str]) -> tuple[str, str] | None:
  """(binding, problem) of the first binding gin cannot parse, if any."""
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  for binding in bindings:
    try:
      for _ in config_parser.ConfigParser(
          binding, gin.config.ParserDelegate(skip_unknown=True)):
        pass
    except (SyntaxError, tokenize.TokenError) as e:
      problem = e.msg if isinstance(e, SyntaxError) else e.args[0]
      return binding, problem
    except Exception:  # pylint: disable=broad-except
      continue
  return None


def parse_gin_flags(
    gin_search_paths: Sequence[str] = (),
    gin_files: Sequence[str] = (),
    gin_bindings: Sequence[str] = (),
    *,
    skip_unknown: bool = False,
    finalize_config: bool = True,
) -> None:
  """Adds search paths, parses files then bindings, and finalizes.

  Finalizing runs gin's checks for unset `%gin.REQUIRED` values and undefined
  macros now, before any work starts.
  """
  search_paths = [p for p in gin_search_paths if p]
  for path in search_paths:  # gin searches cwd, then these in order
    if path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(path)
  files = [_resolve_gin_file(f, search_paths) for f in gin_files]
  try:
    gin.parse_config_files_and_bindings(
        files, list(gin_bindings), skip_unknown=skip_unknown,
        finalize_config=finalize_config)
  except (ValueError, OSError, TypeError, SyntaxError, tokenize.TokenError) as e:
    bad = _unparsable_binding(gin_bindings)
    if bad is not None:
      raise GinConfigError(
          f'Gin binding {bad[0]!r} does not parse ({bad[1]}): write'
          " --gin.NAME=VALUE with VALUE in gin syntax (e.g. 10, 'text',"
          ' [1, 2], @configurable()).') from e
    explained = explain_gin_error(e)
    if explained is e:
      raise
    raise explained from e
  check_macros_used(gin_bindings)


def summarize_gin_config(model_dir: str | None = None) -> str:
  """Returns (and writes to MODEL_DIR/config.gin) the operative config."""
  text = gin.operative_config_str()
  if model_dir:
    write_operative_config(model_dir, text=text)
  return text


def write_operative_config(model_dir: str, *, text: str | None = None) -> str:
  """Writes the operative gin config to MODEL_DIR/config.gin; returns path.

  Remote paths (gs://...) go through tf.io.gfile; local ones need no
  TensorFlow import.
  """
  text = gin.operative_config_str() if text is None else text
  path = RunDir(model_dir).config_gin
  if '://' in model_dir:
    from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
    gfile.makedirs(model_dir)
    with gfile.GFile(path, 'w') as f:
      f.write(text)
  else:
    os.makedirs(model_dir, exist_ok=True)
    with open(path, 'w') as f:
      f.write(text)
  return path
