"""A model's reply to a prompt, as the chat REPL (generate.py --chat) and the server (serve.py) both produce it:
the prompt of a conversation in the chat template, and the generated text handed out piece by piece as it settles,
cut at the next-turn header, a stop string or the end-of-text.

    ids, dropped = chat_prompt(messages, system="", context_length=1024, reserve=256)
    reply = Reply(model, torch.tensor([ids]), 256, temperature=0)
    for piece in reply:
        print(piece, end="", flush=True)
    reply.text, reply.n_tokens, reply.finish_reason        # "stop" or "length"
"""
from data import EOT_ID, NEXT_TURN_MARKERS, conversation_segments, encode_segments, get_tokenizer
from model import generate_stream


def chat_prompt(messages, system, context_length, reserve, tokenizer=None):
    """(ids, dropped): the conversation's token ids, ending with the response header of its last user message,
    after dropping the `dropped` oldest exchanges needed to leave `reserve` tokens for the answer. The last
    message is always kept, so ids can still be too long for the context: the caller checks. A first message
    with role "system" stays in front whatever is dropped."""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    dropped = 0
    while True:
        ids, _ = encode_segments(conversation_segments(messages[2 * dropped:], system), tokenizer)
        if len(ids) + reserve <= context_length or 2 * dropped + 1 >= len(messages):
            return ids, dropped
        dropped += 1


def cut_at(text, stops):
    """(text before the first of the strings in stops, whether one was found)."""
    found = [text.find(s) for s in stops if s and s in text]
    return (text[:min(found)], True) if found else (text, False)


def settled_length(text, stops, strip):
    """How much of a growing text can be handed out: not an end that could still turn into one of stops (those
    are not part of the reply) and, where strip, not trailing whitespace (the finished reply is stripped)."""
    end = len(text)
    for stop in stops:
        for k in range(min(len(stop), len(text)), 0, -1):
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    return len(text[:end].rstrip()) if strip else end


class Reply:
    """The text a model writes after prompt_ids (1, T), generated as it is iterated: each item is the next piece of
    text that can no longer change (a character split across tokens, or an end that may become a stop string,
    waits). chat=True reads prompt_ids as a prompt in the chat template ending with the response header: the reply
    ends at a next-turn header (NEXT_TURN_MARKERS) and is stripped; chat=False continues plain text as it is.
    Either way it ends at end-of-text, at the first of `stop` (strings, not included), or after max_new_tokens.

    During and after the iteration: text (the reply so far, as handed out), n_tokens (tokens sampled, the one that
    ended it included) and finish_reason ("stop": end-of-text or a stop string; "length": max_new_tokens reached;
    None until it finishes). should_stop(), when given, is asked after every token; True ends the reply early
    (finish_reason stays None). A kv_cache is reused up to the longest prefix it shares with prompt_ids
    (generate_stream does that), so the earlier turns of a conversation are not recomputed.
    """

    def __init__(self, model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, kv_cache=None,
                 generator=None, tokenizer=None, stop=(), chat=True, should_stop=None):
        self.model, self.prompt_ids, self.max_new_tokens = model, prompt_ids, max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p)
        self.kv_cache, self.generator, self.should_stop = kv_cache, generator, should_stop
        self.tokenizer = tokenizer or get_tokenizer()
        self.chat = chat
        self.stops = tuple(s for s in stop if s) + (NEXT_TURN_MARKERS if chat else ())
        self.ids, self.text, self.n_tokens, self.finish_reason = [], "", 0, None

    def __iter__(self):
        ctx = self.model.cfg["context_length"]
        stream = generate_stream(self.model, self.prompt_ids, self.max_new_tokens, ctx, eos_id=EOT_ID,
                                 kv_cache=self.kv_cache, generator=self.generator, **self.sampling)
        whole, ended = "", False
        try:
            for next_id in stream:
                self.n_tokens += 1
                token = next_id.item()
                if token == EOT_ID:
                    ended = True
                    break
                self.ids.append(token)
                whole = self.tokenizer.decode(self.ids)
                whole, ended = cut_at(whole.lstrip() if self.chat else whole, self.stops)
                if ended:
                    break
                if not whole.endswith("\ufffd"):  # a character split across tokens waits for its next token
                    settled = settled_length(whole, self.stops, strip=self.chat)
                    if settled > len(self.text):
                        piece, self.text = whole[len(self.text):settled], whole[:settled]
                        yield piece
                if self.should_stop is not None and self.should_stop():
                    return
        finally:
            stream.close()
        rest = (whole.rstrip() if self.chat else whole)[len(self.text):]
        self.text += rest
        self.finish_reason = "stop" if ended else "length"
        if rest:
            yield rest


def generate_reply(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, kv_cache=None,
                   generator=None, out=None, tokenizer=None):
    """The model's answer to prompt_ids (1, T), a prompt in the chat template ending with the response header,
    written to `out` piece by piece when given; returns it stripped (see Reply)."""
    reply = Reply(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, kv_cache, generator, tokenizer)
    for piece in reply:
        if out is not None:
            out.write(piece)
            out.flush()
    return reply.text
