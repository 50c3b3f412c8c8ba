"""What a method registers and how the engine updates it: networks, optimisers, states, AMP and clipping.

``register_network`` adds a network (on the device, wrapped for DDP when trainable, checkpointed) with
nnU-Net's SGD and poly learning rate unless given others; ``register_state`` checkpoints any object with
``state_dict``/``load_state_dict`` (EMA, memory banks, prototypes); ``restart_optimizer`` gives a network a
fresh optimiser whose poly LR runs over the current phase. ``backward_and_step`` is nnU-Net's update
(AMP grad scaler on CUDA, gradient norm clipped at 12), which every declared optimisation step goes through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from semidiff_nnunet.training.nnunet_compat import guard_module_hooks_if_compiled


class PhasePolyLR:
    """nnU-Net's poly learning rate over the epochs ``[start, end)`` of one phase:
    lr = lr₀ · (1 − (epoch − start)/(end − start))^0.9 (nnU-Net's ``PolyLRScheduler`` when the phase
    is the whole run)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, start: int, end: int,
                 exponent: float = 0.9):
        self.optimizer, self.initial_lr, self.start, self.end, self.exponent = optimizer, initial_lr, start, end, exponent

    def step(self, epoch: int) -> None:
        progress = min(max(epoch - self.start, 0) / max(self.end - self.start, 1), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr * (1 - progress) ** self.exponent


class OptimisationMixin:
    """The trainer's networks, optimisers and method states, and nnU-Net's update step."""

    def register_network(self, name: str, module: nn.Module, trainable: bool = True,
                         optimizer: torch.optim.Optimizer | None = None, poly_lr: bool = True) -> nn.Module:
        """Add a network (moved to the device, checkpointed).

        Trainable ones get ``optimizer`` (default: nnU-Net's SGD) and, unless ``poly_lr=False``,
        nnU-Net's poly schedule from the optimizer's initial LR; with ``poly_lr=False`` the LR stays
        constant.
        """
        if name == "network" or name in self.extra_networks:
            raise ValueError(f"network name {name!r} is taken")
        module = module.to(self.device)
        if self.is_ddp and trainable:
            module = self.wrap_ddp(module)
        self.extra_networks[name] = module
        if trainable:
            optimizer = optimizer or self._default_optimizer(module)
            scheduler = PolyLRScheduler(optimizer, optimizer.param_groups[0]["lr"], self.num_epochs) if poly_lr else None
            self.extra_optimizers[name] = (optimizer, scheduler)
        return module

    def register_state(self, name: str, obj: Any) -> Any:
        """Checkpoint ``obj`` (anything with ``state_dict``/``load_state_dict``: EMA, memory bank, ...)."""
        self.method_states[name] = obj
        return obj

    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """A trainable network under DDP (gradients averaged over ranks; the parameters are broadcast from
        rank 0 here, so every rank starts from the same weights)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size() if self.is_ddp else 1

    def rank_share(self, global_batch: int) -> int:
        """This rank's part of a global batch size (nnU-Net's split: the first ranks take the remainder)."""
        n, r = self.world_size, self.local_rank
        return global_batch // n + (1 if r < global_batch % n else 0)

    def _default_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                               momentum=0.99, nesterov=True)

    def restart_optimizer(self, name: str = "network", optimizer: torch.optim.Optimizer | None = None,
                          poly_lr: bool = True) -> torch.optim.Optimizer:
        """Give network ``name`` a fresh optimiser (default: nnU-Net's SGD) whose poly LR runs over the
        current phase only. Call it from ``on_phase_start``."""
        module = self.network if name == "network" else self.extra_networks[name]
        optimizer = optimizer or self._default_optimizer(module)
        self._restarted.add(name)
        span = self.current_phase
        scheduler = PhasePolyLR(optimizer, optimizer.param_groups[0]["lr"], span.start, span.end) if poly_lr else None
        if name == "network":
            self.optimizer, self.lr_scheduler = optimizer, scheduler or PhasePolyLR(
                optimizer, optimizer.param_groups[0]["lr"], 0, 0, exponent=0.0)
        else:
            self.extra_optimizers[name] = (optimizer, scheduler)
        return optimizer

    def build_planned_network(self, deep_supervision: bool | None = None, num_input_channels: int | None = None,
                              num_output_channels: int | None = None) -> nn.Module:
        """A fresh network from the plans with nnU-Net's architecture (not this method's
        ``build_network_architecture``), e.g. the second network of CPS or a network on image ⊕ label."""
        ds = self.enable_deep_supervision if deep_supervision is None else deep_supervision
        return nnUNetTrainer.build_network_architecture(
            self.plans_manager, self.configuration_manager, num_input_channels or self.num_input_channels,
            num_output_channels or self.label_manager.num_segmentation_heads, ds).to(self.device)

    def enable_hook_guards_if_compiled(self) -> None:
        """Dynamo guards on module hooks where nnU-Net compiled the network (see
        :func:`~.nnunet_compat.guard_module_hooks_if_compiled`)."""
        guard_module_hooks_if_compiled(self.network)

    def _networks(self, names: Sequence[str] | None) -> list[tuple[str, nn.Module, torch.optim.Optimizer]]:
        names = ["network", *self.extra_optimizers] if names is None else list(names)
        out = []
        for n in names:
            if n == "network":
                out.append((n, self.network, self.optimizer))
            elif n in self.extra_optimizers:
                out.append((n, self.extra_networks[n], self.extra_optimizers[n][0]))
            else:
                raise ValueError(f"optimisation step names network {n!r}, which is not a trainable network "
                                 f"(trainable: network, {', '.join(self.extra_optimizers) or '-'})")
        return out

    def step_learning_rates(self, epoch: int) -> None:
        """The LR schedules of the registered networks, for ``epoch`` (nnU-Net steps the main network's)."""
        for _, sched in self.extra_optimizers.values():
            if sched is not None:
                sched.step(epoch)

    def autocast(self):
        """nnU-Net's mixed-precision rule as a context: autocast on CUDA, nothing elsewhere (for
        forward passes outside the declared steps, e.g. in ``after_step``)."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def backward_and_step(self, loss: torch.Tensor, optimizers: list, modules: list[nn.Module]) -> None:
        """nnU-Net's update: backward (through the AMP grad scaler on CUDA), clip each module's
        gradient norm at 12, step every optimizer."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for opt in optimizers:
                self.grad_scaler.unscale_(opt)
            for module in modules:
                torch.nn.utils.clip_grad_norm_(module.parameters(), 12)
            for opt in optimizers:
                self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            for module in modules:
                torch.nn.utils.clip_grad_norm_(module.parameters(), 12)
            for opt in optimizers:
                opt.step()
