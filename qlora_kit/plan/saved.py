"""Bytes autograd keeps for backward, by building block: pure arithmetic, no torch.

The rules below were read off transformers 5.23, peft 0.21 and bitsandbytes 0.50 and checked against
``torch.autograd.graph.saved_tensors_hooks`` on tiny models of every family, to the byte
(``tools/measure_memory.py``; the CPU grid in ``tests/test_activations.py``). Notation: b batch,
s sequence, B = b*s rows, h hidden, nh/nkv heads, hd head dim, I intermediate, V vocab, r LoRA rank.

Element sizes, the "regime" of a step:

- ``e_h``: residual stream, embedding and norm outputs: 4 after peft's ``prepare_model_for_kbit_training``
  (it upcasts every non-4-bit parameter to fp32), else the model dtype;
- ``e_p``: output of a frozen base projection: a bitsandbytes layer returns its input's dtype; an
  nn.Linear gives 2 under autocast, else its weight's dtype;
- ``e_a``: tensors attention keeps: 2 under autocast (sdpa and matmul are autocast ops), else ``e_p``;
- ``e_m``: MLP intermediates, ``e_p`` (activations and mul are not autocast ops);
- LoRA weights are fp32 (peft ``autocast_adapter_dtype``); without autocast peft casts the branch
  input to fp32, under autocast lora_A/lora_B run in bf16 and keep bf16 copies of their weights;
- dropout masks: 1 byte on CUDA (``native_dropout``), the dropped tensor's dtype on CPU;
- LayerNorm mean/rstd: fp32 on CUDA, the input dtype on CPU.

Frozen base layers (nn.Linear without weight grad, bitsandbytes ``Linear4bit``) keep nothing; LLM.int8
``MatMul8bitLt`` keeps its input on ``ctx`` (not a saved tensor, but alive until backward, gradient
checkpointing or not): blocks record each quantized linear's input (``Ctx.quant_input``) and
``activations`` counts those not already saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from qlora_kit.knobs import DTYPES
from qlora_kit.plan import dora
from qlora_kit.plan.flops import choose


@dataclass(frozen=True)
class Dims:
    """Shapes of one training step: batch, sequence, and the architecture's widths."""

    b: int
    s: int
    h: int
    nh: int
    nkv: int
    hd: int
    inter: int  # MLP intermediate width (per expert)
    V: int
    L: int
    r: int = 8
    rot: int | None = None  # rotary dims (partial rotary for gpt_neox / phi); None = hd

    @property
    def q_dim(self) -> int:
        return self.nh * self.hd

    @property
    def kv_dim(self) -> int:
        return self.nkv * self.hd


@dataclass(frozen=True)
class Opts:
    """How the step runs: dtypes, quantization, preparation, attention, LoRA and checkpointing."""

    dtype: str = "fp32"  # model dtype: fp32 | bf16 | fp16
    quant: str = "none"  # none | nf4 | int8 (decoder linears are bnb layers; head, embeddings, norms are not)
    kbit_prep: bool | None = None  # prepare_model_for_kbit_training applied (default: quant != none)
    autocast: bool = False  # torch.autocast(bf16/fp16) around forward (HF Trainer bf16=True / fp16=True)
    attn: str = "sdpa"  # sdpa | eager
    sdpa_backend: str = "auto"  # auto | math (force)  -- auto resolves per device
    device: str = "cpu"  # cpu | cuda (changes dropout-mask bytes, sdpa kernel choice, LN stats dtype)
    mask: str = "none"  # none: no padding (transformers passes attn_mask=None, is_causal) | pad: padded batch
    targets: tuple[str, ...] = ()  # LoRA target leaf names
    lora_dropout: float = 0.05
    act_saved: int = 4  # tensors a plain MLP's activation keeps: gelu_new (python ops) 4, native kernels 1
    gc: bool = False
    ln_fp32: bool = False  # LayerNorm parameters fp32 with a 16-bit input (selective upcast, qlora_kit.model.savers)
    loss_chunk: int = 0  # rows per chunk of the chunked loss (qlora_kit.model.savers); 0: transformers' loss
    input_grads: bool | None = None  # enable_input_require_grads (default: = gc, transformers' GC enable calls it)
    # the model's own dropouts (attention probabilities, residual/hidden, embeddings), from its config
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    bool_mask: bool = False  # validation only: CPU run with dropout patched to native_dropout (bool mask)
    peft_sees_autocast: bool | None = None  # validation only: default = (device == "cuda")
    lora_fa: bool = False  # lora_A frozen: its input is not kept
    runlora: bool = False  # LoRA targets run qlora_kit.model.runlora's layer (see Ctx.runlora_branch)
    runlora_all: bool = False  # ... and every quantized linear is a target (no LLM.int8 ctx input kept)
    dora: bool = False  # peft's DoRA layer on every target (qlora_kit.plan.dora)


@dataclass(frozen=True)
class Attn:
    """One call of :meth:`Ctx.attn_core`: which inputs require grad and how the kernel gets them."""

    q_rg: bool
    k_rg: bool
    v_rg: bool
    k_heads: int
    v_storage: int | None
    q_storage: int | None
    k_storage: int | None
    gqa_capable: bool
    has_mask: bool
    eager_softmax: str
    pre_softmax_tanh: bool
    qkv_shared_storage: int | None
    out_is_o_in: bool


class Acc:
    """Collects named byte counts; `shared` keys count once per layer (same storage saved by several ops)."""

    def __init__(self) -> None:
        self.p: dict[str, int] = {}
        self._keys: set[str] = set()
        # inputs of the block's quantized linears, by storage key: (bytes, requires grad); LLM.int8 keeps
        # them on ``ctx`` (see ``Ctx.quant_input``)
        self.quant_inputs: dict[str, tuple[int, bool]] = {}

    def saved(self, key: str) -> bool:
        """Whether the storage named ``key`` is already among the saved tensors."""
        return key in self._keys

    def add(self, name: str, nbytes: float, cond: object = True, key: str | None = None) -> None:
        if not cond or nbytes == 0:
            return
        if key is not None:
            if key in self._keys:
                return
            self._keys.add(key)
        self.p[name] = self.p.get(name, 0) + int(nbytes)

    def total(self) -> int:
        return sum(self.p.values())


class Ctx:
    """The dtype regime of a step and the building blocks every family's block is made of."""

    def __init__(self, family: str, d: Dims, o: Opts) -> None:
        self.f, self.d, self.o = family, d, o
        kbit = o.kbit_prep if o.kbit_prep is not None else (o.quant != "none")
        self.kbit = kbit
        em = DTYPES[o.dtype]
        self.e_np = 4 if kbit else em  # non-quantized params (embeddings, norms, lm_head, non-4bit linears)
        self.e_h = self.e_np
        # Falcon's FalconLinear (nn.Linear subclass) is NOT replaced by bnb Linear4bit in transformers 5.23:
        # a "4-bit" Falcon keeps full-precision linears (upcast to fp32 by prepare_model_for_kbit_training)
        self.quant = o.quant != "none" and family not in ("falcon", "falcon_new")
        self.ac = o.autocast
        self.e_p = self.lin_out(self.e_h)
        self.e_a = 2 if self.ac else self.e_p
        self.e_m = self.e_p
        self.attn_cast = self.ac and self.e_p != 2  # autocast makes bf16 copies of q/k/v (else views are saved)
        self.cuda = o.device == "cuda"
        self.targets = set(o.targets)
        self.p = o.lora_dropout
        self.p_attn = o.attn_dropout
        if family in ("falcon", "falcon_new"):
            self.p_attn = 0.0  # falcon (no alibi) never applies attention dropout (sdpa dropout_p=0.0, eager none)
        self.p_resid = o.resid_dropout
        self.p_embd = o.embd_dropout
        self.input_grads = o.gc if o.input_grads is None else o.input_grads

    def lin_out(self, x_bytes: int) -> int:
        if self.quant:
            return x_bytes  # bnb Linear4bit: x.to(compute_dtype) ... .to(inp_dtype)
        return 2 if self.ac else self.e_np

    def mask_bytes(self, x_bytes: int) -> int:
        return 1 if (self.cuda or self.o.bool_mask) else x_bytes

    def ln_stat(self, x_bytes: int) -> int:
        # native_layer_norm mean/rstd: CUDA -> fp32 (acc type); CPU -> input dtype (param dtype when mixed)
        return 4 if self.cuda or self.o.ln_fp32 else x_bytes

    # ------------------------------------------------------------------ LoRA branch of one targeted Linear
    def lora(self, acc: Acc, name: str, d_in: int, d_out: int, x_bytes: int, x_rg: bool, in_key: str) -> None:
        """Saved tensors of peft LoRA branch  result + lora_B(lora_A(dropout(cast(x)))) * scaling."""
        d, bs = self.d, self.d.b * self.d.s
        if self.o.runlora and self.p == 0 and name in self.targets:  # with dropout, peft's layer runs
            self.runlora_branch(acc, name, d_in, d_out, x_bytes, x_rg, in_key)
            return
        # frozen nn.Linear with fp32 weight under autocast: mm saves the bf16 weight copy (for grad wrt input)
        self.base_weight_copy(acc, name, d_in, d_out, x_rg)
        if name not in self.targets:
            return
        train_a = not self.o.lora_fa  # a frozen lora_A's matmul keeps no input
        # peft non-bnb Linear always casts x to the adapter dtype (fp32).  peft's bnb Linear4bit casts only when
        # torch.is_autocast_enabled() is False -- that call without a device argument reports CUDA autocast only,
        # so under CPU autocast it still casts, under CUDA autocast it does not.
        sees = self.cuda if self.o.peft_sees_autocast is None else self.o.peft_sees_autocast
        cast = (not self.quant) or not (self.ac and sees)
        xl = 4 if cast else x_bytes
        new = xl != x_bytes  # the cast made a per-module copy
        if self.p > 0:
            acc.add(f"lora.{name}.dropout_mask", bs * d_in * self.mask_bytes(xl), x_rg)
            acc.add(f"lora.{name}.A_input(dropout_out)", bs * d_in * (2 if self.ac else xl), train_a)
        elif train_a:
            if self.ac:
                if xl == 2:
                    acc.add(f"lora.{name}.A_input(shared x)", bs * d_in * 2, key=in_key)
                else:
                    acc.add(f"lora.{name}.A_input(bf16 copy)", bs * d_in * 2)
            else:
                if new:
                    acc.add(f"lora.{name}.A_input(fp32 copy)", bs * d_in * 4)
                else:
                    acc.add(f"lora.{name}.A_input(shared x)", bs * d_in * 4, key=in_key)
        acc.add(f"lora.{name}.B_input", bs * d.r * (2 if self.ac else 4))
        if self.ac:  # bf16 casts of the fp32 LoRA weights, saved as mm's mat2
            acc.add(f"lora.{name}.A_weight_bf16", d.r * d_in * 2, x_rg)
            acc.add(f"lora.{name}.B_weight_bf16", d.r * d_out * 2)
        if self.o.dora:
            dora.saved_pieces(self, acc, name, d_in, d_out, x_bytes, x_rg, xl)

    def runlora_branch(self, acc: Acc, name: str, d_in: int, d_out: int, x_bytes: int, x_rg: bool, in_key: str) -> None:
        """Saved tensors of :mod:`qlora_kit.model.runlora`'s layer (no dropout): x (in the branch's dtype) when A
        trains, x A^T (in
        autocast's dtype, else the adapter's fp32) when the chosen order computes it in forward; no weight copies, no
        LLM.int8 input."""
        bs, r = self.d.b * self.d.s, self.d.r
        train_a = not self.o.lora_fa
        xa_bytes = bs * r * (2 if self.ac else 4)
        order = choose(bs, d_in, d_out, r, train_a)
        xl = 2 if self.ac else 4  # the branch's dtype, as peft's: autocast's, else the adapter's fp32
        if train_a and xl == x_bytes:
            acc.add(f"lora.{name}.A_input(shared x)", bs * d_in * x_bytes, key=in_key)
        elif train_a:
            acc.add(f"lora.{name}.A_input({'bf16' if xl == 2 else 'fp32'} copy)", bs * d_in * xl)
        acc.add(f"lora.{name}.B_input", xa_bytes, order.forward == "split" or not train_a)

    def quant_input(self, acc: Acc, key: str, width: int, x_bytes: int, rg: bool) -> None:
        """Record the input of a quantized linear (several linears may share one input storage, ``key``).
        LLM.int8's ``MatMul8bitFp`` (CPU) / ``MatMul8bitLt`` (CUDA) keep it as ``ctx.A`` whenever the
        autograd node exists, i.e. when the input requires grad; it is alive until backward."""
        if self.o.runlora_all:
            return
        if self.quant and key not in acc.quant_inputs:
            acc.quant_inputs[key] = (self.d.b * self.d.s * width * x_bytes, rg)

    def base_weight_copy(self, acc: Acc, name: str, d_in: int, d_out: int, x_rg: bool) -> None:
        if self.ac and not self.quant and self.e_np == 4:
            acc.add(f"base.{name}.weight_bf16_copy", d_in * d_out * 2, x_rg)

    # ------------------------------------------------------------------ norms
    def rmsnorm(self, acc: Acc, name: str, rg: bool, gemma: bool = False) -> None:
        bs, h = self.d.b * self.d.s, self.d.h
        acc.add(f"{name}.x_fp32", bs * h * 4, rg)  # hidden.to(float32) (input itself when already fp32)
        acc.add(f"{name}.rsqrt", bs * 4, rg)
        if gemma:
            acc.add(f"{name}.(1+w)", h * 4, rg)

    def layernorm(self, acc: Acc, name: str, rg: bool, input_shared: bool = False, x_bytes: int | None = None) -> None:
        bs, h = self.d.b * self.d.s, self.d.h
        x_bytes = x_bytes or self.e_h
        acc.add(f"{name}.input", bs * h * x_bytes, rg and not input_shared)
        acc.add(f"{name}.mean+rstd", 2 * bs * self.ln_stat(x_bytes), rg)

    def attn_out(self, acc: Acc, rg: bool, name: str, width: int, dropout: str | None) -> bool:
        """The attention output projection ``name`` (``width`` wide input, stored as ``o_in``), then the
        residual dropout mask ``dropout`` if the family has one. Returns whether its output requires grad."""
        d = self.d
        self.quant_input(acc, "o_in", width, self.e_a, rg)
        self.lora(acc, name, width, d.h, self.e_a, rg, "o_in")
        out_rg = rg or name in self.targets
        if dropout is not None:
            acc.add(dropout, d.b * d.s * d.h * self.mask_bytes(self.lin_out(self.e_a)), self.p_resid > 0 and out_rg)
        return out_rg

    def mlp(
        self, acc: Acc, rg: bool, in_key: str, up: str, down: str, act: str, act_tensors: int, dropout: str | None
    ) -> bool:
        """A two-linear MLP on the input stored as ``in_key``: ``up``, an activation that keeps
        ``act_tensors`` inter-wide tensors, ``down`` (its input stored as ``f2_in``), then the residual
        dropout mask ``dropout`` (``None``: the caller adds it). Returns whether the output requires grad."""
        d, t = self.d, self.targets
        bs = d.b * d.s
        self.lora(acc, up, d.h, d.inter, self.e_h, rg, in_key)
        f_rg = rg or up in t
        acc.add(act, act_tensors * bs * d.inter * self.e_m, f_rg)
        self.quant_input(acc, "f2_in", d.inter, self.e_m, f_rg)
        self.lora(acc, down, d.inter, d.h, self.e_m, f_rg, "f2_in")
        out_rg = f_rg or down in t
        if dropout is not None:
            acc.add(dropout, bs * d.h * self.mask_bytes(self.lin_out(self.e_m)), self.p_resid > 0 and out_rg)
        return out_rg

    # ------------------------------------------------------------------ attention core
    def sdpa_backend(self, q_heads_match: bool, gqa_flag: bool, has_mask: bool, dropout: float) -> str:
        o = self.o
        if o.sdpa_backend != "auto":
            return o.sdpa_backend
        if not self.cuda:
            if dropout > 0 or (not q_heads_match and not gqa_flag):
                return "math"
            return "cpu_flash"
        if not q_heads_match and not gqa_flag:
            return "math"
        if self.e_a == 2 and not has_mask and self.d.hd <= 256:
            return "flash"
        if gqa_flag:  # efficient kernel has no GQA support
            return "math"
        return "efficient"

    def attn_core(
        self,
        acc: Acc,
        q_rg: bool,
        k_rg: bool,
        v_rg: bool,
        *,
        k_heads: int,
        v_storage: int | None = None,
        q_storage: int | None = None,
        k_storage: int | None = None,
        gqa_capable: bool = True,
        mask_to_sdpa: bool | None = None,
        eager_softmax: str = "fp32",
        pre_softmax_tanh: bool = False,
        qkv_shared_storage: int | None = None,
        out_is_o_in: bool = True,
    ) -> None:
        """Saved tensors of the attention core (after q/k/v projections + rope, before o_proj).
        k_heads: number of key/value heads passed to the kernel.
        v_storage/q_storage/k_storage: bytes/elem-count override of the storage the kernel input is a view of.
        mask_to_sdpa: None -> decided from opts.mask; True/False force (falcon always passes a 4D mask)."""
        if not (q_rg or k_rg or v_rg):
            return
        a = Attn(
            q_rg,
            k_rg,
            v_rg,
            k_heads,
            v_storage,
            q_storage,
            k_storage,
            gqa_capable,
            (self.o.mask == "pad") if mask_to_sdpa is None else mask_to_sdpa,
            eager_softmax,
            pre_softmax_tanh,
            qkv_shared_storage,
            out_is_o_in,
        )
        if self.o.attn != "sdpa":
            self._attn_eager(acc, a)
            return
        kh, gqa_flag = a.k_heads, False
        if a.k_heads != self.d.nh and a.gqa_capable:
            if a.has_mask:  # transformers: repeat_kv when a mask is passed (use_gqa_in_sdpa False)
                kh = self.d.nh
            else:
                gqa_flag = True
        backend = self.sdpa_backend(kh == self.d.nh, gqa_flag, a.has_mask, self.p_attn)
        if backend in ("cpu_flash", "flash", "efficient"):
            self._attn_fused(acc, a, kh, backend)
        else:
            self._attn_math(acc, a)

    def _attn_fused(self, acc: Acc, a: Attn, kh: int, backend: str) -> None:
        """sdpa's flash / memory-efficient kernels: q, k, v, the output and the logsumexp (and a padded
        batch's float mask); ``kh``: the key/value heads the kernel gets."""
        d, ea = self.d, self.e_a
        b, s, bs, qd, kvd = d.b, d.s, d.b * d.s, d.q_dim, kh * d.hd
        if a.qkv_shared_storage is not None and not self.attn_cast:
            acc.add("attn.qkv_fused_storage", bs * a.qkv_shared_storage * ea)
        else:
            same_heads = kh == a.k_heads and not self.attn_cast
            acc.add("attn.q", bs * (a.q_storage or qd) * ea)
            acc.add("attn.k", bs * (a.k_storage if (a.k_storage and same_heads) else kvd) * ea)
            acc.add("attn.v", bs * (a.v_storage if (a.v_storage and same_heads) else kvd) * ea)
        acc.add("attn.out", bs * qd * ea)
        # fused kernels allocate out as (b, s, nh, hd) and return a transposed view, so
        # out.transpose(1,2).contiguous() is a no-op: the o_proj input IS this storage
        # (only when q arrives in (b,s,nh,hd) memory layout: not for gpt_neox/phi, whose partial-rotary
        # torch.cat makes q contiguous in (b,nh,s,hd))
        if a.out_is_o_in:
            acc._keys.add("o_in")
        s_lse = ceil(s / 32) * 32 if backend == "efficient" else s
        acc.add("attn.logsumexp", b * d.nh * s_lse * 4)
        if a.has_mask:
            s_pad = ceil(s / 16) * 16 if backend == "efficient" else s
            acc.add("attn.mask(float copy per layer)", b * s * s_pad * ea)

    def _attn_math(self, acc: Acc, a: Attn) -> None:
        """sdpa's math backend: bf16/fp16 inputs are upcast to fp32 (allowFP16BF16ReductionMathSDP off);
        q*sqrt(scale), k*sqrt(scale) (expanded to nh heads), softmax, v (bmm operand copy, nh heads)."""
        d, ea = self.d, self.e_a
        b, s, nh, hd, bs, qd = d.b, d.s, d.nh, d.hd, d.b * d.s, d.q_dim
        E = 4 if ea == 2 else ea
        scores_rg = a.q_rg or a.k_rg
        acc.add("attn.math.q_scaled", bs * qd * E, a.k_rg)
        acc.add("attn.math.k_scaled(nh heads)", bs * qd * E, a.q_rg)
        acc.add("attn.math.softmax", b * nh * s * s * E, scores_rg or (a.v_rg and self.p_attn == 0))
        vs = a.v_storage or a.qkv_shared_storage
        v_b1 = vs if (vs and b == 1 and ea == E and not self.attn_cast) else qd
        if b == 1 and a.k_heads == 1 and not a.gqa_capable:  # falcon MQA: broadcast k/v stay views at b == 1
            kv_b1 = d.kv_dim if a.k_heads == d.nkv else hd
            acc.p["attn.math.k_scaled(nh heads)"] = (
                acc.p.get("attn.math.k_scaled(nh heads)", 0) - bs * (qd - kv_b1) * E
                if a.q_rg
                else acc.p.get("attn.math.k_scaled(nh heads)", 0)
            )
            v_b1 = kv_b1
        acc.add("attn.math.v(nh heads)", bs * v_b1 * E, scores_rg)
        if self.p_attn > 0:
            # at::dropout inside the math kernel (C++): CUDA -> bool mask, CPU -> E-byte noise tensor
            acc.add("attn.math.dropout_mask", b * nh * s * s * (1 if self.cuda else E), scores_rg)
            acc.add("attn.math.dropout_out", b * nh * s * s * E, a.v_rg)

    def _eager_softmax_bytes(self, a: Attn) -> int:
        if a.eager_softmax == "fp32":
            return 4
        if a.eager_softmax == "hidden":  # falcon: softmax(dtype=hidden_states.dtype)
            return self.e_h if not self.ac else 4 if self.e_h == 4 else 2
        return self.e_a  # "same": softmax in the scores dtype (gpt2)

    def _attn_eager(self, acc: Acc, a: Attn) -> None:
        """Eager attention: q @ k^T saves q iff k requires grad, k^T iff q requires grad; the softmax (and
        softcap tanh), dropout, and v for probs @ v."""
        d, ea = self.d, self.e_a
        b, s, nh, hd, bs, qd = d.b, d.s, d.nh, d.hd, d.b * d.s, d.q_dim
        acc.add("attn.eager.q", bs * qd * ea, a.k_rg)
        acc.add("attn.eager.k(expanded to nh)", bs * qd * ea, a.q_rg)
        scores_rg = a.q_rg or a.k_rg
        if a.pre_softmax_tanh:  # gemma2 attn_logit_softcapping: tanh(scores / cap) * cap
            acc.add("attn.eager.softcap_tanh", b * nh * s * s * ea, scores_rg)
        e_sm = self._eager_softmax_bytes(a)
        acc.add(
            "attn.eager.softmax_out", b * nh * s * s * e_sm, scores_rg or (a.v_rg and ea == e_sm and self.p_attn == 0)
        )
        e_probs_pre = self.e_p if a.eager_softmax == "fp32" else e_sm  # dtype after `.to(query.dtype)`
        if self.p_attn > 0:
            acc.add("attn.eager.dropout_mask", b * nh * s * s * self.mask_bytes(e_probs_pre), scores_rg)
            acc.add("attn.eager.dropout_out", b * nh * s * s * ea, a.v_rg)
        elif ea != e_sm:
            acc.add("attn.eager.probs(cast copy)", b * nh * s * s * ea, a.v_rg)
        # b == 1: reshaping the (1,nh,s,hd) view for bmm is itself a view, so a fused-qkv storage is kept
        v_b1 = a.v_storage if (a.v_storage and b == 1 and not self.attn_cast) else qd
        if b == 1 and a.k_heads == 1 and not a.gqa_capable:  # falcon MQA: broadcast k/v stay views at b == 1
            v_b1 = hd
            acc.p["attn.eager.k(expanded to nh)"] = acc.p.get("attn.eager.k(expanded to nh)", 0) - (
                bs * (qd - hd) * ea if a.q_rg else 0
            )
        acc.add("attn.eager.v(expanded to nh)", bs * v_b1 * ea, scores_rg)
