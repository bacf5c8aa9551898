"""Gin names are the import paths of the code they configure."""
import importlib
import pathlib

import gin

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gin_names_are_import_paths():
  """Every perl configurable is named by the module that defines it."""
  for path in sorted((ROOT / "perl").rglob("*.py")):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if module.endswith(".__init__"):
      continue
    text = path.read_text()
    if "gin.configurable" in text or "gin.external_configurable" in text:
      importlib.import_module(module)
  wrong, checked = [], 0
  for _, c in gin.config._REGISTRY.items():  # pylint: disable=protected-access
    defined_in = getattr(c.wrapped, "__module__", "") or ""
    if (c.module or "").startswith("perl") or defined_in.startswith("perl."):
      checked += 1
      if c.module != defined_in:
        wrong.append(f"{c.module}.{c.name} is defined in {defined_in}")
  assert checked > 10 and not wrong, wrong
