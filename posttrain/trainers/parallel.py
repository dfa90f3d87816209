"""How the model and its optimizer are spread over processes: one process or DDP, FSDP2, DeepSpeed ZeRO.

The loop talks to one ``Strategy``. ``Strategy`` itself is one process or DDP through accelerate. ``Fsdp``
shards with torch's own ``fully_shard`` (FSDP2) and ``DeepSpeed`` hands the model to ``deepspeed.initialize``:
accelerate's wrappers for both engines refuse CPU processes, and driving the engines through their public
APIs makes the 2-process CPU tests exercise the very code a GPU run uses. Accelerate still forms the process
group, places tensors, reduces metrics and provides autocast.

Under a sharded strategy a checkpoint keeps the engine's own sharded state (``state/``) for resume, and the
gathered weights (``model/``, loadable by transformers or peft) unless ``distributed.checkpoint`` is sharded;
the final model is always gathered.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path

import torch

from posttrain.config import RunConfig
from posttrain.errors import ConfigError, MissingExtraError, PosttrainError
from posttrain.io import atomic_dir, free_port


def resolve_strategy(cfg: RunConfig) -> tuple[str, int]:
    """(strategy, ZeRO stage) of this run; ``auto`` follows what `accelerate launch` was told, else DDP.

    The launcher's own FSDP / DeepSpeed switches are taken out of the environment afterwards: the engine is
    driven from this config, and accelerate must not wrap the model a second time.
    """
    d = cfg.distributed
    strategy, stage = d.strategy, d.deepspeed.zero_stage
    env_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    env_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if strategy == "auto":
        if env_ds:
            strategy = "deepspeed"
            stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage))
        elif env_fsdp:
            strategy = "fsdp"
        else:
            strategy = "ddp"
        if strategy != "ddp":
            problem = cfg.engine_problem(strategy, stage)
            if problem:
                raise ConfigError(f"{problem} (chosen by `accelerate launch`, since distributed.strategy is auto)")
    elif (env_fsdp and strategy != "fsdp") or (env_ds and strategy != "deepspeed"):
        asked = "FSDP" if env_fsdp else "DeepSpeed"
        raise ConfigError(
            f"`accelerate launch` was told to use {asked} (its config file or --use_{asked.lower()}), but "
            f"distributed.strategy is {strategy}; set distributed.strategy in the posttrain config (the engine's "
            f"settings live there) and launch with a plain multi-process accelerate config"
        )
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        os.environ.pop(key, None)
    return strategy, stage


def make_strategy(cfg: RunConfig, acc, strategy: str, zero_stage: int) -> "Strategy":
    if strategy in ("fsdp", "deepspeed"):
        _one_process_group(acc)
    if strategy == "fsdp":
        return Fsdp(cfg, acc)
    if strategy == "deepspeed":
        return DeepSpeed(cfg, acc, zero_stage)
    return Strategy(cfg, acc)


def open_offload_group() -> None:
    """Under a launcher, the process group FSDP's CPU offload needs: NCCL for CUDA tensors, gloo for CPU ones.

    Formed before the Accelerator, which then keeps it (accelerate itself would form NCCL alone and refuses
    another backend). Not yet run on a GPU.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("cuda:nccl,cpu:gloo")


def _one_process_group(acc) -> None:
    """A process group of one, for an engine run without a launcher (FSDP or ZeRO CPU offload on one GPU).

    Both engines need a group; accelerate forms none for a single process.
    """
    import torch.distributed as dist

    if acc.num_processes > 1 or dist.is_initialized():
        return
    port = free_port()
    # As a launcher would set them: DeepSpeed reads LOCAL_RANK itself.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ[key] = value
    dist.init_process_group("cuda:nccl,cpu:gloo" if acc.device.type == "cuda" else "gloo")


class Strategy:
    """One process, or DDP, through accelerate: every process holds the whole model and optimizer."""

    # Parameters live in pieces: every process must run the same forward passes, in the same order.
    shards_params = False
    # Optimizer state lives in pieces: checkpoints are written by every process.
    shards_state = False

    def __init__(self, cfg: RunConfig, acc):
        self.cfg, self.acc = cfg, acc

    def describe(self) -> str:
        return "DDP" if self.acc.num_processes > 1 else "one process"

    def prepare(self, model, make_optimizer):
        """(model to train, optimizer to step, the torch optimizer a scheduler drives)."""
        optimizer = make_optimizer(model)
        wrapped, stepped = self.acc.prepare(model, optimizer)
        return wrapped, stepped, optimizer

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def no_sync(self, model, last: bool):
        return contextlib.nullcontext() if last else self.acc.no_sync(model)

    def backward(self, model, loss: torch.Tensor, last: bool) -> None:
        self.acc.backward(loss)

    def clip_grad_norm(self, model, params: list, max_norm: float | None) -> float:
        """The gradients' global norm before clipping; clipped to ``max_norm`` when given."""
        if max_norm:
            return float(self.acc.clip_grad_norm_(params, max_norm))
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def optimizer_step(self, model, optimizer) -> None:
        optimizer.step()

    def zero_grad(self, model, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def full_model(self, model):
        """The whole model with its weights, on the main process (None elsewhere). A collective when sharded."""
        return self.unwrap(model) if self.acc.is_main_process else None

    def save_state(self, model, optimizer, folder: Path) -> None:
        """What resume needs besides model/ (written by the caller from ``full_model``)."""
        if self.acc.is_main_process:
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load_state(self, model, optimizer, folder: Path) -> None:
        from posttrain.models.checkpoint import load_weights

        if not (folder / "optimizer.pt").is_file():
            raise PosttrainError(f"{folder} holds a sharded checkpoint (written under distributed.strategy fsdp or "
                                 f"deepspeed); resume it with the strategy that wrote it")
        load_weights(self.unwrap(model), folder / "model")
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False))

    def load_model(self, model, folder: Path) -> None:
        from posttrain.models.checkpoint import load_weights

        load_weights(self.unwrap(model), folder / "model")


class _Sharded(Strategy):
    """What FSDP and DeepSpeed share: gathered weights land in a copy of the model's skeleton on the main process."""

    shards_state = True

    def _keep_skeleton(self, model) -> None:
        self.skeleton = meta_copy(model) if self.acc.is_main_process else None

    def _fill_skeleton(self, state: dict | None):
        if not self.acc.is_main_process:
            return None
        full = meta_copy(self.skeleton)
        missing, unexpected = full.load_state_dict(state, strict=False, assign=True)
        still_meta = [n for n, p in full.named_parameters() if p.is_meta]
        if still_meta or unexpected:
            raise PosttrainError(f"gathering the sharded weights left {still_meta[:3]} unset and {unexpected[:3]} "
                                 f"unknown; please report this with the model's name")
        _tie(full)
        return full


class Fsdp(_Sharded):
    """FSDP2: each decoder layer (and the rest, at the root) sharded over the processes with ``fully_shard``."""

    shards_params = True

    def describe(self) -> str:
        f = self.cfg.distributed.fsdp
        kind = "full shard" if f.reshard_after_forward else "shard grads and optimizer, keep layer weights"
        return f"FSDP2 over {self.acc.num_processes} processes ({kind}{', CPU offload' if f.cpu_offload else ''})"

    def prepare(self, model, make_optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        fcfg = self.cfg.distributed.fsdp
        self._keep_skeleton(model)
        names = set(fcfg.wrap or _layer_classes(model))
        units = [m for m in model.modules() if type(m).__name__ in names]
        if not units:
            found = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"distributed.fsdp.wrap: no module of class {sorted(names)} in this model; "
                              f"its classes are {found[:40]}")
        mesh = init_device_mesh(self.acc.device.type, (self.acc.num_processes,))
        kw = {"mesh": mesh, "reshard_after_forward": fcfg.reshard_after_forward}
        if fcfg.cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for unit in units:
            fully_shard(unit, **kw)
        # The root (embeddings, final norm, LM head) stays gathered from its forward to its backward, as FSDP2
        # does by default: the chunked head (models/logprobs.py) runs the LM head after the model's forward.
        fully_shard(model, **{**kw, "reshard_after_forward": False})
        optimizer = make_optimizer(model)
        return model, optimizer, optimizer

    def unwrap(self, model):
        return model

    @contextlib.contextmanager
    def no_sync(self, model, last: bool):
        if last:
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def backward(self, model, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def clip_grad_norm(self, model, params: list, max_norm: float | None) -> float:
        # The norm of DTensor gradients is taken over every shard (a collective).
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def full_model(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self._fill_skeleton(state)

    def _state(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": msd, "optim": osd}

    def save_state(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(model, optimizer), checkpoint_id=str(folder / "state"))

    def load_state(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state(model, optimizer)
        dcp.load(state, checkpoint_id=str(_state_dir(folder)))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))

    def load_model(self, model, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, set_model_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, checkpoint_id=str(_state_dir(folder)))
        set_model_state_dict(model, state["model"], options=options)


class DeepSpeed(_Sharded):
    """DeepSpeed ZeRO: the engine owns the optimizer step and gradient clipping."""

    _TAG = "engine"

    def __init__(self, cfg: RunConfig, acc, zero_stage: int):
        super().__init__(cfg, acc)
        self.stage = zero_stage
        self.shards_params = zero_stage == 3
        self.engine = None

    def describe(self) -> str:
        d = self.cfg.distributed.deepspeed
        off = [w for w, on in (("optimizer", d.offload_optimizer), ("parameters", d.offload_params)) if on]
        return f"DeepSpeed ZeRO-{self.stage} over {self.acc.num_processes} processes" + (
            f" ({' and '.join(off)} offloaded to CPU)" if off else "")

    def ds_config(self) -> dict:
        return deepspeed_config(self.cfg, self.stage)

    def prepare(self, model, make_optimizer):
        try:
            import deepspeed
        except ImportError:
            raise MissingExtraError("deepspeed", "deepspeed", "distributed.strategy=deepspeed") from None
        if self.shards_params:
            self._keep_skeleton(model)
        optimizer = make_optimizer(model)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config())
        self.engine = engine
        return engine, ds_optimizer, optimizer

    def unwrap(self, model):
        return model.module

    def no_sync(self, model, last: bool):
        return contextlib.nullcontext()

    def backward(self, model, loss: torch.Tensor, last: bool) -> None:
        # The loop has already scaled the loss for the whole global batch: no division by the accumulation steps.
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, model, params: list, max_norm: float | None) -> float:
        # The engine clips (gradient_clipping) and steps together; its norm is known only after that step.
        model.step()
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def optimizer_step(self, model, optimizer) -> None:
        """Done by the engine in ``clip_grad_norm``."""

    def zero_grad(self, model, optimizer) -> None:
        """The engine zeroes its own gradient buffers after each step."""

    def full_model(self, model):
        module = model.module
        if not self.shards_params:
            return module if self.acc.is_main_process else None
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = ({k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
                     if self.acc.is_main_process else None)
        return self._fill_skeleton(state)

    def save_state(self, model, optimizer, folder: Path) -> None:
        model.save_checkpoint(str(folder / "state"), tag=self._TAG, exclude_frozen_parameters=True)

    def load_state(self, model, optimizer, folder: Path) -> None:
        self._load(model, folder, module_only=False)

    def load_model(self, model, folder: Path) -> None:
        self._load(model, folder, module_only=True)

    def _load(self, model, folder: Path, module_only: bool) -> None:
        path, _ = model.load_checkpoint(str(_state_dir(folder)), tag=self._TAG, load_module_strict=False,
                                        load_optimizer_states=not module_only, load_lr_scheduler_states=False,
                                        load_module_only=module_only)
        if path is None:
            raise PosttrainError(f"no DeepSpeed checkpoint in {_state_dir(folder)}")


def deepspeed_config(cfg: RunConfig, stage: int) -> dict:
    """The DeepSpeed JSON of a run: batch, accumulation, clipping and precision from training:, the rest merged
    from distributed.deepspeed.config_file."""
    t, d = cfg.training, cfg.distributed.deepspeed
    zero: dict = {"stage": stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    out = {
        "zero_optimization": zero,
        # posttrain's AdamW is handed to the engine, also when it runs on the CPU (ZeRO-Offload).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    if d.config_file:
        path = Path(d.config_file)
        try:
            extra = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"distributed.deepspeed.config_file {path}: {exc}") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"distributed.deepspeed.config_file {path}: expected a JSON object")
        ours = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16")
        clash = [k for k in ours if k in extra and extra[k] != "auto"]
        if clash:
            raise ConfigError(f"distributed.deepspeed.config_file {path} sets {clash}: these come from the training: "
                              f"section (batch_size, gradient_accumulation_steps, max_grad_norm, mixed_precision); "
                              f"remove them or set them to \"auto\"")
        extra = {k: v for k, v in extra.items() if k not in ours}
        out = _merge(out, extra)
        out["zero_optimization"]["stage"] = stage
    out.update({
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        "fp16": {"enabled": t.mixed_precision == "fp16"},
    })
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _state_dir(folder: Path) -> Path:
    state = folder / "state"
    if not state.is_dir():
        raise PosttrainError(f"{folder} has no sharded state (state/): it was written by a run without "
                             f"distributed.strategy fsdp or deepspeed, which cannot resume into this one")
    return state


def _layer_classes(model) -> list[str]:
    """The decoder-layer class names transformers will not split across devices (``_no_split_modules``)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return list(names)
    raise ConfigError("distributed.fsdp.wrap: this model does not name its decoder-layer classes "
                      "(_no_split_modules); list them, e.g. wrap: [LlamaDecoderLayer]")


def meta_copy(model):
    """A copy of ``model``'s structure whose parameters are on the meta device (no memory); buffers are copied.

    Shared parameters (tied embeddings) stay shared; ``requires_grad`` is kept.
    """
    memo = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _tie(model) -> None:
    """Tie the input and output embeddings again after ``load_state_dict(assign=True)`` replaced both."""
    from posttrain.models.checkpoint import is_peft

    base = model.get_base_model() if is_peft(model) else model
    tie = getattr(base, "tie_weights", None)
    if tie is not None:
        tie()


@contextlib.contextmanager
def shared_atomic_dir(path: Path, acc):
    """``io.atomic_dir`` for a folder every process writes into (sharded checkpoints).

    The main process makes the temporary folder and, once every process is done, renames it into place.
    Several machines need a shared filesystem for this, as for any sharded checkpoint.
    """
    if acc.num_processes == 1:
        with atomic_dir(path) as tmp:
            yield tmp
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.shared.tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    yield tmp
    acc.wait_for_everyone()
    if acc.is_main_process:
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
