"""``MLLM``: a BLIP-2 model plus its tokenizer and image preprocessing, with the entry points CD-CCA needs.

The module wraps ``transformers.Blip2ForConditionalGeneration`` (Li et al., "BLIP-2", ICML 2023) and exposes
its three stages separately, because the cloud-device loop cuts the model between them:

1. ``visual_tokens``: the frozen, shared ViT encoder (computed on the robot; what UTS uploads).
2. ``query_outputs``: the Q-Former's learnable queries cross-attending to the visual tokens -- optionally
   only to a subset of them (``token_mask``), which is how the cloud sees just the uploaded tokens.
3. ``lm_forward`` / ``generate``: the OPT language model on ``[projected queries | <s> prompt | answer]``.

The layout matches BLIP-2's own (query embeddings, then ``<s>`` and the prompt); padding sits between the
queries and the text with attention mask 0, and OPT derives positions from the mask, so padded and
unpadded rows compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2ForConditionalGeneration, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ImageSpec:
    """How raw RGB frames become pixel values: resize to ``size`` and normalise per channel."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class LMOutput:
    """Result of a teacher-forced pass.

    Attributes:
        logits: (B, L, V) next-token logits over the whole sequence.
        hidden: (B, L, H) last hidden states of the LM.
        labels: (B, L) the token each position must predict (-100 where nothing is predicted).
        loss: mean cross-entropy over answer tokens, or ``None`` without answers.
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    labels: torch.Tensor
    loss: torch.Tensor | None

    @property
    def answer_positions(self) -> torch.Tensor:
        """(B, L-1) mask over ``logits[:, :-1]``: the positions whose next token is an answer token."""
        return self.labels[:, 1:] != -100


@dataclass
class Generation:
    """Greedy answers.

    Attributes:
        texts: decoded answers.
        token_ids: (B, T) generated ids, ``pad`` after each row's end-of-sequence.
        token_entropy: (B, T) entropy (nats) of the next-token distribution at each generated step.
        token_mask: (B, T) 1 for steps that belong to the answer (up to and including ``</s>``).
    """

    texts: list[str]
    token_ids: torch.Tensor
    token_entropy: torch.Tensor
    token_mask: torch.Tensor

    @property
    def sample_entropy(self) -> torch.Tensor:
        """(B,) mean token entropy of each answer (paper Eq. 2)."""
        return (self.token_entropy * self.token_mask).sum(1) / self.token_mask.sum(1).clamp_min(1)


class MLLM(nn.Module):
    """A BLIP-2 multimodal LLM with its tokenizer and image spec (one teacher or one student).

    Args:
        blip2: the ``transformers`` model (decoder-only LM; OPT for the presets and BLIP-2 OPT checkpoints).
        tokenizer: the tokenizer saved with the checkpoint.
        image_spec: preprocessing of raw frames.
        meta: free-form provenance saved with the checkpoint (role, preset, training steps...).
    """

    def __init__(
        self,
        blip2: Blip2ForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        image_spec: ImageSpec,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        if not blip2.config.use_decoder_only_language_model:
            raise ValueError(
                "only BLIP-2 checkpoints with a decoder-only LM (e.g. OPT) are supported; "
                f"this one uses {blip2.config.text_config.model_type}"
            )
        self.blip2 = blip2
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.blip2.query_tokens.device

    @property
    def num_query_tokens(self) -> int:
        return self.blip2.config.num_query_tokens

    @property
    def lm(self) -> nn.Module:
        return self.blip2.language_model

    # ----------------------------------------------------------------------------------------- stages
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 frames, each (H, W, 3) -> normalised pixel values (B, 3, S, S)."""
        batch = []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {tuple(image.shape)}"
                )
            if not image.flags.writeable:  # a frame decoded from a message or a bag: torch warns on a read-only one
                image = image.copy()  # (uint8, the same bytes: float() copies anyway)
            pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0  # (3, H, W)
            if pixels.shape[1:] != (self.image_spec.size, self.image_spec.size):
                pixels = F.interpolate(
                    pixels[None], size=(self.image_spec.size,) * 2, mode="bilinear", antialias=True, align_corners=False
                )[0]
            batch.append(pixels)
        pixels = torch.stack(batch).to(self.device)  # (B, 3, S, S)
        mean = torch.tensor(self.image_spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_spec.std, device=self.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, Dv): the shared frozen encoder's tokens (CLS first, then patches)."""
        return self.blip2.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state

    def query_outputs(self, visual_tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, Dv) visual tokens -> (B, Q, Dq) Q-Former query outputs; queries see only ``token_mask`` == 1."""
        if token_mask is None:
            token_mask = torch.ones(visual_tokens.shape[:2], dtype=torch.long, device=visual_tokens.device)
        queries = self.blip2.query_tokens.expand(visual_tokens.shape[0], -1, -1)  # (B, Q, Dq)
        return self.blip2.qformer(
            query_embeds=queries,
            encoder_hidden_states=visual_tokens,
            encoder_attention_mask=token_mask,
            return_dict=True,
        ).last_hidden_state

    def encode_visual(
        self,
        images: Sequence[np.ndarray] | None = None,
        visual_tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images or precomputed visual tokens -> (B, Q, D_lm) soft prompt for the language model."""
        if visual_tokens is None:
            if images is None:
                raise ValueError("pass either images or visual_tokens")
            visual_tokens = self.visual_tokens(self.preprocess(images))
        return self.blip2.language_projection(self.query_outputs(visual_tokens, token_mask))

    # ------------------------------------------------------------------------------------------- text
    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """``<s> prompt`` ids per prompt (the tokenizer adds ``<s>``)."""
        return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]

    def answer_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """``answer </s>`` ids per answer."""
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]

    def _text_batch(
        self, prompt_ids: list[list[int]], answer_ids: list[list[int]] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ``prompt + answer`` ids (B, T), their mask (B, T) and answer labels (B, T)."""
        rows = [p + (answer_ids[i] if answer_ids else []) for i, p in enumerate(prompt_ids)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
            if answer_ids:
                n = len(answer_ids[i])
                labels[i, width - n :] = torch.tensor(answer_ids[i])
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    def lm_forward(
        self, soft_prompt: torch.Tensor, prompts: Sequence[str], answers: Sequence[str] | None = None
    ) -> LMOutput:
        """Teacher-forced LM pass over ``[soft_prompt | <s> prompt | answer </s>]``; loss on answer tokens."""
        ids, text_mask, text_labels = self._text_batch(
            self.prompt_ids(prompts), self.answer_ids(answers) if answers is not None else None
        )
        batch, queries = soft_prompt.shape[:2]
        embeds = torch.cat([soft_prompt, self.lm.get_input_embeddings()(ids)], dim=1)  # (B, Q + T, D)
        ones = torch.ones((batch, queries), dtype=torch.long, device=self.device)
        mask = torch.cat([ones, text_mask], dim=1)
        labels = torch.cat([torch.full_like(ones, -100), text_labels], dim=1)  # (B, Q + T)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, return_dict=True)
        loss = None
        if answers is not None:
            loss = F.cross_entropy(
                out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return LMOutput(logits=out.logits, hidden=out.hidden_states[-1], labels=labels, loss=loss)

    def loss(self, images: Sequence[np.ndarray], prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Cross-entropy of ``answers`` given images and prompts (pretraining objective)."""
        return self.lm_forward(self.encode_visual(images), prompts, answers).loss

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[np.ndarray] | None = None,
        visual_tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        max_new_tokens: int = 12,
    ) -> Generation:
        """Greedy decoding with a KV cache; also returns each step's predictive entropy (for UTS)."""
        soft_prompt = self.encode_visual(images, visual_tokens, token_mask)  # (B, Q, D)
        ids, text_mask, _ = self._text_batch(self.prompt_ids(prompts), None)
        batch, queries = soft_prompt.shape[:2]
        embed = self.lm.get_input_embeddings()
        mask = torch.cat([torch.ones((batch, queries), dtype=torch.long, device=self.device), text_mask], dim=1)
        out = self.lm(inputs_embeds=torch.cat([soft_prompt, embed(ids)], 1), attention_mask=mask, use_cache=True)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        tokens, entropies, alive = [], [], []
        for _ in range(max_new_tokens):
            log_probs = out.logits[:, -1].float().log_softmax(-1)  # (B, V)
            entropies.append(-(log_probs.exp() * log_probs).sum(-1))
            alive.append(~done)
            next_token = log_probs.argmax(-1).masked_fill(done, pad)
            tokens.append(next_token)
            done = done | (next_token == eos)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long, device=self.device)], dim=1)
            out = self.lm(
                inputs_embeds=embed(next_token)[:, None],
                attention_mask=mask,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        token_ids = torch.stack(tokens, 1)  # (B, T)
        texts = [
            " ".join(self.tokenizer.decode(row[row != pad].tolist(), skip_special_tokens=True).split())
            for row in token_ids.cpu()
        ]
        return Generation(texts, token_ids, torch.stack(entropies, 1), torch.stack(alive, 1).float())
