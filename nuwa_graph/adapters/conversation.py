"""Several questions about one image: continuing a pruned run's KV cache turn after turn.

    conv = Conversation()
    first = adapter.generate(pipe, images, questions_1, conversation=conv)   # prunes, keeps the cache
    second = adapter.generate(pipe, images, questions_2, conversation=conv)  # feeds turn 2 to that cache

The first call is an ordinary run (the pipeline prunes, the KV cache is kept). Each later call
appends, per sample, what the cache lacks of the previous answer (its last token, which was
never fed, and the end-of-answer token where the answer was cut by `max_new_tokens`) and the
family's text for the next user turn (`FamilyHooks.turn_text`), runs those tokens through the
LLM over the cache (the image's kept tokens and their keys and values are reused, nothing is
pruned again), and decodes. Tokens a sample was fed after it had finished (a batch decodes
until every sample stops) are masked out, and positions continue from each sample's own last
real token, so turn t equals a cache-free recompute of the same token ids with turn 1's
pruning replayed (tests/test_multiturn.py checks it).

`Conversation.history[b]` holds the token ids appended after sample b's first prompt, so that
"prune again" (a fresh run over the whole conversation) can be given the same tokens
(`generate(..., prompt_ids=history)`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import RunError
from .layout import decode_mask
from .state import AdapterRun

if TYPE_CHECKING:
    from .generation import Generation
    from .report import RunReport

#: a later user turn in ChatML (Qwen-VL line, InternVL), after `answer<|im_end|>`
CHATML_TURN = "\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
CHATML_END = "<|im_end|>"
_ANSWER, _QUESTION = "NUWA_ANSWER_MARK", "NUWA_QUESTION_MARK"


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when the tokenizer has it as one token (None: it has not)."""
    i = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    return int(i) if isinstance(i, int) and i >= 0 and i != unk else None


def template_turn(processor) -> tuple[str, str]:
    """(a later user turn with `{question}` in it, the end-of-answer token) read off the
    processor's chat template: a conversation of one answered turn and a next question is
    rendered, and what follows the answer is split at the special token it starts with.
    For families whose prompt is the checkpoint's chat template (LLaVA-OneVision)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]},
            {"role": "user", "content": [{"type": "text", "text": _QUESTION}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    after = text[text.index(_ANSWER) + len(_ANSWER):] if _ANSWER in text else ""
    tok = getattr(processor, "tokenizer", processor)
    specials = sorted(set(tok.all_special_tokens) | set(tok.get_added_vocab()), key=len, reverse=True)
    end = next((t for t in specials if t and after.startswith(t)), None)
    if end is None or _QUESTION not in after:
        raise RunError("multi-turn conversations: the chat template does not end an answer with a special token "
                       f"and then give the next user turn (after the answer it renders {after[:80]!r}); a "
                       "conversation cannot be continued in it: use the dialog mode 'prune' with a model whose "
                       "template does, or one question per image")
    return after[len(end):].replace(_QUESTION, "{question}"), end


def user_content(question: str, placeholder: str = "<image>") -> list[dict]:
    """One user turn's chat-template content from a question with image placeholders: text
    pieces and `{"type": "image"}` entries in their order (what `apply_chat_template` takes)."""
    content: list[dict] = []
    for i, piece in enumerate(question.split(placeholder)):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


class Conversation:
    """The state a multi-turn exchange carries between `generate` calls (one batch of images)."""

    def __init__(self) -> None:
        self.run: AdapterRun | None = None
        self.cache: Any = None
        self.turns = 0
        self.answers: list[list[int]] = []  # the last turn's generated ids per sample
        self.steps = 0  # decoding steps fed to the cache in the last turn
        self.history: list[list[int]] = []  # per sample: every id after the first prompt, fed or to feed
        self.pipeline_name = ""  # the pipeline the first call was given (a family file may have run instead)

    @property
    def active(self) -> bool:
        return self.run is not None

    def keep(self, r: AdapterRun, cache: Any, new_tokens: list[list[int]], steps: int, rep: RunReport,
             pipeline_name: str = "") -> None:
        """Called by `generate` at the end of a turn."""
        self.pipeline_name = self.pipeline_name or pipeline_name
        if self.turns and rep.flops:
            rep.flops = [{"unavailable": f"turn {self.turns + 1} continues the KV cache: its prefill is the new "
                                         f"tokens only, which nuwa_graph/flops.py does not count"}] * r.B
        self.run, self.cache, self.steps = r, cache, steps
        self.answers = [list(t) for t in new_tokens]
        if not self.history:
            self.history = [[] for _ in range(r.B)]
        self.turns += 1

    def _answers(self, adapter: Generation) -> list[tuple[list[int], int]]:
        """Per sample: (the answer as the conversation keeps it: cut after its first end-of-
        sequence token, else closed with the family's end-of-answer token; how many of the
        generated ids it keeps)."""
        eos = adapter._eos_ids()
        end = adapter.turn_end_id()
        out = []
        for toks in self.answers:
            cut = next((i + 1 for i, t in enumerate(toks) if t in eos), None)
            out.append((toks[:cut], cut) if cut is not None else (toks + [end], len(toks)))
        return out

    def next_ids(self, adapter: Generation, texts: list[str]) -> list[list[int]]:
        """Per sample: the finished answer and the next user turn, as token ids (what `history`
        gains)."""
        return [answer + adapter.turn_ids(text) for (answer, _), text in zip(self._answers(adapter), texts)]

    def extend(self, adapter: Generation, r: AdapterRun, texts: list[str], pipeline=None) -> tuple[torch.Tensor, Any]:
        """Feed the next turn to the cache (called by `generate` inside its session); returns
        (logits of the last position (B, 1, V), the cache)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) != r.B:
            raise RunError(f"{len(texts)} questions for a conversation of {r.B} samples; give one per sample")
        if pipeline is not None and pipeline.name not in (r.ex.pipeline.name, self.pipeline_name):
            raise RunError(f"this conversation was pruned by {r.ex.pipeline.name!r}; it continues with that pipeline "
                           f"(got {pipeline.name!r}); start a new Conversation for another")
        new = self.next_ids(adapter, texts)
        # generated ids the cache holds and keeps: the answer's first ids (the last sampled one is never fed;
        # ids after an end-of-sequence token, fed while other samples went on, are masked)
        fed = [min(kept, self.steps) for _, kept in self._answers(adapter)]
        chunks = [n[f:] for n, f in zip(new, fed)]
        for b in range(r.B):
            self.history[b] += new[b]
        q = max(len(c) for c in chunks)
        B, dev = r.B, adapter.device
        steps = torch.arange(self.steps)
        ids = torch.full((B, q), adapter.pad_id(), dtype=torch.long)
        chunk_valid = torch.zeros(B, q, dtype=torch.bool)
        for b, c in enumerate(chunks):
            ids[b, q - len(c):] = torch.tensor(c, dtype=torch.long)
            chunk_valid[b, q - len(c):] = True
        fed_valid = steps[None] < torch.tensor(fed)[:, None]  # (B, steps): a finished sample's later steps are masked
        for seg in r.segments:
            last = seg.pos[:, :, -1]  # (P, B) the prompt's last position (decoding went on from it)
            step_pos = last[:, :, None] + 1 + steps
            real_last = last + torch.tensor(fed)[None]  # each sample's last real position
            # left padding inside the chunk: positions run so that the real tokens follow real_last
            start = real_last - (q - chunk_valid.sum(1))[None]
            chunk_pos = start[:, :, None] + 1 + torch.arange(q)
            seg.valid = torch.cat([seg.valid, fed_valid, chunk_valid], dim=1)
            seg.pos = torch.cat([seg.pos, step_pos.to(seg.pos), chunk_pos.to(seg.pos)], dim=2)
            seg.key_valid = seg.valid.to(dev, copy=True)
            seg.last_pos = start.to(dev, copy=True)
            seg.step_tables = None
            seg.copies = {}  # the device copies of valid / pos are stale now
        seg0 = r.segments[0]
        r.phase = "decode"
        r.step = -self.turns  # keys the layer hooks' tables of this chunk (decoding steps count from 0)
        assert seg0.last_pos is not None and seg0.key_valid is not None
        pos = seg0.last_pos[:, :, None] + 1 + torch.arange(q, device=dev)
        # the first segment's mask in the implementation's form, as the decoding steps build it
        mask = adapter._impl_mask(decode_mask(seg0.key_valid, q), seg0.key_valid, adapter.dtype, seg0.padded)
        out = adapter.text_model()(inputs_embeds=adapter.embed(ids.to(dev)), attention_mask=mask,
                                   position_ids=adapter.llm_position_ids(pos), cache=self.cache, use_cache=True)
        logits = adapter.lm_head()(out.last_hidden_state[:, -1:])
        for seg in r.segments:
            seg.step_tables = None
        return logits, self.cache
