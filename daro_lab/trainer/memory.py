"""`daro-lab train --dry-run`: the model architecture built on the meta device and a memory plan, no GPU, no weights.

The architecture comes from `model.path/config.json` when that exists, else from `model.arch_file` (a
config.json kept in the repo, experiments/paper/arch/), else from the tiny preset's section. Building
it on the meta device allocates nothing, so the parameter count is exact for any size.

The plan is an estimate for one GPU of a job of `gpus` data-parallel ranks (1: the trainer alone; more:
torchrun, each rank holding its share of the mini-batch's and of the generation batch's sequences), per
optimizer step on one mini-batch (mini_batch_prompts x K sequences of prompt_tokens + max_new_tokens
tokens, the worst case where every response runs to the limit). Sizes in GiB:

- weights, gradients: parameters x bytes of the parameter dtype;
- AdamW states: two fp32 moments per parameter (8 bytes), as in mixed-precision training;
- one pass: a rank's share of the mini-batch, or `trainer.micro_batch_prompts` x K sequences (gradient
  accumulation; its no-grad first forward keeps no activations);
- activations saved for backward, per token per decoder layer: a * (15 h + 6 kv + 4 I) bytes (a = bytes
  of the dtype; two RMSNorms with their fp32 upcasts, q/k/v with rotary, attention output with
  flash/SDPA attention (no sequence^2 term), the SwiGLU MLP's gate, up, act(gate) and product). Without
  checkpointing the trainer encodes each prompt once for its K responses; with checkpointing every
  sequence runs whole, the layer inputs (a * h per token and layer) are kept, and one layer's
  activations exist again while it is recomputed;
- log-prob logits: 10 bytes x vocabulary per response token in flight (bf16 logits 2, fp32 copy 4,
  log-softmax 4); unchunked, every response token of the mini-batch; chunked
  (`model.logprob_chunk_size`), a chunk's tokens;
- update peak: weights + AdamW states + the larger of (saved activations + logits + the output
  embedding's gradient), the start of backward, and (all gradients + one layer's recompute), its end;
- rollout KV cache: 2 (k, v) x layers x kv x a per token, for prompts_per_step x K sequences generated
  at once (one generation batch; dynamic sampling generates its batches one after another). With
  rollout.engine 'vllm' instead: vLLM's share of the GPU (`rollout.vllm_gpu_memory`), held through the
  update too, since the engine is colocated;
- mixed precision (`trainer.mixed_precision` with a bf16/fp16 model.dtype, and always under FSDP): fp32
  master weights and gradients (4 bytes each), and for the transformers engine a generation copy in
  model.dtype (vLLM has its own, within its share);
- FSDP (`trainer.parallel = "fsdp"`, gpus > 1): weights, gradients and AdamW states divided by gpus; the
  unsharded compute parameters of the root (embeddings) and of two decoder layers (the one computing, the
  next one prefetched).

Calibrated on an H100 (benchmarks/check_memory_plan.py: random Qwen2.5-Math-1.5B-shaped model, bf16,
8 sequences of 256 + 512 tokens, forward + backward of the trainer's log-probs), measured / estimated
peak above the weights, GiB: no checkpointing 19.8 / 19.9, + chunks of 1024 15.0 / 15.6; checkpointing
7.5 / 6.7, + chunks 3.7 / 3.6. An estimate to plan with, not a profiler: kernels and fusions move it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from daro_lab.algorithms import METHODS
from daro_lab.config import Config, ConfigError

GIB = 1024**3
GPU_GIB = 80.0  # one H100 80 GB (HBM3), the card of the paper-scale runs
PROMPT_TOKENS = 256  # assumed prompt length: template (~40 tokens) + a competition problem (~100-200)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGIT_BYTES = 10  # per vocabulary entry and response token in flight: bf16 logits 2 + fp32 copy 4 + log-softmax 4


def load_arch_file(path: str | Path):
    """A transformers config from a config.json-style file; keys starting with '_' (comments) are ignored."""
    from transformers import AutoConfig

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'model.arch_file': no such file: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.arch_file {p} is not valid JSON: {e}") from e
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"model.arch_file {p} has no 'model_type' (e.g. 'qwen2', 'llama')")
    data.pop("architectures", None)
    return AutoConfig.for_model(model_type, **data)


def architecture(cfg: Config):
    """(transformers config, where it came from) of the policy `cfg` describes; reads no weights."""
    from transformers import AutoConfig

    m = cfg.model
    if m.path and (Path(m.path) / "config.json").is_file():
        return AutoConfig.from_pretrained(m.path, local_files_only=True), f"{m.path}/config.json"
    if m.arch_file:
        where = f"{m.arch_file}" + (f" (model.path {m.path} is not here)" if m.path else "")
        return load_arch_file(m.arch_file), where
    if m.path:
        raise ConfigError(
            f"model.path {m.path!r} has no config.json here and model.arch_file is empty: "
            "nothing to build the architecture from"
        )
    from daro_lab.models.tiny import tiny_config
    from daro_lab.models.tokenizer import CharTokenizer

    return tiny_config(m, CharTokenizer().vocab_size), "the tiny preset (model section)"


def meta_model(hf_config) -> torch.nn.Module:
    """The causal LM of `hf_config` on the meta device: every shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


@dataclass
class MemoryPlan:
    model_class: str
    source: str
    params: int
    embedding_params: int
    tied: bool
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int
    dtype: str
    seqs: int  # sequences of one mini-batch on one GPU (its share of mini_batch_prompts x K)
    seq_tokens: int  # prompt + response tokens per sequence
    response_tokens: int  # response tokens of those sequences
    gib: dict[str, float] = field(default_factory=dict)  # line -> GiB
    notes: list[str] = field(default_factory=list)
    gpus: int = 1  # data-parallel GPUs of the job
    fsdp: bool = False  # parameters, gradients and AdamW states sharded over them
    mixed: bool = False  # fp32 master weights, compute in dtype


def plan(cfg: Config, prompt_tokens: int = PROMPT_TOKENS, gpus: int = 1) -> MemoryPlan:
    """The memory plan of one optimizer step of `cfg` on one of `gpus` data-parallel GPUs (see the module
    docstring for the estimates).

    prompt_tokens: assumed prompt length, capped so that prompt + response fit the model's positions.
    """
    if gpus < 1:
        raise ConfigError(f"gpus must be >= 1, got {gpus}")
    fsdp = gpus > 1 and cfg.trainer.parallel == "fsdp"
    from daro_lab.models.prompting import resolve_dtype

    hf, source = architecture(cfg)
    model = meta_model(hf)
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    embedding_params = emb.numel() + (0 if tied or out is None else out.weight.numel())
    h = int(hf.hidden_size)
    L = int(hf.num_hidden_layers)
    heads = int(hf.num_attention_heads)
    kvh = int(getattr(hf, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf, "head_dim", None) or h // heads)
    kv = kvh * head_dim
    inter = int(hf.intermediate_size)
    V = int(hf.vocab_size)
    dtype = resolve_dtype(cfg.model.dtype, cfg.trainer.device)
    a = DTYPE_BYTES[dtype]
    K = cfg.rollout.num_responses
    T = cfg.rollout.max_new_tokens
    max_pos = int(getattr(hf, "max_position_embeddings", 0) or 0)
    if max_pos and prompt_tokens + T > max_pos:
        prompt_tokens = max(1, max_pos - T)
    S = prompt_tokens + T
    mb_prompts = -(-cfg.trainer.mini_batch_prompts // gpus)  # this rank's prompts of a mini-batch (at most)
    if cfg.trainer.micro_batch_prompts:  # gradient accumulation: one pass holds this many
        mb_prompts = min(mb_prompts, cfg.trainer.micro_batch_prompts)
    seqs = mb_prompts * K
    tokens = seqs * S
    resp_tokens = seqs * T

    # Without checkpointing the trainer encodes each prompt once for its K responses (group_size=K); with
    # checkpointing (no KV cache in training) every sequence runs prompt + response.
    tokens_shared = seqs * T + mb_prompts * prompt_tokens
    per_tok_layer = a * (15 * h + 6 * kv + 4 * inter)  # saved for backward, one token, one decoder layer
    act_full = per_tok_layer * L * tokens_shared
    act_ckpt = a * h * L * tokens  # the layer inputs kept by checkpointing
    recompute = per_tok_layer * tokens  # one layer's activations while it is recomputed in backward
    chunk = cfg.model.logprob_chunk_size or 1024
    logits_full = LOGIT_BYTES * V * resp_tokens
    logits_chunk = LOGIT_BYTES * V * min(chunk, resp_tokens)
    out_grad = V * h * a  # the output embedding's gradient, the first one backward makes
    gen_seqs = -(-cfg.trainer.prompts_per_step // gpus) * K
    kv_cache = 2 * L * kv * a * gen_seqs * S
    layer_params = (params - embedding_params) / L
    from daro_lab.trainer.precision import precision_plan

    vllm = cfg.rollout.engine == "vllm"
    mixed, generation_copy = precision_plan(a == 4, cfg.trainer.mixed_precision, fsdp, cfg.rollout.engine)
    shards = gpus if fsdp else 1
    g = {
        "weights": params * (4 if mixed else a) / shards,
        "gradients": params * (4 if mixed else a) / shards,
        "adamw_states_fp32": params * 8 / shards,
        "activations_no_ckpt": act_full,
        "activations_ckpt": act_ckpt + recompute,
        "logits_unchunked": logits_full,
        f"logits_chunked_{chunk}": logits_chunk,
        "rollout_kv_cache": kv_cache,  # transformers engine: the generation batch at once
    }
    if vllm:  # vLLM pages its KV cache within what it holds, and holds it through the update (colocated)
        del g["rollout_kv_cache"]
        g["vllm_reserved"] = cfg.rollout.vllm_gpu_memory * GPU_GIB * GIB
    if generation_copy:  # the transformers engine generates from a copy; vLLM syncs from the masters
        g["generation_copy"] = params * a
    if fsdp:
        g["unsharded_in_flight"] = a * (embedding_params + 2 * layer_params)
    if cfg.algo.kl_beta > 0:
        g["reference_model"] = params * a / (gpus if fsdp else 1)
    static = (
        g["weights"]
        + g["adamw_states_fp32"]
        + g.get("reference_model", 0)
        + g.get("generation_copy", 0)
        + g.get("unsharded_in_flight", 0)
        + g.get("vllm_reserved", 0)
    )

    def update_peak(ckpt: bool, chunked: bool) -> float:
        """Weights + optimizer states + the larger of two phases: the end of the forward / start of backward
        (saved activations, log-prob logits, the output embedding's gradient) and the end of backward (every
        gradient, plus one layer's recompute under checkpointing)."""
        logits = logits_chunk if chunked else logits_full
        start = (act_ckpt if ckpt else act_full) + logits + out_grad
        end = g["gradients"] + (recompute if ckpt else 0)
        return static + max(start, end)

    g["update_peak_as_configured"] = update_peak(cfg.model.gradient_checkpointing, bool(cfg.model.logprob_chunk_size))
    g["update_peak_ckpt_chunked"] = update_peak(True, True)
    g["update_peak_no_ckpt_unchunked"] = update_peak(False, False)
    notes = []
    if max_pos and S > max_pos:
        notes.append(f"responses of {T} tokens leave no room for a prompt in the model's {max_pos} positions")
    # sequences of one pass that would fit: what a sequence adds to the larger phase, against what is left
    lg = LOGIT_BYTES * V * (T if not cfg.model.logprob_chunk_size else 0)
    per_seq = (
        a * h * L * S + per_tok_layer * S
        if cfg.model.gradient_checkpointing
        else per_tok_layer * L * (T + prompt_tokens / K)
    ) + lg
    fixed = static + out_grad + (logits_chunk if cfg.model.logprob_chunk_size else 0)
    free = GPU_GIB * GIB - max(fixed, static + g["gradients"])
    fit = int(free // per_seq) if free > 0 and per_seq > 0 else 0
    static_all = static + g["gradients"]
    if static_all > GPU_GIB * GIB:
        notes.append(
            f"weights, gradients and AdamW states alone ({static_all / GIB:.0f} GiB) exceed one {GPU_GIB:.0f} GiB GPU: "
            "this model needs them sharded over GPUs (trainer.parallel = 'fsdp' under torchrun; plan it with --gpus N)"
        )
    elif g["update_peak_as_configured"] > GPU_GIB * GIB:
        notes.append(
            f"one pass of {seqs} sequences does not fit one {GPU_GIB:.0f} GiB GPU; about {fit} sequences of "
            f"{S} tokens would: "
            + (
                f"set trainer.micro_batch_prompts to {fit // K} or less (gradient accumulation)"
                if fit >= K
                else f"not even one prompt's {K} responses: shorten them or shard over more GPUs"
            )
        )
    if not vllm and kv_cache > GPU_GIB * GIB - g["weights"]:
        notes.append(f"the rollout KV cache of {gen_seqs} sequences at once exceeds one GPU: generation needs batching")
    if dtype == "bfloat16" and cfg.trainer.lr < 1e-4 and not mixed:
        notes.append(
            f"bf16 parameters updated in place by torch AdamW (bf16 states): steps of lr {cfg.trainer.lr:g} "
            "are below bf16 resolution (~0.4% of a weight) and mostly round away; set "
            "trainer.mixed_precision = true (fp32 master weights)"
        )
    return MemoryPlan(
        type(model).__name__,
        source,
        params,
        embedding_params,
        tied,
        V,
        h,
        L,
        heads,
        kvh,
        inter,
        int(getattr(hf, "max_position_embeddings", 0) or 0),
        dtype,
        seqs,
        S,
        resp_tokens,
        {k: v / GIB for k, v in g.items()},
        notes,
        gpus,
        fsdp,
        mixed,
    )


def format_plan(p: MemoryPlan, cfg: Config, config_path: Any = None) -> str:
    t, r = cfg.trainer, cfg.rollout
    lines = [
        f"daro-lab dry run{f': {config_path}' if config_path else ''}",
        f"  method {cfg.algo.method}, K {r.num_responses}, {t.prompts_per_step} prompts/step, mini-batch "
        f"{t.mini_batch_prompts}, {t.steps} steps, lr {t.lr:g}"
        + (f", lr_w {cfg.algo.daro.lr_w:g}" if METHODS[cfg.algo.method].weights == "learned" else "")
        + f", eps {cfg.algo.eps_low:g}/{cfg.algo.eps_high:g}, kl {cfg.algo.kl_beta:g}"
        + (f", dynamic sampling up to {t.dynamic_sampling_max_batches} batches" if t.dynamic_sampling else ""),
        f"  task {cfg.task.name}"
        + (f", train {cfg.task.train_file}" if cfg.task.train_file else "")
        + f", template {cfg.model.prompt_template!r}",
        f"  model {p.model_class} from {p.source}",
        f"  parameters {_count(p.params)} (embeddings {_count(p.embedding_params)}, tied: {'yes' if p.tied else 'no'}), "
        f"vocab {p.vocab}, hidden {p.hidden}, {p.layers} layers, {p.heads} heads / {p.kv_heads} kv heads, "
        f"MLP {p.intermediate}, {p.max_positions} positions",
        f"  memory plan, one GPU{_job(p)}, GiB ({p.dtype} {'compute' if p.mixed else 'parameters'} on {t.device}; "
        f"one pass {p.seqs} sequences{' on this GPU' if p.gpus > 1 else ''} x "
        f"{p.seq_tokens} tokens = prompt {p.seq_tokens - r.max_new_tokens} (assumed) + response {r.max_new_tokens}):",
    ]
    shard = f", 1/{p.gpus} shard" if p.fsdp else ""
    labels = {
        "weights": f"weights ({'fp32 master' if p.mixed else p.dtype}{shard})",
        "gradients": f"gradients ({'fp32' if p.mixed else p.dtype}{shard})",
        "adamw_states_fp32": f"AdamW states (2 x fp32{shard})",
        "generation_copy": f"generation copy of the policy ({p.dtype}, full)",
        "vllm_reserved": f"vLLM, colocated (weights + paged KV cache, {cfg.rollout.vllm_gpu_memory:g} of the GPU)",
        "unsharded_in_flight": "unsharded parameters in flight (embeddings + 2 layers)",
        "reference_model": "reference model (KL)",
        "activations_no_ckpt": "activations, no checkpointing",
        "activations_ckpt": "activations, gradient checkpointing",
        "logits_unchunked": "log-prob logits, unchunked",
        "rollout_kv_cache": f"rollout KV cache ({-(-t.prompts_per_step // p.gpus) * r.num_responses} sequences)",
        "update_peak_as_configured": "update peak as configured "
        f"(checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}, "
        f"chunk {cfg.model.logprob_chunk_size or 'off'})",
        "update_peak_ckpt_chunked": "update peak, checkpointing + chunked",
        "update_peak_no_ckpt_unchunked": "update peak, neither",
    }
    for key, v in p.gib.items():
        label = labels.get(key) or key.replace("logits_chunked_", "log-prob logits, chunks of ") + (
            " tokens" if key.startswith("logits_chunked_") else ""
        )
        lines.append(f"    {label:58s} {v:12.2f}")
    for n in p.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def _job(p: MemoryPlan) -> str:
    return f" of {p.gpus} ({'FSDP' if p.fsdp else 'DDP'})" if p.gpus > 1 else ""


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def dry_run(cfg: Config, config_path: Any = None, gpus: int = 1) -> tuple[MemoryPlan, str]:
    """Resolve and describe a config without a GPU or weights: (plan, printable text), for one GPU of a
    job of `gpus` data-parallel ranks.

    Data files and model.path are reported when they are not on this machine, not required.
    """
    p = plan(cfg, gpus=gpus)
    text = format_plan(p, cfg, config_path)
    missing = [
        f"{k} {v}"
        for k, v in (
            ("model.path", cfg.model.path),
            ("task.train_file", cfg.task.train_file),
            ("task.eval_file", cfg.task.eval_file),
        )
        if v and not Path(v).exists()
    ]
    missing += [f"benchmark {b}" for b in cfg.eval.benchmarks if not Path(b.partition("=")[2]).exists()]
    if missing:
        text += "\n  not on this machine (needed to train): " + "; ".join(missing)
    return p, text
