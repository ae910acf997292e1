"""Load what a post-hoc analysis needs, safely, and turn every bad input into one clear :class:`UsageError`.

* Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs.
  A full unpickle happens only when the caller opts in (``trust_checkpoint=True``, ``--trust-checkpoint``).
* A Lightning ``.ckpt`` (a dict with ``"state_dict"``) is restored through the class's ``load_from_checkpoint``, so
  the saved hyper-parameters rebuild the module; a plain state dict (or a dict wrapping one under
  ``"model_state_dict"``/``"model"``) is loaded into a fresh model from a class or factory.
* Data come from a callable returning a DataLoader (any iterable of batches) or a LightningDataModule, or from the
  module's own ``train_dataloader``; the loss from the module's ``training_step`` unless a loss is given.

Nothing the user passed is modified: a model instance is deep-copied before weights are loaded into it.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from optdiag.errors import UsageError

__all__ = [
    "LoadedCheckpoint",
    "import_object",
    "read_checkpoint",
    "load_checkpoint",
    "resolve_loss",
    "resolve_data",
    "iter_batches",
]

_TRUST_HINT = "pass --trust-checkpoint (trust_checkpoint=True) to unpickle it fully, only if you trust its source"


@dataclass
class LoadedCheckpoint:
    """A model with a checkpoint's weights, and what the checkpoint says about itself.

    Attributes:
        path: the checkpoint file.
        model: a fresh module holding the checkpoint's weights (never the caller's object).
        step: the optimizer step saved in the checkpoint (``global_step``), or None for a plain state dict.
        epoch: the saved epoch, or None.
        format: ``"lightning"`` or ``"state_dict"``.
        optimizer_group: the plain settings (``lr``, ``momentum``, ``betas``, ...) of the first parameter group of
            the first saved optimizer, or None; the learning rate there is the one in use when it was saved.
        optimizer_state: the first saved optimizer's whole ``state_dict()`` (Adam's second moments included), or
            None; the analysis reads Adam's preconditioner from it.
        findings: the triage findings saved with the run (a ``TriageMonitor``'s, alone or inside ``OptDiag``), as
            ``Finding.to_dict()`` dicts, oldest first; empty when there are none.
    """

    path: Path
    model: nn.Module
    step: Optional[int]
    epoch: Optional[int]
    format: str
    optimizer_group: Optional[dict[str, Any]] = None
    optimizer_state: Optional[dict[str, Any]] = None
    findings: list[dict[str, Any]] = field(default_factory=list)


def import_object(spec: str, what: str = "object") -> Any:
    """Import ``"package.module:attribute"`` (attribute may be dotted, e.g. ``module:Class.factory``).

    The current directory is importable, as for ``python -m``, so ``--model mymodel:Net`` finds ``./mymodel.py``.

    Raises:
        UsageError: on a malformed spec, an unimportable module or a missing attribute.

    Example:
        >>> import_object("collections:OrderedDict").__name__
        'OrderedDict'
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise UsageError(f"{what} must be given as MODULE:NAME (e.g. mypackage.models:Net), got {spec!r}")
    module_name, attribute = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"cannot import module {module_name!r} for {what} {spec!r}: {err}") from err
    except Exception as err:  # the user's module raised while importing
        raise UsageError(f"importing module {module_name!r} for {what} {spec!r} raised {_short(err)}") from err
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attribute!r} (needed for {what} {spec!r})")
        obj = getattr(obj, part)
    return obj


def _short(err: BaseException) -> str:
    """``TypeName: first line of the message``, for one-line errors."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _refused_global(err: BaseException) -> Optional[str]:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def read_checkpoint(path: str | os.PathLike, trust_checkpoint: bool = False) -> Any:
    """The object stored in a checkpoint file, loaded on the CPU.

    Args:
        path: the file.
        trust_checkpoint: unpickle fully (``weights_only=False``), which can run code from the file.

    Raises:
        UsageError: the file is missing, a directory, empty, corrupt or not a PyTorch file, or safe loading refused
            an object in it (the message names the object and suggests ``--trust-checkpoint``).
    """
    file = Path(path)
    if not file.exists():
        raise UsageError(f"checkpoint not found: {file}")
    if file.is_dir():
        raise UsageError(f"{file} is a directory, not a checkpoint file")
    if file.stat().st_size == 0:
        raise UsageError(f"checkpoint {file} is empty (0 bytes)")
    kind = _foreign_format(file)
    if kind:
        raise UsageError(f"{file} is not a PyTorch checkpoint: it is {kind}, where torch.save writes a zip archive "
                         "(or, in old files, a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name:
            raise UsageError(f"safe loading (weights_only=True) of {file} refused the object {name}; {_TRUST_HINT}") from err
        if "Weights only load failed" in str(err):  # garbage, or an object the safe unpickler cannot name
            raise UsageError(
                f"{file} is not a readable PyTorch checkpoint (corrupt, another format, or content that safe "
                f"loading refuses; {_TRUST_HINT})"
            ) from err
        raise UsageError(f"{file} is not a readable PyTorch checkpoint (corrupt or another format): {_short(err)}") from err
    except MemoryError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, IndexError, ... on truncated or foreign files
        raise UsageError(f"{file} is not a readable PyTorch checkpoint (corrupt or another format): {_short(err)}") from err


def _foreign_format(file: Path) -> str | None:
    """What the file is when it is plainly not torch.save's output (text), else None (torch.load then decides).

    torch.save writes a zip archive (``PK`` first) or, in legacy files, a pickle (protocol byte ``0x80`` first); the
    unpickler's own errors on anything else ("Memo value not found", "KeyError: 101") name its internals, not the file.
    """
    with open(file, "rb") as handle:
        head = handle.read(4096)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.lstrip()[:1] in ("{", "["):
        return "a text file (it looks like JSON)"
    return "a text file"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _extract_state_dict(obj: Any, file: Path) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(obj, nn.Module):  # a whole pickled model (only reachable with trust_checkpoint)
        return obj.state_dict(), "state_dict"
    if not isinstance(obj, Mapping):
        raise UsageError(
            f"{file} is not a checkpoint: expected a Lightning checkpoint or a state dict, found a {type(obj).__name__}"
        )
    if "state_dict" in obj:
        state = obj["state_dict"]
        if not isinstance(state, Mapping):
            raise UsageError(f"{file}: 'state_dict' holds a {type(state).__name__}, not a mapping of tensors")
        if not state:
            raise UsageError(f"{file}: the checkpoint's 'state_dict' is empty; there are no weights to analyse")
        return dict(state), "lightning" if "pytorch-lightning_version" in obj else "state_dict"
    for key in ("model_state_dict", "model"):
        if key in obj and _is_state_dict(obj[key]):
            return dict(obj[key]), "state_dict"
    if _is_state_dict(obj):
        return dict(obj), "state_dict"
    keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
    raise UsageError(
        f"{file} has no state dict: expected tensors or a 'state_dict'/'model_state_dict' entry, found keys {keys}"
    )


def _is_lightning_module_class(obj: Any) -> bool:
    from optdiag._lightning import lightning_module_base

    return inspect.isclass(obj) and lightning_module_base(obj) is not None


def _describe(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _state_dict_mismatch(err: Exception, model_name: str, file: Path) -> UsageError:
    """One line out of torch's multi-line ``load_state_dict`` report."""
    text = str(err)
    parts = []
    for pattern, label in (
        (r"Missing key\(s\) in state_dict: ([^\n]*)", "missing"),
        (r"Unexpected key\(s\) in state_dict: ([^\n]*)", "unexpected"),
    ):
        match = re.search(pattern, text)
        if match:
            keys = match.group(1).rstrip(". ").split(", ")
            parts.append(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    mismatch = re.search(r"size mismatch for ([^:]+): (copying a param with shape [^\n]*)", text)
    if mismatch:
        parts.append(f"shape of {mismatch.group(1)}: {mismatch.group(2).rstrip('.')}")
    detail = "; ".join(parts) if parts else _short(err)
    return UsageError(f"the weights in {file} do not fit {model_name}: {detail}")


def _construct(model: Any) -> nn.Module:
    """A fresh module from a class, a factory or an instance (deep-copied, so the caller's object stays as is)."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if not callable(model):
        raise UsageError(f"model must be an nn.Module class, a factory returning one, or a module; got {model!r}")
    try:
        built = model()
    except Exception as err:
        raise UsageError(
            f"could not build the model with {_describe(model)}() (no arguments): {_short(err)}; "
            "give a factory that takes no arguments, or a Lightning checkpoint with saved hyper-parameters"
        ) from err
    if not isinstance(built, nn.Module):
        raise UsageError(f"{_describe(model)}() returned a {type(built).__name__}, not a torch.nn.Module")
    return built


def load_checkpoint(path: str | os.PathLike, model: Any, trust_checkpoint: bool = False) -> LoadedCheckpoint:
    """A fresh model holding a checkpoint's weights.

    Args:
        path: a Lightning ``.ckpt`` or a file holding a state dict.
        model: a LightningModule class (Lightning checkpoints are restored with ``load_from_checkpoint`` and their
            hyper-parameters), an ``nn.Module`` class or factory callable taking no arguments, or a module instance
            (deep-copied first).
        trust_checkpoint: allow a full unpickle (can run code from the file).

    Raises:
        UsageError: an unreadable file, no state dict in it, or weights that do not fit the model.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(nn.Linear(2, 1).state_dict(), path)
        >>> load_checkpoint(path, lambda: nn.Linear(2, 1)).format
        'state_dict'
    """
    file = Path(path)
    raw = read_checkpoint(file, trust_checkpoint)
    state_dict, fmt = _extract_state_dict(raw, file)
    step = raw.get("global_step") if isinstance(raw, Mapping) else None
    epoch = raw.get("epoch") if isinstance(raw, Mapping) else None
    name = _describe(model)
    if fmt == "lightning" and _is_lightning_module_class(model):
        module = _load_lightning(model, file, trust_checkpoint, name)
    else:
        module = _construct(model)
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise _state_dict_mismatch(err, name, file) from err
    return LoadedCheckpoint(
        path=file,
        model=module,
        step=int(step) if isinstance(step, int) else None,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        format=fmt,
        optimizer_group=_first_optimizer_group(raw),
        optimizer_state=_first_optimizer_state(raw),
        findings=_saved_findings(raw),
    )


def _saved_findings(raw: Any) -> list[dict[str, Any]]:
    """The triage findings in a Lightning checkpoint's callback states (``TriageMonitor`` or ``OptDiag``'s own)."""
    callbacks = raw.get("callbacks") if isinstance(raw, Mapping) else None
    found: list[dict[str, Any]] = []
    for key, state in (callbacks.items() if isinstance(callbacks, Mapping) else ()):
        if not isinstance(state, Mapping):
            continue
        if str(key).startswith("OptDiag"):
            state = state.get("triage_monitor")
        elif not str(key).startswith("TriageMonitor"):
            continue
        findings = state.get("findings") if isinstance(state, Mapping) else None
        found += [f for f in findings or [] if isinstance(f, Mapping)]
    return found


def _first_optimizer_state(raw: Any) -> Optional[dict[str, Any]]:
    """``optimizer_states[0]`` of a Lightning checkpoint (an optimizer's ``state_dict()``), if it has one."""
    try:
        state = raw["optimizer_states"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return state if isinstance(state, Mapping) and "state" in state and "param_groups" in state else None


def _first_optimizer_group(raw: Any) -> Optional[dict[str, Any]]:
    """Scalar settings of ``optimizer_states[0]["param_groups"][0]`` in a Lightning checkpoint, if any."""
    try:
        group = raw["optimizer_states"][0]["param_groups"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(group, Mapping):
        return None
    plain = (int, float, bool, tuple, list)
    return {k: v for k, v in group.items() if k != "params" and isinstance(v, plain) and not isinstance(v, str)}


def _load_lightning(cls: Any, file: Path, trust_checkpoint: bool, name: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.load_from_checkpoint(file, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:  # read_checkpoint already passed; only a race would get here
        raise UsageError(f"safe loading of {file} failed: {_short(err)}; {_TRUST_HINT}") from err
    except RuntimeError as err:
        if "state_dict" in str(err) or "size mismatch" in str(err):
            raise _state_dict_mismatch(err, name, file) from err
        raise UsageError(f"{name}.load_from_checkpoint({file}) failed: {_short(err)}") from err
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UsageError(
            f"{name}.load_from_checkpoint({file}) could not rebuild the module from its saved hyper-parameters: "
            f"{_short(err)}"
        ) from err


def _loss_from_output(output: Any, where: str) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError(
            f"{where} must return a scalar loss tensor or a dict with 'loss'; got {type(output).__name__}. "
            "Pass --loss MODULE:CALLABLE (loss_fn(model, batch) -> scalar mean loss)"
        )
    return loss.reshape(())


def _training_step_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The module's own ``training_step`` as a loss, outside a Trainer (its ``self.log`` calls only warn)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log.*")
        warnings.filterwarnings("ignore", message=r".*trainer.*reference is not registered.*")
        try:
            output = model.training_step(batch, 0)
        except UsageError:
            raise
        except Exception as err:
            raise UsageError(
                f"{type(model).__name__}.training_step failed outside a Trainer ({_short(err)}); "
                "pass --loss MODULE:CALLABLE (loss_fn(model, batch) -> scalar mean loss)"
            ) from err
    return _loss_from_output(output, f"{type(model).__name__}.training_step")


def resolve_loss(model: nn.Module, loss: Any = None) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The ``loss_fn(model, batch)`` of the analysis.

    Args:
        model: the loaded model.
        loss: None (use the LightningModule's ``training_step``), a ``loss_fn(model, batch) -> scalar``, or a
            criterion (an ``nn.Module`` class or instance such as ``torch.nn.MSELoss``) applied to batches of
            ``(inputs, targets)`` through :func:`optdiag.curvature.supervised_loss`.

    Raises:
        UsageError: no loss can be found, or the loss has the wrong form.
    """
    if loss is None:
        from optdiag._lightning import lightning_module_base

        base = lightning_module_base(model)  # pytorch_lightning's or lightning.pytorch's
        if base is not None and _overrides(model, base, "training_step"):
            return _training_step_loss
        raise UsageError(
            f"{type(model).__name__} has no training_step to take the loss from; "
            "pass --loss MODULE:CALLABLE (loss_fn(model, batch) -> scalar mean loss, or a criterion class)"
        )
    from optdiag.curvature import supervised_loss

    if inspect.isclass(loss) and issubclass(loss, nn.Module):
        try:
            return supervised_loss(loss())
        except TypeError as err:
            raise UsageError(f"could not build the criterion {loss.__name__}(): {_short(err)}") from err
    if isinstance(loss, nn.Module):
        return supervised_loss(loss)
    if not callable(loss):
        raise UsageError(f"the loss must be callable as loss_fn(model, batch); got {type(loss).__name__}")
    try:
        inspect.signature(loss).bind(model, None)
    except TypeError as err:
        raise UsageError(f"the loss {_describe(loss)} cannot be called as loss_fn(model, batch): {err}") from err
    except ValueError:  # builtins without a signature: trust them
        pass

    def checked(model: nn.Module, batch: Any) -> torch.Tensor:
        return _loss_from_output(loss(model, batch), f"the loss {_describe(loss)}")

    return checked


def _overrides(obj: Any, base: type, method: str) -> bool:
    return getattr(type(obj), method, None) is not getattr(base, method, None)


def resolve_data(model: nn.Module, data: Any = None) -> Iterable[Any]:
    """An iterable of batches: from ``data`` (a callable, a DataLoader/iterable, or a LightningDataModule) or from
    the LightningModule's own ``train_dataloader``.

    Raises:
        UsageError: the data callable raises, returns something that is not data, or there is no data at all.
    """
    from optdiag._lightning import LIGHTNING_DATAMODULES, lightning_module_base

    base = lightning_module_base(model)  # pytorch_lightning's or lightning.pytorch's
    if data is None:
        if base is not None and _overrides(model, base, "train_dataloader"):
            return _call(model.train_dataloader, f"{type(model).__name__}.train_dataloader")
        raise UsageError(
            f"no data: {type(model).__name__} has no train_dataloader; pass --data MODULE:CALLABLE "
            "returning a DataLoader or a LightningDataModule"
        )
    source = data
    if callable(data) and not isinstance(data, (*LIGHTNING_DATAMODULES, torch.utils.data.DataLoader)):
        source = _call(data, f"the data callable {_describe(data)}")
    if isinstance(source, LIGHTNING_DATAMODULES):
        name = type(source).__name__
        _call(source.prepare_data, f"{name}.prepare_data")
        _call(lambda: source.setup("fit"), f"{name}.setup('fit')")
        source = _call(source.train_dataloader, f"{name}.train_dataloader")
    if isinstance(source, (torch.Tensor, str, bytes, Mapping)) or not isinstance(source, Iterable):
        raise UsageError(
            f"the data must be a DataLoader, an iterable of batches or a LightningDataModule; got {type(source).__name__}"
        )
    return source


def _call(fn: Callable[[], Any], where: str) -> Any:
    try:
        return fn()
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"{where} raised {_short(err)}") from err


def iter_batches(data: Iterable[Any], limit: Optional[int] = None, where: str = "the data") -> Iterator[Any]:
    """Batches from ``data`` (at most ``limit``), with errors while loading reported as :class:`UsageError`.

    Raises:
        UsageError: the data yield nothing, or raise while producing a batch.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"the number of batches must be at least 1, got {limit}")
    count = 0
    iterator = _call(lambda: iter(data), f"iterating {where}")
    while limit is None or count < limit:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        except Exception as err:
            raise UsageError(f"{where} raised {_short(err)} while producing batch {count}") from err
        count += 1
        yield batch
    if count == 0:
        raise UsageError(f"{where} yielded no batches")
