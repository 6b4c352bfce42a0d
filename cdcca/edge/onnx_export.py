"""Export the student to ONNX with its trainable set as overridable initializers (ORT multi-LoRA ready).

Three graphs, cut where the robot's loop cuts the model (the directory's format, and what the robot needs to read
it without torch, live in :mod:`cdcca.edge.onnx_model`):

* ``encoder.onnx``: pixel values (B, 3, S, S) -> visual tokens (B, N, Dv) and the LM soft prompt (B, Q, D):
  the frozen vision encoder, the Q-Former and the language projection.
  It also emits ``uts_front`` (B, N, Dv), the encoder's hidden state before its last ``mc_layers`` layers.
* ``uts.onnx``: UTS stage 2 (:mod:`cdcca.edge.onnx_uts`): the last ``mc_layers`` encoder layers run M times
  as one batch with a given attention-dropout keep mask, -> (B, N) variance of each output token across the
  passes (Eq. 3) and (B, N) spread of the passes around the dropout-free output (``center``: the encoder's
  ``visual_tokens``), each averaged over channels, as ``cdcca.uts.UncertaintyTokenSampler.token_variance``
  computes them (``UTSConfig.mc_center``).
  The mask is an input (ONNX's random ops take their seed as an attribute, not an input), so a run is
  deterministic for the mask a seeded generator drew; the frozen encoder has no trainable tensors, so this
  graph takes no adapter. Its linear layers run in int8 by default (``uts_precision``, :func:`int8_matmuls`):
  stage 2 is M passes of the layer's MLP, compute-bound at float32's peak on a robot's CPU.
* ``decoder.onnx``: one greedy step of the OPT language model with a KV cache: a prefix of embeddings (the
  soft prompt at the first step, empty afterwards), new token ids, the attention mask and the past keys and
  values -> the last position's logits and the present keys and values. The first call (past length 0)
  is the prefill, every later call feeds one token, so generation never recomputes the prefix.

Every tensor of the trainable set (:func:`cdcca.models.trainable.trainable_parameters`: LoRA on the LM's
q/v, Q-Former query tokens, norms, linear biases) is a graph input *and* an initializer of the same name
holding θ_base. ONNX Runtime treats such an initializer as an overridable default, and its LoRA adapter
mechanism (``onnxruntime.AdapterFormat`` writes ``.onnx_adapter`` files, ``onnxruntime.LoraAdapter`` maps
one, ``RunOptions.add_active_adapter`` feeds it to a run) overrides them per run without rebuilding the
session -- see ONNX Runtime's "Multi LoRA" docs (onnxruntime.ai/docs/genai/tutorials/finetune.html) and
the ``RunOptionsAddActiveLoraAdapter`` C API reference. The adapter mechanism is generic: its parameters are
named graph inputs, so query tokens, norms and biases travel through it exactly like LoRA A/B matrices.
ONNX Runtime rejects adapter parameters a graph does not have, so each graph gets its own adapter file.

The tensors are fed as inputs rather than found in the traced module: during tracing they stand in for the
student's parameters, so no exporter pass can fold, transpose or rename them. The graph names are the
trainable-set names, i.e. the names in a DWC delta. The exporter is ``torch.onnx.export(dynamo=False)``
(the dynamo exporter needs ``onnxscript``, which the project does not install); the OPT step is written
against the model's own submodules because the tracer cannot follow ``transformers``' cache objects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import save_file
from torch import nn

from cdcca.edge.onnx_model import (  # noqa: F401  (re-exported: the export's on-disk format lives there)
    BASE_FILE,
    DECODER_FILE,
    ENCODER_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    UTS_FILE,
    UTS_PRECISIONS,
    OnnxExport,
    OnnxModelMismatch,
    read_adapter,
    write_adapters,
)
from cdcca.models.mllm import MLLM
from cdcca.models.trainable import has_lora, trainable_parameters

EXTERNAL_DATA_ABOVE = 1 << 30  # initializer bytes past which a graph keeps its tensors in <file>.data (limit: 2 GiB)
OPSET = 17


# --------------------------------------------------------------------------------------------- graphs
class _EncoderForward(nn.Module):
    """pixel values -> (visual tokens, soft prompt, UTS front): the frozen encoder, the Q-Former, the projection.

    The encoder runs layer by layer as ``Blip2VisionModel.forward`` does (embeddings, layers, post-layernorm),
    so that the hidden state before the last ``mc_layers`` layers can be an output as well.
    """

    def __init__(self, student: MLLM, mc_layers: int) -> None:
        super().__init__()
        self.student, self.mc_layers = student, mc_layers

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vision = self.student.blip2.vision_model
        layers = vision.encoder.layers
        hidden = vision.embeddings(pixel_values)  # (B, N, Dv)
        for layer in layers[: len(layers) - self.mc_layers]:
            hidden = layer(hidden)
        front = hidden
        for layer in layers[len(layers) - self.mc_layers :]:
            hidden = layer(hidden)
        visual_tokens = vision.post_layernorm(hidden)  # (B, N, Dv)
        return visual_tokens, self.student.encode_visual(visual_tokens=visual_tokens), front  # soft prompt (B, Q, D)


def int8_weight(weight: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric per-tensor int8 of a float32 weight: ``(q, scale)``, ``weight ≈ q * scale``, q in [-127, 127]."""
    weight = np.asarray(weight, np.float32)
    peak = np.float32(np.abs(weight).max())
    scale = peak / np.float32(127) if peak > 0 else np.float32(1)
    return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8), np.float32(scale)


def int8_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` as ``uts.onnx``'s int8 graph computes it, for (B, ..., K) ``x`` run one sample per run.

    ONNX Runtime's ``DynamicQuantizeMatMul`` (com.microsoft contrib op): the input is quantized to uint8 with the
    scale and zero point of ``DynamicQuantizeLinear`` (its range widened to hold 0, round half to even), the
    weight is :func:`int8_weight`, the product accumulates in integers and is scaled back by the two scales'
    product; the bias is added after. The integer products are summed exactly here (float64), so the emulation
    agrees with the kernel to float32 rounding. The range is each sample's own (the robot runs one sample per
    run, so a sample's scores do not depend on the others in its batch)."""
    q, weight_scale = int8_weight(linear.weight.detach().cpu().numpy())
    flat = x.reshape(x.shape[0], -1)
    low, high = flat.amin(dim=1).clamp(max=0.0), flat.amax(dim=1).clamp(min=0.0)
    scale = torch.where(high > low, (high - low) / 255.0, torch.ones_like(high))
    zero = torch.round((-low / scale).clamp(0.0, 255.0))
    view = (-1,) + (1,) * (x.dim() - 1)
    scale, zero = scale.view(view), zero.view(view)
    centred = (torch.round(x / scale) + zero).clamp(0.0, 255.0) - zero  # uint8 minus its zero point
    acc = (centred.double() @ torch.from_numpy(q.T.astype(np.float64))).float()
    out = acc * (scale * torch.tensor(weight_scale))
    return out + linear.bias if linear.bias is not None else out


def int8_matmuls(model: onnx.ModelProto) -> int:
    """Run every MatMul of ``model`` by a constant 2-D weight in int8, in place; returns how many.

    Each becomes ONNX Runtime's ``DynamicQuantizeMatMul`` (com.microsoft contrib op, ``DynamicQuantizeLinear``
    on the input then an integer GEMM; onnxruntime.ai/docs/performance/model-optimizations/quantization.html,
    dynamic quantization) with the weight as :func:`int8_weight`. MatMuls between activations (attention) stay
    float32. What ONNX Runtime's ``quantize_dynamic`` would write, by this module's own rule, so
    :func:`int8_linear` can compute the same numbers in torch."""
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, replaced = [], set()
    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        q, scale = int8_weight(onnx.numpy_helper.to_array(weight))
        base = weight.name.replace(":", "_")
        names = [base + "_int8", base + "_scale", base + "_zero"]
        model.graph.initializer.extend([onnx.numpy_helper.from_array(q, names[0]),
                                        onnx.numpy_helper.from_array(np.asarray(scale, np.float32), names[1]),
                                        onnx.numpy_helper.from_array(np.zeros((), np.int8), names[2])])  # fmt: skip
        nodes.append(onnx.helper.make_node("DynamicQuantizeMatMul", [node.input[0], *names], list(node.output),
                                           name=node.name + "_int8", domain="com.microsoft"))  # fmt: skip
        replaced.add(weight.name)
    still_read = {name for node in nodes for name in node.input}
    kept = [t for t in model.graph.initializer if t.name not in replaced or t.name in still_read]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


class MCDropoutTail(nn.Module):
    """UTS stage 2: (B, N, Dv) front, (L, B, M, H, N, N) dropout keep mask and (B, N, Dv) dropout-free output ->
    (B, N) token variance over the passes (Eq. 3) and (B, N) token spread around the dropout-free output, each
    averaged over channels (``UTSConfig.mc_center`` picks which one the robot reads).

    The last L encoder layers written against their own submodules with the eager attention of
    ``transformers``' BLIP-2 (softmax(q·kᵀ·scale), dropout, ·v), the dropout being a product with the given
    mask (kept entries hold 1/(1-p), dropped ones 0: what ``torch.nn.functional.dropout`` multiplies by). The
    M passes are one batch; what precedes the first dropout (layer norm, q/k/v, attention probabilities) is the
    same in every pass, so it runs once per sample and is broadcast over the passes.

    In torch, fed the mask a seed draws (:func:`cdcca.edge.onnx_uts.dropout_keep_mask`), it gives the variances
    ``uts.onnx`` gives: what lets the torch and the ORT robot pick the same tokens for the same seed.
    ``precision="int8"`` computes what the int8 graph computes (:func:`int8_linear`, one sample per run); the
    export traces the float32 module and rewrites its MatMuls (:func:`int8_matmuls`).
    """

    def __init__(self, student: MLLM, mc_layers: int, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in UTS_PRECISIONS:
            raise ValueError(f"precision must be one of {UTS_PRECISIONS}, got {precision!r}")
        vision = student.blip2.vision_model
        self.layers = vision.encoder.layers[len(vision.encoder.layers) - mc_layers :]
        self.post_layernorm = vision.post_layernorm
        self.precision = precision

    def _linear(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(linear, x) if self.precision == "int8" else linear(x)

    def _probs_and_values(self, layer: nn.Module, hidden: torch.Tensor,
                          batch: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(S, N, Dv) -> attention probabilities (S, H, N, N) and values (S, H, N, hd) before dropout (S = batch
        samples times the passes, if any)."""
        attn = layer.self_attn
        normed = layer.layer_norm1(hidden)
        if self.precision == "int8":  # a sample's passes are one run's input: regrouped by sample for its range
            qkv = int8_linear(attn.qkv, normed.reshape(batch, -1, normed.shape[-1])).reshape(*normed.shape[:2], -1)
        else:
            qkv = attn.qkv(normed)
        qkv = qkv.reshape(hidden.shape[0], hidden.shape[1], 3, attn.num_heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (S, H, N, hd)
        return torch.softmax(torch.matmul(query, key.transpose(-1, -2)) * attn.scale, dim=-1), value

    def forward(self, front: torch.Tensor, dropout_keep: torch.Tensor,
                center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        batch, tokens, width = front.shape
        passes = dropout_keep.shape[2]
        hidden = front.unsqueeze(1)  # (B, 1, N, Dv): broadcast over the passes until the first dropout
        for index, layer in enumerate(self.layers):
            if index == 0:
                probs, value = self._probs_and_values(layer, front, batch)  # (B, H, N, N), (B, H, N, hd)
                probs, value = probs.unsqueeze(1), value.unsqueeze(1)  # (B, 1, H, N, ·)
            else:
                probs, value = self._probs_and_values(layer, hidden.reshape(-1, tokens, width), batch)
                heads = probs.shape[1]
                probs = probs.reshape(batch, passes, heads, tokens, tokens)
                value = value.reshape(batch, passes, heads, tokens, -1)
            context = torch.matmul(probs * dropout_keep[index], value)  # (B, M, H, N, hd)
            context = context.transpose(2, 3).reshape(batch, passes, tokens, width)
            hidden = self._linear(layer.self_attn.projection, context) + hidden  # (B, M, N, Dv)
            mlp = layer.mlp
            hidden = hidden + self._linear(mlp.fc2, mlp.activation_fn(self._linear(mlp.fc1, layer.layer_norm2(hidden))))
        outputs = self.post_layernorm(hidden)  # (B, M, N, Dv)
        return outputs.var(dim=1).mean(dim=-1), (outputs - center.unsqueeze(1)).square().mean(dim=(1, 3))


class _DecoderStep(nn.Module):
    """One KV-cached step of OPT written against the model's own submodules (same weights, same order of
    operations as ``transformers``' eager OPT), with the cache as plain tensors so it traces to ONNX."""

    def __init__(self, student: MLLM) -> None:
        super().__init__()
        self.student = student

    def forward(self, prefix_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor):  # fmt: skip
        lm = self.student.lm
        decoder = lm.model.decoder
        embeds = torch.cat([prefix_embeds, decoder.embed_tokens(input_ids)], dim=1)  # (B, T, D)
        batch, steps = embeds.shape[0], embeds.shape[1]
        past_len = past[0].shape[2]
        positions = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1)[:, past_len:]  # (B, T)
        hidden = embeds + decoder.embed_positions(attention_mask, past_len, position_ids=positions)
        total = attention_mask.shape[1]
        causal = torch.arange(total)[None, :] <= (torch.arange(steps) + past_len)[:, None]  # (T, P + T)
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, P + T)
        additive = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        present = []
        for index, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            residual = hidden
            hidden = layer.self_attn_layer_norm(hidden)
            heads, head_dim = attn.num_heads, attn.head_dim
            query = (attn.q_proj(hidden) * attn.scaling).view(batch, steps, heads, head_dim).transpose(1, 2)
            key = attn.k_proj(hidden).view(batch, steps, heads, head_dim).transpose(1, 2)
            value = attn.v_proj(hidden).view(batch, steps, heads, head_dim).transpose(1, 2)
            key = torch.cat([past[2 * index], key], dim=2)  # (B, H, P + T, hd)
            value = torch.cat([past[2 * index + 1], value], dim=2)
            present += [key, value]
            weights = torch.softmax(torch.matmul(query, key.transpose(-1, -2)) + additive, dim=-1)
            context = torch.matmul(weights, value).transpose(1, 2).reshape(batch, steps, heads * head_dim)
            hidden = residual + attn.out_proj(context)
            residual = hidden
            hidden = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
            hidden = residual + hidden
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return (lm.lm_head(hidden[:, -1]), *present)  # (B, V), then (B, H, P + T, hd) per layer and K/V


class _WithParams(nn.Module):
    """Calls ``inner`` with the named trainable tensors taken from trailing arguments (graph inputs).

    The tensors stand in for the parameters during the call (``torch.func.functional_call`` does the same but
    refuses to run under the tracing exporter), so the traced graph reads them from its inputs.
    """

    def __init__(self, inner: nn.Module, names: list[str], num_inputs: int) -> None:
        super().__init__()
        self.inner, self.names, self.num_inputs = inner, names, num_inputs

    def forward(self, *args: torch.Tensor):
        saved = []
        for name, value in zip(self.names, args[self.num_inputs :]):
            owner_name, _, attr = f"student.blip2.{name}".rpartition(".")
            owner = self.inner.get_submodule(owner_name)
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = value
        try:
            return self.inner(*args[: self.num_inputs])
        finally:
            for owner, attr, param in saved:
                owner._parameters[attr] = param


def _student_id(student: MLLM, trainable: set[str]) -> str:
    """SHA-256 over the frozen weights: two exports share it only if they share every frozen tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(student.blip2.state_dict().items()):
        if name not in trainable:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _export_graph(module: nn.Module, inputs: tuple, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict, params: dict[str, torch.Tensor], path: Path,
                  external_data: bool | None = None, rewrite=None) -> list[str]:  # fmt: skip
    """Trace ``module`` to ``path`` and turn the trainable inputs into overridable initializers; ``rewrite``: a
    function that changes the traced ``onnx.ModelProto`` in place before it is saved (:func:`int8_matmuls`).

    A protobuf message cannot exceed 2 GiB, so a larger graph keeps its tensors in ``<file>.data`` beside it
    (ONNX external data: onnx.ai/onnx/repo-docs/ExternalData.html; ONNX Runtime finds the file next to the
    graph). ``external_data`` ``None`` decides by size, ``True``/``False`` force it.
    """
    names = list(params)
    wrapped = _WithParams(module, names, len(inputs)).eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # the tracer may spill tensors to files
        traced = Path(scratch) / path.name
        with warnings.catch_warnings():  # the tracer flags every shape test in transformers; parity tests decide
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (*inputs, *(p.detach() for p in params.values())), str(traced), dynamo=False,
                              input_names=input_names + names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True)  # fmt: skip
        model = onnx.load(str(traced))  # with any external tensors, into memory
    graph_inputs = {i.name for i in model.graph.input}
    used = [name for name in names if name in graph_inputs]  # the exporter drops inputs the graph never reads
    for name in used:
        model.graph.initializer.append(onnx.numpy_helper.from_array(params[name].detach().numpy(), name))
    if rewrite is not None:
        rewrite(model)
    if external_data is None:
        external_data = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_ABOVE
    data_file = path.with_name(path.name + ".data")
    data_file.unlink(missing_ok=True)
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_file.name, size_threshold=1024)  # fmt: skip
    else:
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # by path: works past 2 GiB and checks the external file too
    return used


def _dummy_pixels(student: MLLM, batch: int) -> torch.Tensor:
    size = student.image_spec.size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def export_onnx(student: MLLM, out_dir: str | Path, external_data: bool | None = None,
                mc_layers: int = 1, uts_precision: str = UTS_PRECISIONS[0]) -> OnnxExport:  # fmt: skip
    """Export ``student`` (LoRA injected) to ``out_dir``; returns the opened export.

    The trainable set's current values become θ_base of the export (version 0 of every adapter built for it).
    ``external_data``: keep each graph's tensors in ``<graph>.onnx.data`` (``None``: when they pass 1 GiB, as a
    graph must stay under protobuf's 2 GiB). ``mc_layers``: the final encoder layers UTS stage 2 runs
    stochastically (``UTSConfig.mc_layers``; the robot's setting must match the export's). ``uts_precision``:
    ``int8`` (default) runs ``uts.onnx``'s linear layers in int8 (:func:`int8_matmuls`; about half of stage 2's
    time on one x86 core, kept tokens as close to a 128-pass float32 estimate as float32's own, ``bench/edge.md``),
    ``fp32`` keeps them in float32.
    """
    layers = len(student.blip2.vision_model.encoder.layers)
    if uts_precision not in UTS_PRECISIONS:
        raise ValueError(f"uts_precision must be one of {UTS_PRECISIONS}, got {uts_precision!r}")
    if not 1 <= mc_layers <= layers:
        raise ValueError(f"mc_layers must be in 1..{layers} (the vision encoder's layers), got {mc_layers}")
    if not has_lora(student):
        raise ValueError("the student needs its LoRA adapters before export (cdcca.models.add_lora), so the "
                         "exported graphs take them as adapter inputs")  # fmt: skip
    text = student.blip2.config.text_config
    if not text.do_layer_norm_before:
        raise ValueError("ONNX export supports OPT with layer norm before attention (every OPT except 350m)")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    student.eval()
    trainable = {name: p.detach().clone() for name, p in trainable_parameters(student).items()}
    lm_names = [n for n in trainable if n.startswith("language_model.")]
    encoder_names = [n for n in trainable if n not in lm_names]
    batch, dim = 2, text.hidden_size
    heads, head_dim = text.num_attention_heads, text.hidden_size // text.num_attention_heads
    pixels = _dummy_pixels(student, batch)
    encoder_used = _export_graph(
        _EncoderForward(student, mc_layers), (pixels,), ["pixel_values"], ["visual_tokens", "soft_prompt", "uts_front"],
        {"pixel_values": {0: "batch"}, "visual_tokens": {0: "batch"}, "soft_prompt": {0: "batch"},
         "uts_front": {0: "batch"}},
        {n: trainable[n] for n in encoder_names}, out / ENCODER_FILE, external_data,
    )  # fmt: skip
    front = _EncoderForward(student, mc_layers)(pixels)[2]  # (B, N, Dv)
    vision = student.blip2.vision_model.config
    passes = 3  # traced with 3 passes; the graph takes any M
    keep = torch.ones(mc_layers, batch, passes, vision.num_attention_heads, front.shape[1], front.shape[1])
    _export_graph(MCDropoutTail(student, mc_layers), (front, keep, torch.randn_like(front)),
                  ["uts_front", "dropout_keep", "center"], ["token_variance", "token_spread"],
                  {"uts_front": {0: "batch"}, "dropout_keep": {1: "batch", 2: "passes"}, "center": {0: "batch"},
                   "token_variance": {0: "batch"}, "token_spread": {0: "batch"}}, {}, out / UTS_FILE,
                  external_data, int8_matmuls if uts_precision == "int8" else None)  # fmt: skip
    past_names = [f"past_{kind}_{i}" for i in range(text.num_hidden_layers) for kind in ("key", "value")]
    present_names = [name.replace("past_", "present_") for name in past_names]
    prefix, tokens, past_len = student.num_query_tokens, 3, 2
    step_inputs = (torch.randn(batch, prefix, dim), torch.ones(batch, tokens, dtype=torch.long),
                   torch.ones(batch, past_len + prefix + tokens, dtype=torch.long),
                   *(torch.randn(batch, heads, past_len, head_dim) for _ in past_names))  # fmt: skip
    axes = {"prefix_embeds": {0: "batch", 1: "prefix"}, "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch"},
            **{n: {0: "batch", 2: "past"} for n in past_names},
            **{n: {0: "batch", 2: "total"} for n in present_names}}  # fmt: skip
    decoder_used = _export_graph(
        _DecoderStep(student), step_inputs, ["prefix_embeds", "input_ids", "attention_mask", *past_names],
        ["logits", *present_names], axes, {n: trainable[n] for n in lm_names}, out / DECODER_FILE, external_data,
    )  # fmt: skip
    unused = sorted(set(trainable) - set(encoder_used) - set(decoder_used))
    if unused:
        raise ValueError(f"the exported graphs do not read trainable tensors {unused[:3]}: the student's forward "
                         "differs from what export_onnx traces")  # fmt: skip
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(out / BASE_FILE))
    student.tokenizer.save_pretrained(out)
    spec = student.image_spec
    student_id = _student_id(student, set(trainable))
    manifest = {
        "format_version": FORMAT_VERSION, "student_id": student_id,
        "adapter_model_version": int(student_id[:7], 16),  # AdapterFormat's model_version: the export an adapter is for
        "meta": student.meta, "image_spec": {"size": spec.size, "mean": list(spec.mean), "std": list(spec.std)},
        "trainable": list(trainable), "shapes": {n: list(t.shape) for n, t in trainable.items()},
        "graphs": {"encoder": {"file": ENCODER_FILE, "params": encoder_used},
                   "decoder": {"file": DECODER_FILE, "params": decoder_used, "past": past_names,
                               "present": present_names}},
        "uts": {"file": UTS_FILE, "mc_layers": mc_layers, "front_output": "uts_front", "tokens": front.shape[1],
                "width": front.shape[2], "heads": vision.num_attention_heads, "precision": uts_precision},
        "lm": {"layers": text.num_hidden_layers, "heads": heads, "head_dim": head_dim, "hidden": dim,
               "num_query_tokens": student.num_query_tokens, "eos_token_id": student.tokenizer.eos_token_id,
               "pad_token_id": student.tokenizer.pad_token_id},
    }  # fmt: skip
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks a complete export
    return OnnxExport(out, manifest)


# ------------------------------------------------------------------------------------------------ CLI
def cli_export(args) -> dict:
    """``cdcca export --backend onnx``: export the student of a preset's checkpoints (LoRA added, seeded).

    ``args`` has ``preset``, ``checkpoints`` (None: the preset's checkpoint directory), ``out`` (None:
    ``<checkpoints>/student_onnx``), ``json`` and optionally ``mc_layers`` (default 1, ``UTSConfig``'s: the encoder
    layers UTS stage 2 runs stochastically; the robot's setting must match) and ``uts_precision`` (default int8).
    """
    from cdcca.models.checkpoint import load_mllm
    from cdcca.models.trainable import add_lora
    from cdcca.paths import checkpoint_dir

    checkpoints = Path(args.checkpoints) if args.checkpoints else checkpoint_dir(args.preset)
    out = Path(args.out) if args.out else checkpoints / "student_onnx"
    student = add_lora(load_mllm(checkpoints / "student"))
    if out.exists() and (out / MANIFEST_FILE).is_file():
        shutil.rmtree(out)  # a previous export of this directory; rewritten whole
    export = export_onnx(student, out, mc_layers=getattr(args, "mc_layers", None) or 1,
                         uts_precision=getattr(args, "uts_precision", None) or UTS_PRECISIONS[0])
    from cdcca.report import format_table

    graphs = {**export.manifest["graphs"], "uts": {**export.manifest["uts"], "params": []}}
    sizes = {name: sum(p.stat().st_size for p in out.glob(info["file"] + "*"))  # with <file>.data, if any
             for name, info in graphs.items()}  # fmt: skip
    rows = [{"graph": info["file"], "bytes": sizes[name], "adapter_tensors": len(info["params"])}
            for name, info in graphs.items()]  # fmt: skip
    print(format_table(rows, ["graph", "bytes", "adapter_tensors"], title=f"ONNX export -> {out}"))
    return {"out": str(out), "student_id": export.manifest["student_id"], "graph_bytes": sizes,
            "trainable_tensors": len(export.manifest["trainable"]),
            "trainable_params": int(sum(np.prod(s) for s in export.manifest["shapes"].values()))}  # fmt: skip
