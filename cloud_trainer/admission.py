"""What the cloud admits: every received ``UtsTokens`` is checked against the models before it is acknowledged.

A sample that is self-consistent but does not fit the models (another token grid or width, a prompt longer
than the language models' positions leave room for) would be stored, acknowledged, and then fail every round
it is batched into. So the bounds come from the models themselves (:class:`SampleLimits`), every size is
checked before anything is allocated (``unpack_tokens`` with the encoder's grid), and a rejection carries a
short ``reason`` the service counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdcca.akd import DistillSample
from cdcca.models.mllm import MLLM
from cdcca.uts import MAX_FRAME_PROMPTS, FramePrompt, UplinkError, frame_prompts

ANSWER_TOKENS = 16  # LM positions kept free for an answer: 12 generated tokens, </s>, re-tokenisation slack
CHARS_PER_TOKEN = 32  # a prompt longer than this many characters per allowed token is refused untokenised
MAX_SAMPLE_ID_CHARS = 256
HEADER_BYTES = 4096  # CDR header, frame id, robot id, fixed fields and alignment of one UtsTokens


@dataclass(frozen=True)
class SampleLimits:
    """Bounds of one ``UtsTokens`` sample, derived from the cloud's teacher and student.

    Args:
        num_tokens: tokens the shared frozen vision encoder emits per frame (patches + CLS).
        token_dim: their width.
        max_prompt_tokens: ``<s> prompt`` ids that fit every LM's positions next to its query tokens and an
            answer of ``ANSWER_TOKENS``.
        max_prompt_chars: a prompt above this is refused before it is tokenised.
        max_answer_chars: the robot's ``student_answer`` (kept with the sample, never trained on).
        max_message_bytes: the most CDR bytes a message of these bounds can take (all tokens sent as fp16, and
            ``MAX_FRAME_PROMPTS`` prompts).
    """

    num_tokens: int
    token_dim: int
    max_prompt_tokens: int
    max_prompt_chars: int
    max_answer_chars: int
    max_message_bytes: int

    @classmethod
    def of(cls, teacher: MLLM, student: MLLM) -> SampleLimits:
        """The limits both models share; ValueError if they do not share the vision encoder's grid."""
        grids = {(m.blip2.vision_model.embeddings.num_positions, m.blip2.vision_model.embeddings.embed_dim)
                 for m in (teacher, student)}  # fmt: skip
        if len(grids) != 1:
            raise ValueError(f"teacher and student must share the frozen vision encoder; their (tokens, width) "
                             f"are {sorted(grids)}")  # fmt: skip
        ((num_tokens, token_dim),) = grids
        for model in (teacher, student):
            width = model.blip2.config.qformer_config.encoder_hidden_size
            if width != token_dim:
                raise ValueError(f"the Q-Former reads tokens of width {width}, the encoder emits {token_dim}")
        room = []
        for model in (teacher, student):
            positions = getattr(model.blip2.config.text_config, "max_position_embeddings", None) or 2048
            room.append(positions - model.num_query_tokens - ANSWER_TOKENS)
        max_prompt_tokens = min(room)
        if max_prompt_tokens < 2:
            raise ValueError(f"the language models leave no room for a prompt ({max_prompt_tokens} positions)")
        max_prompt_chars = CHARS_PER_TOKEN * max_prompt_tokens
        max_answer_chars = CHARS_PER_TOKEN * (max_prompt_tokens + ANSWER_TOKENS)
        per_token = 2 * token_dim + 4 + 4 + 2  # fp16 values, a scale, a variance and an index
        per_prompt = 4 * (max_prompt_chars + max_answer_chars) + MAX_SAMPLE_ID_CHARS + 3 * 4 + 4  # + lengths, entropy
        max_bytes = HEADER_BYTES + num_tokens * per_token + MAX_FRAME_PROMPTS * per_prompt
        return cls(num_tokens, token_dim, max_prompt_tokens, max_prompt_chars, max_answer_chars, max_bytes)


class SampleAdmission:
    """Checks received samples against the cloud's models.

    Args:
        teacher: the shared teacher.
        student: one copy of the robots' student (the version-0 base; only its config and tokenizer are read).
    """

    def __init__(self, teacher: MLLM, student: MLLM) -> None:
        self.limits = SampleLimits.of(teacher, student)
        tokenizers = {id(m.tokenizer): m for m in (teacher, student)}
        self._tokenizers = list(tokenizers.values())  # models whose tokenizer counts a prompt (once if shared)

    def check(self, msg, size: int | None = None) -> list[DistillSample]:
        """The message's samples as a round takes them (one per prompt it carries about its frame);
        :class:`UplinkError` with a ``reason`` if the models cannot take one of them (the message is refused whole).

        Args:
            msg: the received ``UtsTokens``.
            size: its CDR size in bytes, when known.
        """
        limits = self.limits
        if size is not None and size > limits.max_message_bytes:
            raise UplinkError(f"UtsTokens of {size} bytes; samples for these models take at most "
                              f"{limits.max_message_bytes}", "oversized")  # fmt: skip
        if len(msg.more_sample_ids) >= MAX_FRAME_PROMPTS:
            raise UplinkError(f"sample {msg.sample_id[:64]!r}: {len(msg.more_sample_ids) + 1} prompts about one frame "
                              f"(at most {MAX_FRAME_PROMPTS})", "oversized")  # fmt: skip
        prompts = frame_prompts(msg)
        if len({p.sample_id for p in prompts}) != len(prompts):
            raise UplinkError(f"sample {msg.sample_id[:64]!r}: a sample id repeats among its frame's prompts",
                              "sample_id")  # fmt: skip
        for prompt in prompts:
            self._check_prompt(prompt)
        return DistillSample.from_uts(msg, num_tokens=limits.num_tokens, token_dim=limits.token_dim)

    def _check_prompt(self, prompt: FramePrompt) -> None:
        limits = self.limits
        if not prompt.sample_id:
            raise UplinkError("empty sample_id; every sample needs the robot's id for it", "sample_id")
        if len(prompt.sample_id) > MAX_SAMPLE_ID_CHARS:
            raise UplinkError(f"sample_id of {len(prompt.sample_id)} characters (at most {MAX_SAMPLE_ID_CHARS})",
                              "sample_id")  # fmt: skip
        if len(prompt.student_answer) > limits.max_answer_chars:
            raise UplinkError(f"sample {prompt.sample_id!r}: student_answer of {len(prompt.student_answer)} "
                              f"characters (at most {limits.max_answer_chars})", "oversized")  # fmt: skip
        if len(prompt.prompt) > limits.max_prompt_chars:
            raise UplinkError(f"sample {prompt.sample_id!r}: prompt of {len(prompt.prompt)} characters (at most "
                              f"{limits.max_prompt_chars})", "prompt_too_long")  # fmt: skip
        for model in self._tokenizers:
            length = len(model.prompt_ids([prompt.prompt])[0])
            if length > limits.max_prompt_tokens:
                raise UplinkError(f"sample {prompt.sample_id!r}: prompt of {length} tokens; the language models "
                                  f"leave room for {limits.max_prompt_tokens}", "prompt_too_long")  # fmt: skip
