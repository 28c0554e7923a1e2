"""The official `openai` Python client against `wgllm serve`: chat (streaming and not),
completions, embeddings and models. Usage: python3 tests/openai_client.py http://127.0.0.1:PORT/v1
(run by tests/serve.rs). Exits non-zero on the first failed check."""

import math
import sys

import openai


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    models = [m.id for m in client.models.list().data]
    assert "smollm2-135m" in models and "all-MiniLM-L6-v2" in models, models

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=6, temperature=0
    )
    reply = chat.choices[0].message.content
    assert chat.object == "chat.completion" and reply, chat
    assert chat.choices[0].finish_reason in ("stop", "length"), chat
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0, chat.usage
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    # Streamed, the deltas add up to the same greedy reply.
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == reply, (parts, reply)
    assert finish == chat.choices[0].finish_reason, finish
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

    completion = client.completions.create(
        model="smollm2-135m", prompt="One, two, three,", max_tokens=4, temperature=0
    )
    assert completion.object == "text_completion", completion
    assert completion.choices[0].text, completion
    assert completion.usage.completion_tokens <= 4, completion.usage

    # The client asks for base64 by default and decodes it.
    emb = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=["A cat sits on the mat.", "A kitten rests on a rug."]
    )
    vecs = [d.embedding for d in emb.data]
    assert len(vecs) == 2 and all(len(v) == 384 for v in vecs), [len(v) for v in vecs]
    norms = [math.sqrt(sum(x * x for x in v)) for v in vecs]
    assert all(abs(n - 1.0) < 1e-3 for n in norms), norms
    floats = client.embeddings.create(
        model="all-MiniLM-L6-v2", input="A cat sits on the mat.", encoding_format="float"
    )
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vecs[0])) < 1e-6

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert "no-such-model" in str(e), e

    print("all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
