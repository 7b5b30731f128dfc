"""An interactive conversation with a checkpoint, whose rate can change between turns.

Each turn renders the whole conversation with the model's chat template and generates from it;
the KV cache already holds the earlier turns, so only the new tokens are prefilled. ``/rate R``
switches to an offered rate (``/rate auto``: the least-pruned rate that fits the free memory now)
and re-fills the conversation into the new widths' cache at once, so the next reply continues it.
"""

from __future__ import annotations

from typing import Callable, Iterable

from .. import ElastiqError
from .engine import Engine
from .floor import DEFAULT_MAX_KL, check_floor, quality_note
from .generate import Sampling, TextStream
from .plan import plan_rate

HELP = "commands: /rate R (switch to an offered rate), /rate auto (fit free memory), /rate (show), /quit"


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template (plain text without one)."""
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    text = "\n".join(m["content"] for m in messages)
    return tokenizer.encode(text)


def stop_ids(tokenizer) -> list[int]:
    """Tokens that end a reply: the EOS token and the chat template's end-of-turn token if known."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def reply(engine: Engine, messages: list[dict], max_new_tokens: int, sampling: Sampling,
          write: Callable[[str], None]):
    """Generate the assistant's answer to ``messages``, streaming it to ``write``; returns
    (text, stats)."""
    ids = template_ids(engine.tokenizer, messages, add_generation_prompt=True)
    stream = TextStream(engine.tokenizer, write)
    stats = engine.generator.generate(ids, max_new_tokens, sampling, stop_ids(engine.tokenizer), stream)
    return engine.tokenizer.decode(stats.tokens, skip_special_tokens=True), stats


def switch(engine: Engine, arg: str, messages: list[dict], memory_budget: int | None,
           max_kl: float = DEFAULT_MAX_KL) -> str:
    """Handle ``/rate ARG``; returns what to tell the user. A rate below the quality floor
    ``max_kl`` is refused (``floor``)."""
    if not arg:
        return (f"rate {engine.rate} ({quality_note(engine.ckpt, engine.rate)}); offered: "
                f"{', '.join(str(r) for r in engine.ckpt.rates)}")
    if arg == "auto":
        plan = plan_rate(engine.ckpt, None, engine.ctx, engine.dtype, engine.int4, memory_budget, engine.device,
                         backend=engine.backend, max_kl=max_kl)
        rate, why = plan.rate, plan.reason
    else:
        try:
            rate = float(arg)
        except ValueError:
            raise ElastiqError(f"/rate takes an offered rate ({', '.join(str(r) for r in engine.ckpt.rates)}) "
                               f"or auto, got {arg!r}") from None
        check_floor(engine.ckpt, rate, max_kl)
        why = f"as asked; {quality_note(engine.ckpt, rate)}"
    done = engine.set_rate(rate)
    note = f"rate {done.old_rate} -> {done.new_rate} in {done.seconds:.2f} s, {done.bytes_read / 1e6:.1f} MB read ({why})"
    if messages:
        ids = template_ids(engine.tokenizer, messages, add_generation_prompt=False)
        engine.generator.prefill(ids)
        note += f"; conversation re-filled ({len(ids)} tokens)"
    return note


def chat(engine: Engine, lines: Iterable[str], write: Callable[[str], None], max_new_tokens: int = 256,
         sampling: Sampling = Sampling(), memory_budget: int | None = None,
         prompt: Callable[[], None] = lambda: None, max_kl: float = DEFAULT_MAX_KL) -> list[dict]:
    """Run the conversation read from ``lines`` (user messages and /commands); returns the messages."""
    messages: list[dict] = []
    prompt()
    for line in lines:
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/rate"):
            try:
                write(f"[{switch(engine, line.removeprefix('/rate').strip(), messages, memory_budget, max_kl)}]\n")
            except ElastiqError as err:
                write(f"[error: {err}]\n")
        elif line.startswith("/"):
            write(f"[{HELP}]\n")
        elif line:
            messages.append({"role": "user", "content": line})
            text, stats = reply(engine, messages, max_new_tokens, sampling, write)
            messages.append({"role": "assistant", "content": text})
            write(f"\n[rate {engine.rate}: {stats.prefilled} tokens prefilled ({stats.reused} reused), "
                  f"{stats.decoded} decoded at {stats.decode_tok_s:.1f} tok/s]\n")
        prompt()
    return messages
