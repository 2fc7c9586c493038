"""The real `openai` client against ebb's /v1/chat/completions and /v1/models.

Run by tests/tests/python_clients.rs with EBB_URL, EBB_KEY and EBB_MODEL set.
"""
import os

import openai

URL, KEY, MODEL = os.environ["EBB_URL"], os.environ["EBB_KEY"], os.environ["EBB_MODEL"]
client = openai.OpenAI(base_url=f"{URL}/v1", api_key=KEY, max_retries=0, timeout=120)

assert MODEL in [model.id for model in client.models.list().data]

answer = client.chat.completions.create(
    model=MODEL,
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a river?"},
        {"role": "assistant", "content": "Flowing water."},
        {"role": "user", "content": "Where does it go?"},
    ],
    max_tokens=12,
    user="student-1",
    extra_body={"grade": 5},
)
assert answer.object == "chat.completion", answer
assert answer.id.startswith("chatcmpl-"), answer.id
assert answer.choices[0].message.role == "assistant"
assert answer.choices[0].message.content, answer
assert answer.choices[0].finish_reason in ("stop", "length"), answer
assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0, answer.usage

pieces, finish, usage = [], None, None
stream = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "What is a lake?"}],
    max_tokens=12,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert len(pieces) > 1, f"streamed in pieces: {pieces}"
assert finish in ("stop", "length"), finish
assert usage and usage.completion_tokens > 0, usage

# Greedy answers are cached: the same chat again is the same text, at once.
again = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "What is a lake?"}], max_tokens=12
)
assert again.choices[0].message.content == "".join(pieces), (again, pieces)
assert again.model_extra["ebb"]["cached"] is True, again.model_extra

# ...and streamed from the cache too.
cached_stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "What is a lake?"}], max_tokens=12, stream=True
)
assert "".join(c.choices[0].delta.content or "" for c in cached_stream if c.choices) == "".join(pieces)

# Errors arrive as the client's own exceptions.
try:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    raise AssertionError("an unknown model must be refused")
except openai.NotFoundError as err:
    assert err.status_code == 404 and err.code == "model_not_found", err
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=5)
    raise AssertionError("temperature 5 must be refused")
except openai.UnprocessableEntityError as err:
    assert err.param == "temperature", err
try:
    openai.OpenAI(base_url=f"{URL}/v1", api_key="sk-wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key must be refused")
except openai.AuthenticationError as err:
    assert err.status_code == 401, err

print("openai client: ok")
