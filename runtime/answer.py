"""Answer one prompt with a float model through its chat template, streaming the reply.

This is the main job until the nested-checkpoint runtime lands; it uses transformers'
``generate`` so that its output is the reference the elastic runtime will be checked against.
"""

from __future__ import annotations

import torch


def answer(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 128,
           temperature: float = 0.0, seed: int = 0, stream: bool = True) -> str:
    """Reply to ``prompt`` as the model's chat template frames it; greedy when temperature is 0."""
    from transformers import TextStreamer

    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
    else:
        ids = torch.tensor([tokenizer.encode(prompt)])
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             streamer=streamer, pad_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
