"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the policy: `trainer.parallel = "fsdp"` under torchrun.

    torchrun --nproc_per_node 8 $(which daro-lab) train --config experiments/paper/qwen2.5-math-7b/daro.toml \
        --set trainer.parallel=fsdp

What is sharded and how the trainer meets FSDP's rule that every rank runs the same forwards:

    policy    fp32 master parameters, their gradients and AdamW states are split over the ranks (1/world each);
              each decoder layer is one FSDP unit, the log-prob module around the whole policy (embedding,
              final norm, lm_head) the root, so the chunked head and the shared-prompt KV path run inside
              the root's forward. Compute runs in model.dtype (bf16 on GPU) via MixedPrecisionPolicy;
              gradients are reduced in fp32. Every forward of the policy goes through the root, on every
              rank at once: the trainer's mini-batches are split so that all ranks hold the same count.
    rollouts  ranks generate different prompts and evaluations (out of step), so generation cannot use
              the sharded policy: the transformers engine uses a full, unsharded copy in model.dtype
              (`precision.GenerationCopy`), refreshed after each step's update by all-gathering every
              parameter (a collective that all ranks run after `update`); vLLM keeps its own copy, synced
              from the shards gathered one parameter at a time as it loads them.
    reference the KL reference model (kl_beta > 0) is sharded the same way, frozen.
    state     checkpoints hold the full (unsharded) fp32 state dict and full optimizer state, gathered to
              rank 0 with torch.distributed.checkpoint.state_dict; resuming loads them and re-shards, so
              a checkpoint is a plain Hugging Face-loadable safetensors file, as with DDP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from daro_lab.distributed import LogprobModule


def decoder_layers(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The policy's transformer blocks, the FSDP units: the modules Hugging Face marks as not to be split
    (`_no_split_modules`, e.g. Qwen2DecoderLayer, LlamaDecoderLayer)."""
    names = set(getattr(policy, "_no_split_modules", None) or [])
    layers = [m for m in policy.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(policy).__name__} names no decoder layer class (_no_split_modules); "
            "FSDP needs one to shard the model layer by layer"
        )
    return layers


def shard(policy: torch.nn.Module, fn, compute_dtype: torch.dtype) -> LogprobModule:
    """fully_shard every decoder layer of `policy` (fp32 master parameters afterwards) and the module that
    computes `fn(policy, ...)` as the root. Returns that root; its forward is the log-prob forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy.float()  # master weights; compute in compute_dtype below
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(policy):
        fully_shard(layer, mp_policy=mp)
    return fully_shard(LogprobModule(policy, fn), mp_policy=mp)


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter (a collective); plain tensors as they are."""
    return t.full_tensor() if is_sharded(t) else t


def model_state(root: torch.nn.Module, policy: torch.nn.Module) -> dict[str, Tensor]:
    """The policy's full fp32 state dict on CPU, keyed by its own (Hugging Face) names, tied parameters
    once (the names `named_parameters` keeps). A collective; rank 0 gets the dict, the others an empty one
    (torch's cpu_offload full state dicts live on rank 0 only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(
        root, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    )
    prefix = "policy."
    keep = {n for n, _ in policy.named_parameters()} | _persistent_buffers(policy)
    return {k[len(prefix) :]: v.contiguous() for k, v in sd.items() if k[len(prefix) :] in keep}


def _persistent_buffers(module: torch.nn.Module) -> set[str]:
    """Names of the buffers a state dict holds (not e.g. rotary inv_freq, which the model recomputes)."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, m in module.named_modules()
        for name, _ in m.named_buffers(recurse=False)
        if name not in m._non_persistent_buffers_set
    }


def load_model_state(root: torch.nn.Module, policy: torch.nn.Module, sd: dict[str, Tensor]) -> None:
    """Load a full state dict (as `model_state` returns, or a plain safetensors file's) into the sharded root,
    each rank taking its shards. A missing key is an error unless it is a tied alias of a present one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = _persistent_buffers(policy)
    names = {n for n, _ in policy.named_parameters(remove_duplicate=False)} | buffers
    canonical = {n for n, _ in policy.named_parameters()} | buffers
    missing = canonical - sd.keys()
    unknown = sd.keys() - names
    if missing or unknown:
        raise KeyError(
            f"checkpoint does not fit the policy: missing {sorted(missing)[:5]}, unexpected {sorted(unknown)[:5]}"
        )
    set_model_state_dict(
        root, {"policy." + k: v for k, v in sd.items()}, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def optimizer_state(container: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's full state (AdamW moments unsharded, keyed by parameter name) on CPU, on rank 0. A collective.
    `container` must hold every parameter the optimizer steps (the sharded root and the DARO weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(container, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(container: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a DARO weight whose group never appeared has had no gradient, hence no AdamW state yet
    set_optimizer_state_dict(container, opt, state, options=StateDictOptions(full_state_dict=True, strict=False))
