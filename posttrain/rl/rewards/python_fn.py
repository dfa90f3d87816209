"""A reward written as a plain Python function, named ``"module:function"`` or ``"path/to/file.py:function"``.

Calling convention, decided from the function's signature:

- exactly one parameter: it receives the ``RewardInput``  -> ``def reward(x): ...``
- otherwise it is called with the keyword arguments ``prompt``, ``completion``,
  ``reference`` and ``metadata`` -> ``def reward(prompt, completion, reference, metadata): ...``
  (it must accept all four by name, or take ``**kwargs``).

It returns a number (bool counts as 0/1) or ``None`` when it cannot score the sample.
It is called once per sample; an exception masks that sample only (see ``CombinedReward``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import numbers
import sys
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.rl.rewards.base import RewardInput, SampleReward

_KEYWORDS = ("prompt", "completion", "reference", "metadata")


def load_function(spec: str):
    """The callable named by ``spec``; a ``PosttrainError`` naming the spec if it cannot be had."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise PosttrainError(f"python reward {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        module = _load_file(where, spec) if where.endswith(".py") else importlib.import_module(where)
    except PosttrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - importing the user's code can raise anything
        raise PosttrainError(f"python reward {spec!r}: importing {where!r} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise PosttrainError(f"python reward {spec!r}: {where!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PosttrainError(f"python reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _load_file(path: str, spec: str):
    file = Path(path).resolve()
    if not file.is_file():
        raise PosttrainError(f"python reward {spec!r}: file {path!r} does not exist (looked at {file})")
    # A name unique per file, so two reward files both called rewards.py do not replace each other.
    name = f"posttrain_user_reward_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _takes_one_input(fn, spec: str) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: assume the documented keyword form
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) == 1 and params[0].kind in positional:
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return False
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    missing = [k for k in _KEYWORDS if k not in names]
    if missing:
        raise PosttrainError(
            f"python reward {spec!r}: the function must take one parameter (a RewardInput) or the keyword "
            f"arguments {', '.join(_KEYWORDS)} (or **kwargs); it does not accept {', '.join(missing)}"
        )
    return False


class PythonReward(SampleReward):
    """Named after the function, so its scores show up under that name in the metrics."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_function(spec)
        self.one_input = _takes_one_input(self.fn, spec)
        self.name = getattr(self.fn, "__name__", "python")

    def score(self, x: RewardInput) -> float | None:
        if self.one_input:
            value = self.fn(x)
        else:
            value = self.fn(prompt=x.prompt, completion=x.completion, reference=x.reference, metadata=x.metadata)
        if value is None or isinstance(value, numbers.Real):
            return None if value is None else float(value)
        try:
            item = value.item()  # a one-element numpy array or torch tensor, which user code often returns
        except (AttributeError, TypeError, ValueError, RuntimeError):
            item = None
        if isinstance(item, numbers.Real):
            return float(item)
        raise TypeError(f"{self.spec} returned a {type(value).__name__}, expected a number or None")
