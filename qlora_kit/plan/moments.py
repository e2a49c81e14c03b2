"""The peak of one training step: pure arithmetic over :mod:`qlora_kit.plan.activations`, no torch.

The peak is the largest of a few moments (:func:`peak_moments`), each a sum of what is alive then:
the start of backward (every saved tensor, the loss's log-softmax and the two fp32 b x s x vocab
gradients nll_loss and log_softmax produce), the forward's last dequantized matmul, and the last
block's backward (its MLP, its output linear with the dequantized weight, its LoRA branch, eager
attention's s x s gradients; under checkpointing, the block's recomputation on top of every block's
input). At real sizes the start of backward is the peak; the others decide it for small batches,
small vocabularies, long eager sequences and checkpointed all-linear LoRA. The transient (a
dequantized weight) is part of the moments it belongs to, not of every one. Checked against the live
tensor bytes of real steps on CPU, and each moment's tensors identified, in ``tests/test_activations.py``
(``tools/measure_memory.py`` for one setting).
"""

from __future__ import annotations

from qlora_kit.catalog.arch import ArchSpec
from qlora_kit.knobs import FOUR_BIT, TrainSetup
from qlora_kit.plan.activations import FP32, ctx_for, logits_grad_bytes, loss_rows, saved_bytes, transient_bytes
from qlora_kit.plan.blocks import LAYER, LN_FINAL, MLP, ROPE
from qlora_kit.plan.dora import branch_dtype, norm_transient_bytes

# the pieces outside the blocks that backward frees before it reaches them (the head and the loss)
HEAD = ("final_norm", "loss.", "lm_head.", "logits_softcap")
# torch.utils.checkpoint stashes the CPU RNG state (a 5056-byte tensor) per checkpointed block; on CUDA
# that is host memory (the device RNG state is 16 bytes, also on the host)
CPU_RNG_STATE_BYTES = 5056
Moment = dict[str, int]


class _Step:
    """One training step's pieces, from which :func:`peak_moments` assembles the candidate peaks.

    Every moment is named by where it sits and counts what is alive then besides the parameters,
    quantization and optimizer state and the LoRA gradients. "The last block" is where the peaks outside
    backward's start sit: its tensors are the last saved in forward and the first used in backward.
    """

    def __init__(self, arch: ArchSpec, setup: TrainSetup, device: str) -> None:
        self.arch, self.setup, self.device = arch, setup, device
        c = self.c = ctx_for(arch, setup, device)
        d = self.d = c.d
        self.bs = d.b * d.s
        saved = saved_bytes(arch, setup, device)
        self.nl: dict[str, int] = saved["nonlayer"]  # type: ignore[assignment]
        layers: list[dict[str, int]] = saved["layers"]  # type: ignore[assignment]
        self.rec: dict[str, int] = saved["recompute"]  # type: ignore[assignment]
        self.blocks = sum(sum(p.values()) for p in layers)
        # offloaded checkpoint inputs: in the same memory on a CPU; on a GPU in host memory, but the block
        # being recomputed has its input copied back
        offloaded: int = saved["offloaded"]  # type: ignore[assignment]
        self.blocks += offloaded if device == "cpu" else 0
        self.copied_back = offloaded // d.L if offloaded and device != "cpu" else 0
        head = sum(v for k, v in self.nl.items() if k.startswith(HEAD))
        self.pre = sum(self.nl.values()) - head  # embedding-side pieces and rotary tables
        self.shape = MLP[c.f]
        self.last = LAYER[c.f](c, c.input_grads or d.L > 1)  # the last block as the forward leaves it
        self.transient = transient_bytes(arch, setup) if c.quant else 0
        # DoRA: the largest adapted linear's row-norm computation, in every forward (and recomputation)
        shapes = [(s.d_in, s.d_out) for s in arch.linears_named(setup.targets)] if setup.dora else []
        self.dora_norm = norm_transient_bytes(c, shapes)
        if self.dora_norm:  # made before the norm: the branch's cast and dropout of the output linear's input
            branch = f"lora.{MLP[c.f].last}."
            made = ("dropout_mask", "A_input(dropout_out)", "copy)")
            self.dora_norm += sum(v for k, v in self.rec.items() if k.startswith(branch) and k.endswith(made))
            xl = branch_dtype(c)
            self.dora_norm += self.bs * d.inter * xl if c.p > 0 and xl != c.e_m else 0
        # chunked loss: the hidden state's gradient, summed over the chunks' backward
        self.chunk_grad = self.bs * d.h * c.e_h if setup.chunked_loss else 0
        self.int8 = setup.quant == "int8" and not setup.kbit_kept_inputs and c.quant and not c.o.runlora_all
        # the block's LLM.int8 ctx inputs (alive until the graph is freed after backward)
        self.kept = {k for k, (_, rg) in self.last.quant_inputs.items() if rg} if self.int8 else set()
        self.e_m, self.inter = c.e_m, d.inter
        # the compute dtype of the quantized matmuls: bnb 4-bit casts its input to it, LLM.int8 computes in
        # its input's dtype
        self.cdt = setup.dtype_bytes if setup.quant in FOUR_BIT and c.quant else c.e_m
        self.lora_last = self.shape.last in c.targets
        # eager attention (and sdpa on a padded batch) gets a 4-D float mask built once per forward: alive
        # through the forward, and under checkpointing held by every block's checkpoint until backward ends
        self.mask = d.b * d.s * d.s * c.e_np if c.o.attn == "eager" or c.o.mask == "pad" else 0
        # the gradient of the block's output; the residual dropout's backward makes a second one, which
        # the output linear's backward consumes
        self.grad_out = self.bs * d.h * c.e_h
        self.drop_grad = self.bs * d.h * c.lin_out(c.e_m) if self.rec.get(self.shape.out_dropout) else 0
        # what the block saves after its output linear (and that linear's LoRA branch): freed by the time
        # backward reaches the linear
        prefixes = (f"lora.{self.shape.last}.", f"dora.{self.shape.last}.", *self.shape.after)
        self.tail = sum(v for k, v in self.rec.items() if k.startswith(prefixes))
        # what of it is still alive when lora_A's backward runs (lora_B's inputs and what follows are done)
        branch = f"lora.{self.shape.last}."
        self.lora_a_live = sum(v for k, v in self.rec.items() if k.startswith(branch) and ".B_" not in k)
        # LoRA-FA keeps no dropout output, but dropout's backward makes a gradient of its size
        self.fa_drop = self.bs * d.inter * (2 if c.ac else FP32) if c.o.lora_fa and c.p > 0 and self.lora_last else 0
        self.lora_a_live += self.fa_drop
        # the MLP's backward: its elementwise part (act(gate) * up: three intermediate-wide tensors, act(fc1):
        # two) or its output linear's (the input gradient; its LoRA branch's, waiting to be summed; the
        # output and input gradients in the compute dtype of a quantized matmul)
        bs, inter = self.bs, self.inter
        self.elementwise = (3 if self.shape.gated else 2) * bs * inter * c.e_m
        self.linear = bs * inter * c.e_m
        if self.lora_last:
            self.linear += bs * inter * FP32
        if c.quant and self.cdt != c.e_m:
            self.linear += bs * (d.h + inter) * self.cdt - bs * inter * c.e_m

    # -- pieces ---------------------------------------------------------------------------------------

    def around_last_matmul(self, mlp_in_alive: bool, held: set[str]) -> int:
        """Alive besides the saved tensors while the output linear's forward runs: the MLP's input, the
        linear's input (and its compute-dtype copy) and output (``held``: inputs counted elsewhere)."""
        c, shape, bs = self.c, self.shape, self.bs
        live = 0
        if mlp_in_alive and not self.last.saved(shape.in_key) and shape.in_key not in held:
            live += bs * self.d.h * c.e_h
        if not shape.act_saves_output and shape.last_key not in held:
            live += bs * self.inter * self.e_m
        if self.cdt != self.e_m:
            live += bs * self.inter * self.cdt
        return live + bs * self.d.h * self.cdt

    def attention_backward(self) -> tuple[int, int]:
        """Eager attention's backward through the last block: (bytes the block saved after the attention
        core, with the value tensor the probs @ v product kept, all freed by then; the gradients then
        alive: the softmax's incoming and input gradients, b x heads x s x s, fp32 around the fp32
        softmax, and the value gradient)."""
        c, d, rec = self.c, self.d, self.rec
        names = list(rec)
        core_end = max(i for i, k in enumerate(names) if k.startswith("attn.")) + 1
        after_core = sum(rec[k] for k in names[core_end:])
        v_saved = sum(v for k, v in rec.items() if k.startswith(("attn.eager.v", "attn.math.v")))
        e_sm = c.e_a if c.f == "gpt2" else FP32  # gpt2 takes the softmax in the scores' dtype
        grads = self.bs * d.q_dim * c.e_a + 2 * d.b * d.nh * d.s * d.s * e_sm
        return after_core + v_saved, grads

    # -- moments --------------------------------------------------------------------------------------

    def checkpoint_held(self) -> int:
        """Under checkpointing, alive from forward to the end of backward besides the saved tensors: the
        rotary tables and the attention mask (arguments every block's checkpoint holds), the CPU RNG
        states, and the token embedding's output when it is a leaf apart from the first block's input."""
        c, d = self.c, self.d
        if not self.setup.grad_ckpt:
            return 0
        rope = 2 * d.s * (d.rot or d.hd) * c.e_h if c.f in ROPE else 0
        rng = CPU_RNG_STATE_BYTES * d.L if self.device == "cpu" else 0
        held = rope + self.mask + rng
        if c.input_grads and not (self.shape.embedding_is_input and c.p_embd == 0):
            held += self.bs * d.h * c.e_np  # the token embedding's output, a leaf that requires grad
        return held

    def backward_start(self) -> Moment:
        """Every saved tensor, the loss's log-softmax, and the two fp32 b x s x vocab gradients of
        nll_loss and log_softmax (plus logits the loop still holds)."""
        lsm = self.nl.get("loss.log_softmax_fp32", 0)
        if self.setup.chunked_loss:  # the last chunk recomputes its log-softmax; the hidden state's gradient
            return {
                "activations": self.blocks + sum(self.nl.values()) + self.checkpoint_held() + self.chunk_grad,
                "logits_loss": loss_rows(self.setup) * self.d.V * FP32 + logits_grad_bytes(self.arch, self.setup),
                "transient": 0,
            }
        return {
            "activations": self.blocks + sum(self.nl.values()) - lsm + self.checkpoint_held(),
            "logits_loss": lsm + logits_grad_bytes(self.arch, self.setup),
            "transient": 0,
        }

    def without_checkpointing(self) -> dict[str, Moment]:
        c, shape, bs = self.c, self.shape, self.bs
        moments: dict[str, Moment] = {}
        base = self.blocks + self.pre - self.tail + self.grad_out
        # LLM.int8's ctx keeps the output linear's input after its LoRA branch, which saved it, is done
        held = 0
        if self.lora_last and not shape.act_saves_output and shape.last_key in self.kept:
            held = bs * self.inter * self.e_m if self.last.saved(shape.last_key) else 0
        moments["backward, last block's output linear"] = {
            "activations": base + held + self.drop_grad + self.linear,
            "transient": self.transient,
        }
        moments["backward, last block's MLP"] = {"activations": base + held + self.elementwise}
        if self.lora_last:  # its LoRA branch runs first: lora_A's input gradient while the branch's tensors live
            moments["backward, output linear's LoRA branch"] = {
                "activations": base + self.lora_a_live + self.drop_grad + bs * self.inter * FP32
            }
        if c.o.attn == "eager":
            freed, grads = self.attention_backward()
            # (LLM.int8's ctx keeps the MLP's inputs the freed tensors were)
            q = self.last.quant_inputs
            held = sum(q[k][0] for k in (shape.in_key, shape.last_key) if k in self.kept and self.last.saved(k))
            moments["backward, last block's attention"] = {
                "activations": self.blocks + self.pre - freed + held + self.grad_out + grads
            }
        if c.quant:  # forward through the last block's output linear: every block's tensors saved
            emb = 0 if c.input_grads else shape.embeddings * bs * self.d.h * c.e_np
            live = emb + self.mask + self.around_last_matmul(shape.input_alive, self.kept)
            moments["forward, last matmul"] = {
                "activations": self.blocks - self.tail + self.pre + live,
                "transient": self.transient,
            }
        if self.dora_norm:  # the same moment for the DoRA row norm the linear's branch computes next
            emb = 0 if c.input_grads else shape.embeddings * bs * self.d.h * c.e_np
            live = emb + self.mask + self.around_last_matmul(shape.input_alive, self.kept)
            moments["forward, last DoRA norm"] = {
                "activations": self.blocks - self.tail + self.pre + live,
                "transient": self.dora_norm,
            }
        return moments

    def with_checkpointing(self) -> dict[str, Moment]:
        """Every block's input (and LLM.int8's ctx inputs), the rotary tables, the mask and the RNG states
        stay; backward recomputes the last block. The recomputation starts at the first backward node that
        unpacks a saved tensor: a 16-bit output linear (it saves its weight) or anything the block saves
        after it (a dropout mask, the linear's LoRA branch); a quantized output linear keeps nothing it
        must unpack, so otherwise its backward runs first and the recomputation stops at the MLP's first
        linears. The recomputed block's own LLM.int8 ctx inputs live as long as the recomputation."""
        c, d, shape, bs = self.c, self.d, self.shape, self.bs
        moments: dict[str, Moment] = {}
        rng = CPU_RNG_STATE_BYTES if self.device == "cpu" else 0  # one more while recomputing
        common = self.blocks + self.pre + self.checkpoint_held() + self.grad_out + self.copied_back
        # the recomputed block; its first norm saves the block's input itself (the checkpointed tensor)
        dup = bs * d.h * c.e_h if c.f in LN_FINAL or c.e_h == FP32 else 0
        recomputed = sum(self.rec.values()) - dup - self.tail
        moments["backward, last block's MLP"] = {"activations": common + recomputed + self.elementwise}
        if self.lora_last:  # as without checkpointing, once the recomputation is done
            moments["backward, output linear's LoRA branch"] = {
                "activations": common + recomputed + self.lora_a_live + self.drop_grad + bs * self.inter * FP32
            }
        if c.o.attn == "eager":
            freed, grads = self.attention_backward()
            moments["backward, last block's attention"] = {
                "activations": common + recomputed + self.tail - freed + grads
            }
        rec_kept = 0
        if self.int8:
            q = self.last.quant_inputs
            mlp_keys = (shape.in_key, shape.last_key)
            rec_kept = sum(nb for k, (nb, _) in q.items() if not self.last.saved(k) and k not in mlp_keys)
            if not shape.input_alive and not self.last.saved(shape.in_key):  # held by the MLP's first linears
                rec_kept += q[shape.in_key][0]
        if self.tail or not c.quant:
            # it runs through the output linear (the transient) to the tensors saved after it; as it stops,
            # the output linear's input and output are still referenced, and so are the output gradient (the
            # dropout's backward waits for it) and, with a LoRA branch, its scaled copy
            during = common + recomputed + rng + rec_kept + self.around_last_matmul(shape.input_alive, set())
            leftovers = bs * d.h * c.lin_out(self.e_m)
            if shape.input_alive and not self.last.saved(shape.in_key):
                leftovers += bs * d.h * c.e_h
            if not shape.act_saves_output and not self.last.saved(shape.last_key):
                leftovers += bs * self.inter * self.e_m
            if self.lora_last:
                leftovers += bs * d.h * (2 if c.ac else FP32)
                if (c.ac or c.o.lora_fa) and c.p > 0:  # its dropout's output, of which lora_A saved a 16-bit
                    leftovers += bs * self.inter * FP32  # copy (autocast) or nothing (LoRA-FA)
            moments["backward, recomputed the last block"] = {
                "activations": common + recomputed + self.tail + rng + rec_kept + leftovers
            }
            linear = common + recomputed + self.drop_grad + self.linear
        else:
            mlp_in = bs * d.h * c.e_h
            if self.last.saved(shape.in_key) or (self.int8 and not shape.input_alive):
                mlp_in = 0
            during = common + recomputed + rng + rec_kept + mlp_in + bs * self.inter * self.e_m
            linear = common + self.drop_grad + self.linear
        moments["backward, last block's output linear"] = {"activations": linear, "transient": self.transient}
        moments["backward, recomputing the last block"] = {"activations": during, "transient": self.transient}
        if self.dora_norm:
            moments["backward, recomputing the last DoRA norm"] = {"activations": during, "transient": self.dora_norm}
        return moments


def peak_moments(arch: ArchSpec, setup: TrainSetup, device: str = "cuda") -> dict[str, Moment]:
    """The moments of a step where the peak can sit, each as named terms (``activations``,
    ``logits_loss``, ``transient``) that add up to the bytes alive then, LoRA gradients, parameters and
    optimizer state aside:

    - ``backward start``: every saved tensor, the loss's log-softmax and the two fp32 b x s x vocab
      gradients (the peak of every real-size setting the catalog holds);
    - ``forward, last matmul`` (quantized base, no checkpointing): the last block's output linear
      dequantizes its weight when every block has saved its tensors;
    - ``backward, last block's output linear`` / ``MLP`` / ``attention`` (eager) / ``LoRA branch``: the
      head and the loss are freed, the blocks' tensors are still saved, and the last block's backward
      makes its gradients (and, quantized, dequantizes the output linear's weight);
    - with checkpointing, the last block's recomputation (``recomputing`` / ``recomputed the last block``)
      on top of every block's input.
    """
    step = _Step(arch, setup, device)
    moments = {"backward start": step.backward_start()}
    moments.update(step.with_checkpointing() if setup.grad_ckpt else step.without_checkpointing())
    return moments


def peak_moment(arch: ArchSpec, setup: TrainSetup, device: str = "cuda") -> str:
    """The name of the moment where the step peaks (the first of :func:`peak_moments` on a tie)."""
    moments = peak_moments(arch, setup, device)
    return max(moments, key=lambda k: sum(moments[k].values()))


def activation_peak_terms(arch: ArchSpec, setup: TrainSetup, device: str = "cuda") -> dict[str, int]:
    """The dynamic part of the peak as named terms that add up to it: the largest of
    :func:`peak_moments`."""
    top = peak_moments(arch, setup, device)[peak_moment(arch, setup, device)]
    return {k: top.get(k, 0) for k in ("activations", "logits_loss", "transient")}
